"""``speckv profile``: step-level profiling of real speculative decoding, trace and live.

Trace mode (greedy) exploits that greedy speculative decoding is lossless: the target's
answer does not depend on γ. So for each prompt the target's own greedy answer ``y`` is
decoded once, and the draft is run *teacher-forced* over it. At answer position ``j`` the
draft's greedy token given the true prefix is ``d(j)``, and ``agree[j] = d(j) == y[j]``.
A step starting at position ``i`` then accepts exactly the run of agreements that starts at
``i`` (while the draft agrees, its context *is* the true prefix), so one forward pass gives
``accept_len`` for every position and every γ at once.

Per-token stopping rules also need the draft's confidence at drafted positions *after* its
first disagreement, where its context has left the target's path. Those "off-track"
continuations depend only on the position ``m`` of the disagreement (context
``y[:m] + d(m)``), so each is decoded once, in batches, and shared by every step that reaches
it. The result is a record at every answer position from which any up-front-γ or
stop-per-token policy replays exactly.

Live mode runs the real decoder (:mod:`speckv.decode.decoder`) with a γ policy and records
every step with wall-clock times; replaying the same policy on trace records reproduces its accepted
counts.

Output goes to ``OUT.parts/`` (one parquet file per prompt and compression, written
atomically, skipped when present, so a killed run resumes and loses at most the prompt in
flight), and is merged into ``OUT`` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from speckv.atomic import atomic_write
from speckv.errors import SpeckvError
from speckv.prompts import Prompt, chat_ids
from speckv.records import read_records, write_records
from speckv.runtime.features import GAMMA_MAX, history_arrays, token_stats

log = logging.getLogger(__name__)


class ProfileError(SpeckvError):
    """Bad profiling input."""


# ------------------------------------------------------------------------------- sharding
def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``"auto"`` reads RANK/WORLD_SIZE (torchrun, SLURM, Ray)."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        spec = f"{rank}/{world}"
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ProfileError(f"--shard {spec!r}: write it as i/n (e.g. 0/4) or 'auto'.") from None
    if not (n >= 1 and 0 <= i < n):
        raise ProfileError(f"--shard {spec!r}: need 0 <= i < n.")
    return i, n


# ---------------------------------------------------------------------------------- trace
@dataclass
class TraceResult:
    """Arrays describing one greedy answer, position by position (length n)."""

    answer: np.ndarray  # [n] target tokens
    max_new_tokens: int  # the answer budget M (n < M when the answer ended with EOS)
    target_top1: np.ndarray  # [n] target prob of each answer token
    stats: np.ndarray  # [n, 3] draft entropy/top1/margin, teacher-forced
    agree: np.ndarray  # [n] bool
    accept_len: np.ndarray  # [n]
    accept_cap: np.ndarray  # [n]
    ent_k: np.ndarray  # [n, GAMMA_MAX]
    top1_k: np.ndarray  # [n, GAMMA_MAX]


def agreement_runs(agree: np.ndarray) -> np.ndarray:
    """``run[i]`` = number of consecutive True values starting at i."""
    run = np.zeros(len(agree) + 1, np.int64)
    for i in range(len(agree) - 1, -1, -1):
        run[i] = run[i + 1] + 1 if agree[i] else 0
    return run[:-1]


def _target_answer(target, prompt_ids: list[int], max_new_tokens: int, eos: int | None):
    import torch

    ids = torch.tensor([prompt_ids])
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=eos, eos_token_id=eos)
    answer = out.sequences[0, len(prompt_ids):].tolist()
    if eos is not None and eos in answer:
        answer = answer[: answer.index(eos) + 1]
    logits = torch.stack(out.logits[: len(answer)], 0)[:, 0].float()
    probs = torch.softmax(logits, -1)
    top1 = probs.gather(-1, torch.tensor(answer)[:, None])[:, 0]
    return np.array(answer), top1.numpy().astype(np.float32)


def _off_track(draft, contexts: list[list[int]], steps: int, pad: int, batch_size: int = 32):
    """Greedy draft continuations of each context: ``[len(contexts), steps, 2]`` (ent, top1).

    A plain batched greedy loop (left padding, explicit positions, KV cache). HF ``generate``
    is not used: it stops rows at EOS and its min-length rule masks EOS, and a live decoder's
    draft does neither.
    """
    import torch
    from transformers import DynamicCache

    out = np.full((len(contexts), steps, 2), np.nan, np.float32)
    order = np.argsort([len(c) for c in contexts])  # similar lengths batch together
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        rows = [contexts[i] for i in idx]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        with torch.inference_mode():
            for step in range(steps):
                logits = draft(input_ids=ids, attention_mask=mask, position_ids=pos,
                               cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                logits = logits.float()
                out[idx, step] = token_stats(logits.numpy())[:, :2]
                ids = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(ids)], -1)
                pos = pos[:, -1:] + 1
    return out


def trace_prompt(draft, target, prompt_ids: list[int], max_new_tokens: int,
                 eos: int | None, pad: int) -> TraceResult:
    """Profile one prompt in trace mode (greedy)."""
    import torch

    answer, target_top1 = _target_answer(target, prompt_ids, max_new_tokens, eos)
    n = len(answer)
    seq = torch.tensor([list(prompt_ids) + answer.tolist()])
    with torch.inference_mode():  # logits only where an answer token is predicted
        logits = draft(input_ids=seq, logits_to_keep=n + 1).logits[0, :-1].float().numpy()
    stats = token_stats(logits)
    proposal = logits.argmax(-1)
    agree = proposal == answer
    run = agreement_runs(agree)
    # a live decoder may draft past the answer's end when it ended with EOS (it cannot know);
    # the run of agreements then stops at the EOS token, which ends the answer when accepted
    left = max_new_tokens - 1 - np.arange(n)
    cap = np.minimum(np.minimum(GAMMA_MAX, left), n - np.arange(n))
    accept_len = np.minimum(run, cap)

    # What a live step starting at i drafts: up to kmax[i] tokens (it cannot know where an
    # EOS-ended answer stops). Drafted token k sees the true prefix while k - 1 <= run[i];
    # past the first disagreement m = i + run[i] it sees y[:m] + d(m) + its own tokens
    # ("off-track", shared by every step reaching m); past an EOS that the draft agreed with,
    # it sees the whole answer + its own tokens (the "tail").
    kmax = np.minimum(GAMMA_MAX, left)
    on_path = (run == n - np.arange(n))  # agrees all the way through the answer's end
    need = sorted({int(i + run[i]) for i in range(n) if not on_path[i] and kmax[i] >= run[i] + 2})
    contexts = [list(prompt_ids) + answer[:m].tolist() + [int(proposal[m])] for m in need]
    tail_needed = bool(n < max_new_tokens and (on_path & (kmax > n - np.arange(n))).any())
    if tail_needed:
        contexts.append(list(prompt_ids) + answer.tolist())
    cont = _off_track(draft, contexts, GAMMA_MAX, pad) if contexts else None
    off = {m: cont[r] for r, m in enumerate(need)}
    tail = cont[-1] if tail_needed else None

    ent_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    top1_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    for i in range(n):
        r = int(run[i])
        for k in range(1, int(kmax[i]) + 1):
            j = i + k - 1
            if j < n and k - 1 <= r:  # drafted on the true prefix: teacher-forced statistics
                ent_k[i, k - 1], top1_k[i, k - 1] = stats[j, 0], stats[j, 1]
            elif on_path[i]:  # past the answer's EOS
                ent_k[i, k - 1], top1_k[i, k - 1] = tail[j - n]
            else:  # past the first disagreement
                ent_k[i, k - 1], top1_k[i, k - 1] = off[i + r][k - r - 2]
    return TraceResult(answer, max_new_tokens, target_top1, stats, agree, accept_len, cap,
                       ent_k, top1_k)


def trace_rows(tr: TraceResult, ident: dict, costs: dict) -> pd.DataFrame:
    """Step records (one per answer position) of a trace."""
    n = len(tr.answer)
    ema, run, prev = history_arrays(tr.agree, tr.target_top1)
    return pd.DataFrame({
        **{k: [v] * n for k, v in ident.items()},
        "step": np.arange(n, dtype=np.int32),
        "position": np.arange(n, dtype=np.int32),
        "seq_len": np.full(n, n, np.int32),
        "max_new_tokens": np.full(n, tr.max_new_tokens, np.int32),
        "temperature": np.zeros(n, np.float32),
        "mode": "trace",
        "replayable": True,
        "draft_entropy": tr.stats[:, 0], "draft_top1": tr.stats[:, 1],
        "draft_margin": tr.stats[:, 2],
        "target_top1_prev": prev, "agree_ema": ema, "agree_run": run.astype(np.int32),
        "draft_entropy_k": list(tr.ent_k), "draft_top1_k": list(tr.top1_k),
        "accept_len": tr.accept_len.astype(np.int16),
        "accept_cap": tr.accept_cap.astype(np.int16),
        "accept_prob_k": None,
        "cost_draft_s": np.float32(costs["cost_draft_s"]),
        "cost_verify_s": [np.asarray(costs["cost_verify_s"], np.float32)] * n,
        "gamma": pd.array([None] * n, dtype="Int16"),
        "drafted": pd.array([None] * n, dtype="Int16"),
        "t_step_s": np.full(n, np.nan, np.float32),
        "paper_mean_entropy": np.nan, "paper_mean_confidence": np.nan,
        "paper_max_entropy": np.nan, "paper_min_confidence": np.nan,
    })


# ------------------------------------------------------------------------------------ run
def _part_name(compression: str, prompt: Prompt) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt.prompt_id)
    return f"{compression}__{prompt.task}__{safe}.parquet"


def run_profile(*, draft: str, target: str, compressions: list[str], prompts: list[Prompt],
                out: Path, mode: str = "trace", max_new_tokens: int = 96,
                shard: tuple[int, int] = (0, 1), dtype: str = "bfloat16",
                policy: str = "fixed:4", threads: int | None = None,
                temperature: float = 0.0, seed: int = 0) -> Path:
    """Profile prompts x compressions; returns the merged record file (or the shard's)."""
    import torch
    from tqdm import tqdm

    from speckv.decode.costs import measure_costs
    from speckv.llm.load import check_same_tokenizer, load_model

    if threads:
        torch.set_num_threads(threads)
    if mode == "trace" and temperature > 0:
        raise ProfileError("Trace mode profiles greedy decoding (its outcome for every γ rests "
                           "on greedy decoding being lossless). Profile sampling with --mode "
                           "live, which records per-position acceptance probabilities.")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    jobs = [(c, p) for c in compressions for p in prompts]
    jobs = jobs[shard[0] :: shard[1]]
    drafter = load_model(draft, "fp16", dtype=dtype)
    # one metadata file per shard: shards may run at the same time in the same folder
    meta_path = parts / f"runs.{shard[0]}of{shard[1]}.json"
    run_meta = {}
    for f in parts.glob("runs.*.json"):
        run_meta.update(json.loads(f.read_text()))
    for compression in compressions:
        todo = [p for c, p in jobs if c == compression and not (parts / _part_name(c, p)).exists()]
        if not todo:
            continue
        tgt = load_model(target, compression, dtype=dtype)
        check_same_tokenizer(drafter.tokenizer, tgt.tokenizer)
        tok = tgt.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        cost = measure_costs(drafter, tgt)
        run_id = f"{compression}-{uuid.uuid4().hex[:8]}"
        run_meta[run_id] = {
            "draft": draft, "target": target, "compression": compression,
            "compute_dtype": tgt.compute_dtype, "mode": mode, "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "cost": cost.to_json(),
            "max_new_tokens": max_new_tokens, "load_s": tgt.load_s, "shard": list(shard),
        }
        mine = {k: v for k, v in run_meta.items() if v.get("shard") == list(shard)}
        atomic_write(meta_path, lambda tmp, mine=mine: tmp.write_text(json.dumps(mine, indent=2)))
        ident = {"run_id": run_id, "draft_model": draft, "target_model": target,
                 "compression": compression, "compute_dtype": tgt.compute_dtype}
        costs = {"cost_draft_s": cost.cost_draft_s, "cost_verify_s": cost.cost_verify_s}
        rows_done, busy_s = 0, 0.0
        for prompt in tqdm(todo, desc=f"{mode} {compression}", unit="prompt"):
            ids = chat_ids(tok, prompt.text)
            started = time.perf_counter()
            if mode == "trace":
                tr = trace_prompt(drafter.model, tgt.model, ids, max_new_tokens, eos, pad)
                df = trace_rows(tr, {**ident, "task": prompt.task,
                                     "prompt_id": prompt.prompt_id}, costs)
            else:
                df = _live_rows(drafter, tgt, ids, prompt, ident, cost, policy, max_new_tokens,
                                temperature, seed)
            busy_s += time.perf_counter() - started
            rows_done += len(df)
            write_records(df, parts / _part_name(compression, prompt))
        log.info("%s %s: %d records from %d prompts in %.0f s (%.1f records/s)", mode,
                 compression, rows_done, len(todo), busy_s, rows_done / max(busy_s, 1e-9))
        del tgt
    files = sorted(parts.glob("*.parquet"))
    wanted = {_part_name(c, p) for c, p in jobs}
    if shard[1] > 1:
        out = out.with_name(f"{out.stem}.shard{shard[0]}of{shard[1]}{out.suffix}")
    return _merge_parts([f for f in files if f.name in wanted], out, run_meta)


def _merge_parts(files: list[Path], out: Path, run_meta: dict) -> Path:
    if not files:
        raise ProfileError("Nothing was profiled: no prompts fell into this shard.")
    df = read_records(files)
    used = set(df["run_id"])
    return write_records(df, out, {"runs": {k: v for k, v in run_meta.items() if k in used}})


def _live_rows(drafter, tgt, ids, prompt, ident, cost, policy_spec, max_new_tokens,
               temperature: float = 0.0, seed: int = 0):
    """Step records of one live run of the real decoder (mode=live)."""
    from speckv.decode.decoder import SpeculativeDecoder, records_frame
    from speckv.policies import from_spec

    policy = from_spec(policy_spec)
    if policy is None:
        raise ProfileError("--policy ar decodes without a draft: profile a drafting policy "
                           "(fixed:K, heuristic, confidence:T, onnx:PATH).")
    decoder = SpeculativeDecoder(drafter, tgt, policy, costs=cost, run_id=ident["run_id"])
    result = decoder.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, task=prompt.task, prompt_id=prompt.prompt_id)
    df = records_frame(result.steps)
    for key, value in ident.items():
        df[key] = value
    return df
