"""Synthetic but realistic trace records for tests (schema-valid, self-consistent).

Each (prompt, compression) answer is a walk through "easy" and "hard" stretches (a Markov
chain whose mix depends on the task). At every answer position j the draft's top-1
probability is drawn from the stretch's distribution, and the draft agrees with the target
with a probability that rises with that top-1 probability (and falls with the target's
compression: a quantized target drifts from the draft). Most answers end with EOS before the
budget of M new tokens, the rest run into it. As in a real trace (:mod:`speckv.profile.profiler`),
``accept_len`` at position i is the run of agreements starting at i, capped at
``min(8, M - i - 1, n - i)``; the per-position signals of a step are the teacher-forced ones
up to the first disagreement and "off-track" ones after it; history features come from
:func:`speckv.runtime.features.history_arrays`. So a policy that reads ``draft_top1`` and
the agreement history can beat every fixed γ, and the per-step oracle is a true upper bound.

Costs resemble this 2-core CPU: ~9 ms per draft token; a target forward over g+1 tokens
takes 35 ms + 1 ms·g at fp16, 60 ms + 1 ms·g at int8 (bitsandbytes INT8 is slow on CPU) and
34 ms + 1 ms·g at nf4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from speckv.prompts import TASKS
from speckv.records import validate
from speckv.runtime.features import (
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMA_MAX,
    GAMMAS,
    LOOKUP_FEATURE_NAMES,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
    history_arrays,
)
from speckv.runtime.proposal import TREES

DRAFT_S: Final = 0.009
VERIFY_S: Final = {"fp16": (0.035, 0.001), "int8": (0.060, 0.001), "nf4": (0.034, 0.001)}
#: logit shift of draft/target agreement per compression level.
AGREE_SHIFT: Final = {"fp16": 0.0, "int8": -0.15, "nf4": -0.6}
#: draft top-1 probability ~ Beta(a, b) in easy and hard stretches; agreement logit slope.
EASY_TOP1: Final = (10.0, 1.2)
HARD_TOP1: Final = (2.0, 3.0)
AGREE_SLOPE: Final = 9.0
STAY_EASY: Final = 0.96
#: share of "easy" stretches per task.
EASY_SHARE: Final = {"code": 0.8, "math": 0.75, "chat": 0.6, "summarization": 0.65}


def verify_costs(compression: str) -> np.ndarray:
    base, per_token = VERIFY_S[compression]
    return np.array([base + per_token * g for g in range(GAMMA_MAX + 1)], np.float32)


def _stats(top1: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Entropy (nats) and top-1/top-2 margin of a distribution with this top-1 probability:
    the rest of the mass spread over m tokens, m random (a short or a long tail)."""
    rest = 1.0 - top1
    m = np.maximum(np.exp(rng.uniform(0.5, 3.5, top1.shape)), rest / top1 + 1.0)
    entropy = -(top1 * np.log(top1)) - rest * np.log(np.clip(rest / m, 1e-12, None))
    top2 = np.minimum(top1, rest * rng.uniform(0.3, 0.9, top1.shape))
    return entropy.astype(np.float32), (top1 - top2).astype(np.float32)


def _runs(agree: np.ndarray) -> np.ndarray:
    run = np.zeros(len(agree) + 1, np.int64)
    for i in range(len(agree) - 1, -1, -1):
        run[i] = run[i + 1] + 1 if agree[i] else 0
    return run[:-1]


def sequence_rows(task: str, prompt_id: str, compression: str, n: int,
                  rng: np.random.Generator, budget: int | None = None) -> pd.DataFrame:
    """Trace rows of one synthetic answer of length ``n`` decoded with ``budget`` new tokens
    at most (default ``n``: the answer ran into the budget; larger: it ended with EOS)."""
    budget = n if budget is None else budget
    if budget < n:
        raise ValueError(f"budget {budget} < answer length {n}")
    easy_share = EASY_SHARE[task]
    stay_easy, stay_hard = STAY_EASY, 1 - (1 - STAY_EASY) * easy_share / (1 - easy_share)
    easy = np.empty(n, bool)
    easy[0] = rng.random() < easy_share
    for j in range(1, n):
        stay = stay_easy if easy[j - 1] else stay_hard
        easy[j] = easy[j - 1] if rng.random() < stay else not easy[j - 1]
    top1 = np.where(easy, rng.beta(*EASY_TOP1, n), rng.beta(*HARD_TOP1, n)).clip(0.02, 0.999)
    logit = -0.3 + AGREE_SLOPE * (top1 - 0.55) + AGREE_SHIFT[compression]
    agree = rng.random(n) < 1 / (1 + np.exp(-logit))
    entropy, margin = _stats(top1, rng)
    target_top1 = np.where(agree, rng.beta(9.0, 1.5, n), rng.beta(3.0, 3.0, n)).astype(np.float32)
    run = _runs(agree)
    pos = np.arange(n)
    cap = np.minimum(np.minimum(GAMMA_MAX, budget - 1 - pos), n - pos)
    # off-track continuation after a disagreement at m (depends only on m)
    off_top1 = rng.beta(*HARD_TOP1, (n, GAMMA_MAX)).clip(0.02, 0.999)
    off_ent, _ = _stats(off_top1, rng)
    top1_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    ent_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    for i in range(n):
        for k in range(1, int(cap[i]) + 1):
            if k - 1 <= run[i]:
                top1_k[i, k - 1], ent_k[i, k - 1] = top1[i + k - 1], entropy[i + k - 1]
            else:
                m, idx = i + int(run[i]), k - int(run[i]) - 2
                top1_k[i, k - 1], ent_k[i, k - 1] = off_top1[m, idx], off_ent[m, idx]
    ema, hist_run, prev = history_arrays(agree, target_top1)
    verify = verify_costs(compression)
    return pd.DataFrame({
        "run_id": f"synthetic-{compression}",
        "draft_model": "synthetic-draft",
        "target_model": "synthetic-target",
        "compression": compression,
        "compute_dtype": "float32",
        "task": task,
        "prompt_id": prompt_id,
        "step": np.arange(n, dtype=np.int32),
        "position": np.arange(n, dtype=np.int32),
        "seq_len": np.full(n, n, np.int32),
        "max_new_tokens": np.full(n, budget, np.int32),
        "temperature": np.zeros(n, np.float32),
        "mode": "trace",
        "replayable": True,
        "draft_entropy": entropy,
        "draft_top1": top1.astype(np.float32),
        "draft_margin": margin,
        "target_top1_prev": prev,
        "agree_ema": ema,
        "agree_run": hist_run.astype(np.int32),
        "draft_entropy_k": list(ent_k),
        "draft_top1_k": list(top1_k),
        "accept_len": np.minimum(run, cap).astype(np.int16),
        "accept_cap": cap.astype(np.int16),
        "accept_prob_k": None,
        "cost_draft_s": np.float32(DRAFT_S),
        "cost_verify_s": [verify] * n,
        "gamma": pd.array([None] * n, dtype="Int16"),
        "drafted": pd.array([None] * n, dtype="Int16"),
        "t_step_s": np.full(n, np.nan, np.float32),
        "paper_mean_entropy": np.nan, "paper_mean_confidence": np.nan,
        "paper_max_entropy": np.nan, "paper_min_confidence": np.nan,
    })


def make_records(prompts_per_task: int = 10, tasks: Sequence[str] = TASKS,
                 compressions: Sequence[str] = COMPRESSIONS, min_len: int = 24,
                 max_len: int = 96, eos_share: float = 0.7, seed: int = 0) -> pd.DataFrame:
    """Trace records of every prompt at every compression, decoded with ``max_len`` new
    tokens at most: a share ``eos_share`` of answers ends with EOS (length uniform in
    ``min_len..max_len-1``), the others run into the budget."""
    rng = np.random.default_rng(seed)
    frames = []
    for task in tasks:
        for i in range(prompts_per_task):
            for comp in compressions:
                eos = rng.random() < eos_share
                n = int(rng.integers(min_len, max_len)) if eos else max_len
                frames.append(sequence_rows(task, f"{task}-{i:03d}", comp, n, rng,
                                            budget=max_len))
    return pd.concat(frames, ignore_index=True)


def add_trees_and_lookup(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Trace rows with tree and lookup columns consistent with their caps: each tree accepts
    at least what the chain does (its first branch is the draft's greedy chain), more for
    bigger trees; the lookup proposes up to 8 tokens and is right on about half of them."""
    rng = np.random.default_rng(seed)
    df = df.copy()
    n = len(df)
    cap = df["accept_cap"].to_numpy()
    chain = df["accept_len"].to_numpy()
    trees = np.stack([np.minimum(np.minimum(t.depth, cap), chain + rng.integers(0, 2 + i, n))
                      for i, t in enumerate(TREES)], -1)
    df["tree_accept_len"] = list(trees.astype(np.float32))
    # a level of the tree costs a draft token; its verify a plain step and 3% per node
    draft = df["cost_draft_s"].to_numpy(np.float64)
    verify0 = np.stack(df["cost_verify_s"].to_numpy())[:, 0].astype(np.float64)
    df["cost_tree_draft_s"] = list((draft[:, None] * [t.draft_forwards for t in TREES]
                                    ).astype(np.float32))
    df["cost_tree_verify_s"] = list((verify0[:, None] * [1 + 0.03 * t.size for t in TREES]
                                     ).astype(np.float32))
    left = (df["max_new_tokens"] - df["position"] - 1).to_numpy()
    length = np.where(rng.random(n) < 0.6, np.minimum(rng.integers(1, 9, n), left), 0)
    accept = np.minimum(rng.integers(0, 9, n) // 2, np.minimum(length, (df["seq_len"] - df[
        "position"]).to_numpy()))
    df["lookup_length"] = pd.array(length, dtype="Int16")
    df["lookup_accept"] = pd.array(np.where(length > 0, accept, 0), dtype="Int16")
    df["lookup_match"] = pd.array(np.where(length > 0, rng.integers(1, 5, n), 0), dtype="Int16")
    df["lookup_occurrences"] = pd.array(np.where(length > 0, 1, 0), dtype="Int16")
    df["lookup_agreeing"] = pd.array(np.where(length > 0, 1, 0), dtype="Int16")
    return validate(df)


# ---------------------------------------------------------------------- a tiny controller
def fit_survival_mlp(df: pd.DataFrame, steps: int = 300, hidden: Sequence[int] = (16, 16),
                     seed: int = 0, pre: bool = False):
    """Fit a :class:`speckv.train.network.SurvivalMLP` to trace rows by censored hazard likelihood.

    Continuation k (1..8) is observed as 1 for k <= accept_len, as 0 at k = accept_len + 1
    when accept_len < accept_cap, and not at all beyond (censored). ``pre``: the pre-draft
    network instead, on the pre-draft vectors of the rows with nothing unsettled.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared 2-core machine
    try:
        return _fit(df, steps, hidden, seed, pre)
    finally:
        torch.set_num_threads(threads)


def _fit(df: pd.DataFrame, steps: int, hidden: Sequence[int], seed: int, pre: bool):
    import torch
    from torch.nn import functional as F

    from speckv.records import feature_matrix
    from speckv.runtime.features import pre_from_step_features
    from speckv.train.network import SurvivalMLP

    torch.manual_seed(seed)
    x = feature_matrix(df)
    x = torch.as_tensor(pre_from_step_features(x, x, 0) if pre else x)
    acc = torch.as_tensor(df["accept_len"].to_numpy(np.int64))[:, None]
    cap = torch.as_tensor(df["accept_cap"].to_numpy(np.int64))[:, None]
    k = torch.arange(1, GAMMA_MAX + 1)[None, :]
    target = (k <= acc).float()
    mask = ((k <= acc) | ((k == acc + 1) & (acc < cap))).float()
    mlp = SurvivalMLP(x.shape[1], GAMMA_MAX, hidden)
    mlp.set_scaling(x.mean(0), x.std(0))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (F.binary_cross_entropy_with_logits(mlp(x), target, reduction="none")
                * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mlp.eval()


def save_checkpoint(mlp, pre_mlp, path: str | Path, hidden: Sequence[int] = (16, 16),
                    lookup_mlp=None) -> Path:
    """Write the step network ``mlp``, the pre-draft network ``pre_mlp`` and optionally the
    lookup network ``lookup_mlp`` (all with hidden layers ``hidden``) in the checkpoint layout
    :func:`speckv.train.network.load_checkpoint` reads."""
    import torch

    path = Path(path)
    config = {"gamma_max": GAMMA_MAX, "hidden": list(hidden)}
    meta = {"mlp_config": {"n_features": len(FEATURE_NAMES), **config},
            "pre_mlp_config": {"n_features": len(PRE_FEATURE_NAMES), **config},
            "feature_names": list(FEATURE_NAMES), "pre_feature_names": list(PRE_FEATURE_NAMES),
            "gammas": list(GAMMAS), "max_skip_run": MAX_SKIP_RUN,
            "compressions": list(COMPRESSIONS), "feature_set": "decision",
            "objective": "tokens_per_s", "data_fingerprint": "synthetic"}
    state = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    state |= {f"pre_mlp.{k}": v for k, v in pre_mlp.state_dict().items()}
    if lookup_mlp is not None:
        meta["lookup_mlp_config"] = {**config, "n_features": int(lookup_mlp.mean.numel()),
                                     "gamma_max": int(lookup_mlp.gamma_max)}
        meta["lookup_feature_names"] = list(LOOKUP_FEATURE_NAMES)
        state |= {f"lookup_mlp.{k}": v for k, v in lookup_mlp.state_dict().items()}
    torch.save({"speckv": meta, "state_dict": state}, path)
    return path
