"""``speckv evaluate``: replay every γ policy on held-out trace records and say what it is worth.

Greedy speculative decoding is lossless, so a trace of the target's own answer, with the
draft's proposals at every position, replays ANY policy exactly (see :mod:`speckv.policies`
for what a step is). Replay of one answer of length n decoded with a budget of M new tokens
(n < M when it ended with EOS, which the decoder cannot see coming)::

    p = 0
    while p < n:
        max_gamma = min(8, M - p - 1)
        if max_gamma == 0: plain target step (cost_verify_s[0], one token)
        γ = policy.choose(ctx)
        if γ == 0: plain target step (cost_verify_s[0], one token); continue
        γ = min(γ, max_gamma)
        drafted = first k < γ where not keep_drafting(k, top1_k, entropy_k), else γ
        accepted = min(accept_len[p], drafted)         # accept_len <= n - p
        time += drafted * cost_draft_s + cost_verify_s[drafted]
        p += min(accepted + 1, n - p)                  # an accepted EOS brings no bonus token

Scores are measured outcomes and the run's measured costs, never a model's predictions.
Statistics follow the design's protocol: the test prompts (records.split_prompts, the same
split as training) are the sample; every figure is a ratio of sums over its group (tokens /
time, tokens / steps, accepted / drafted, target-alone time / time); its 95% CI is a
percentile bootstrap that resamples prompts within each task (the split is stratified by
task), with the same resamples for every policy, so differences are paired.

The learned policy is compared with fixed γ=4, the best fixed γ and the best static choice
(plain decoding or a fixed γ per compression) by an exact paired sign-flip test over prompts
(:mod:`speckv.statistics`), one-sided, H1 "learned better". Each prompt's difference is the
time (objective tokens_per_s) or the number of steps (tokens_per_step) the learned policy
saves on that prompt's sequences of the group: every policy emits the same tokens, so the
sum of these differences is positive exactly when the reported pooled ratio (Σ tokens /
Σ seconds) favours the learned policy, and each prompt weighs in as it does in that ratio.
With n prompts in a group the p-value is exact over all 2^n sign patterns up to n = 16
(resolution 1/2^n), else a Monte Carlo estimate from 100,000 seeded patterns (resolution
1/100,001). Each comparison also reports the ratio learned ÷ baseline with its bootstrap CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from speckv import __version__
from speckv.atomic import atomic_write
from speckv.errors import SpeckvError
from speckv.features import COMPRESSIONS, GAMMA_MAX, GAMMAS
from speckv.policies import (
    OBJECTIVES,
    PLAIN,
    BestFixed,
    BestStatic,
    ConfidenceStop,
    EmaRule,
    EntropyStop,
    FixedGamma,
    Heuristic,
    Learned,
    Objective,
    Oracle,
    Plain,
    Policy,
    StepContext,
    TorchChooser,
    from_spec,
    load_onnx_chooser,
    step_costs,
)
from speckv.records import feature_matrix, read_records, sequence_ids, split_prompts
from speckv.statistics import MIN_DRAWS, ratio_of_sums_differences, sign_flip_test

log = logging.getLogger(__name__)

DEFAULT_RECORDS: Final = "data/records/*.parquet"
DEFAULT_CONTROLLER: Final = "export/speckv.onnx"
RESAMPLES: Final = 10_000
#: the split training uses (speckv.records.split_prompts defaults): evaluation must match it.
SPLIT_VAL: Final = 0.15
SPLIT_TEST: Final = 0.15
SPLIT_SEED: Final = 0
METRICS: Final = ("tokens_per_s", "tokens_per_step", "acceptance_rate", "speedup")
LEARNED: Final = "learned"
BEST_FIXED: Final = "best_fixed"
BEST_STATIC: Final = "best_static"
ORACLE: Final = "oracle"
#: the exact best any policy could do on a trace (dynamic programme; not a policy).
BOUND: Final = "upper_bound"
#: the same programme restricted to steps that draft (γ >= 1): the best of the policies that
#: always speculate; it does not bound a policy that takes plain steps (best_static may beat it).
BOUND_DRAFTING: Final = "upper_bound_drafting"
FIXED4: Final = "fixed:4"
#: the learned policy's comparisons: JSON key -> baseline policy.
COMPARISONS: Final = (("vs_fixed4", FIXED4), ("vs_best_fixed", BEST_FIXED),
                      ("vs_best_static", BEST_STATIC))
#: sums kept per sequence and policy; every metric is a ratio of two of them.
_PARTS: Final = ("tokens", "steps", "drafted", "accepted", "time_s", "target_time_s")


class EvaluateError(SpeckvError):
    """Evaluation cannot run on this input; the message says what to do."""


# -------------------------------------------------------------------------------- traces
@dataclass
class Traces:
    """Trace records ready for replay: rows sorted by sequence, then position.

    A sequence is one answer: ``(run_id, compression, task, prompt_id)``; its rows are
    positions ``0..seq_len-1``, rows ``starts[s] .. starts[s] + lengths[s]``.
    """

    features: np.ndarray  # [n, N_FEATURES] float32
    costs: np.ndarray  # [n, len(GAMMAS)] float32: seconds of a step drafting each γ
    verify0: np.ndarray  # [n] seconds of a plain target step
    accept: np.ndarray  # [n] accept_len
    top1_k: np.ndarray  # [n, GAMMA_MAX]
    entropy_k: np.ndarray  # [n, GAMMA_MAX]
    starts: np.ndarray  # [S]
    lengths: np.ndarray  # [S] answer length n
    budgets: np.ndarray  # [S] max_new_tokens M of the decoding (M >= n)
    compression: np.ndarray  # [S] str
    task: np.ndarray  # [S] str
    prompt: np.ndarray  # [S] str: task/prompt_id, the unit of resampling
    _lists: dict[str, list] = field(default_factory=dict, repr=False)

    @property
    def n_sequences(self) -> int:
        return len(self.starts)

    @property
    def n_rows(self) -> int:
        return len(self.accept)

    def as_lists(self) -> dict[str, list]:
        """Python lists of the per-row arrays (scalar access in the replay loop is faster)."""
        if not self._lists:
            self._lists.update(accept=self.accept.tolist(), top1=self.top1_k.tolist(),
                               entropy=self.entropy_k.tolist(),
                               costs=self.costs.astype(np.float64).tolist(),
                               verify0=self.verify0.tolist())
        return self._lists

    def target_time(self) -> np.ndarray:
        """Seconds the target alone needs for each sequence: ``seq_len * cost_verify_s[0]``."""
        return self.lengths * self.verify0[self.starts]


def _stack(column: pd.Series, width: int, name: str) -> np.ndarray:
    try:
        out = np.stack([np.asarray(v, np.float64) for v in column])
    except ValueError:
        out = None
    if out is None or out.ndim != 2 or out.shape[1] != width:
        raise EvaluateError(f"Column {name!r} must hold {width} values per row; re-profile the "
                            "records with this version of speckv.")
    return out


def replayable_rows(df: pd.DataFrame, warn: bool = True) -> np.ndarray:
    """Mask of the rows replay can use; refuses records without any, saying what to do."""
    replayable = df["replayable"].to_numpy(bool)
    if not replayable.any():
        modes = ", ".join(sorted(set(df["mode"].astype(str))))
        raise EvaluateError(
            f"None of the {len(df)} rows is replayable (mode: {modes}). Replay needs trace "
            "records, which hold the outcome of every γ at every answer position; imported "
            "rows (the paper's CSV) and live rows only hold the γ that was run. Make trace "
            "records with `speckv profile --mode trace ... --out data/records/X.parquet`."
        )
    if warn and not replayable.all():
        log.warning("skipping %d non-replayable row(s) (live or imported); replaying %d trace "
                    "row(s)", int((~replayable).sum()), int(replayable.sum()))
    return replayable


def prepare(df: pd.DataFrame) -> Traces:
    """Check that ``df`` holds complete traces and turn it into replay arrays.

    Rows that are not replayable (imported or live) are dropped with a warning; when none
    is left this raises :class:`EvaluateError` saying how to make trace records.
    """
    df = df.loc[replayable_rows(df)]
    key_cols = ["run_id", "compression", "task", "prompt_id"]
    df = df.sort_values([*key_cols, "position"], kind="stable").reset_index(drop=True)
    seq = df.groupby(key_cols, sort=False, observed=True).ngroup().to_numpy()
    if len(seq) > 1 and (np.diff(seq) < 0).any():  # cannot happen after the sort; cheap guard
        raise EvaluateError("Trace rows are not grouped by sequence.")
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    lengths = np.diff(np.r_[starts, len(df)])
    pos = df["position"].to_numpy(np.int64)
    offset = np.arange(len(df)) - np.repeat(starts, lengths)
    seq_len = df["seq_len"].to_numpy(np.int64)
    budget = df["max_new_tokens"].to_numpy(np.int64)
    bad = ((pos != offset) | (seq_len != np.repeat(lengths, lengths))
           | (budget != np.repeat(budget[starts], lengths)) | (budget < seq_len))
    if bad.any():
        row = df.iloc[int(np.flatnonzero(bad)[0])]
        raise EvaluateError(
            f"The trace of {row['task']}/{row['prompt_id']} at {row['compression']} (run "
            f"{row['run_id']}) is incomplete, duplicated or inconsistent: a trace needs exactly "
            "one row per answer position 0..seq_len-1, all with the same seq_len and "
            "max_new_tokens >= seq_len. Merge all shards of the profile (`speckv records "
            "merge`) or re-profile that prompt."
        )
    accept = df["accept_len"].to_numpy(np.int64)
    cap = np.minimum(np.minimum(GAMMA_MAX, budget - pos - 1), seq_len - pos)
    if (accept > cap).any():
        raise EvaluateError("Some trace rows accept more tokens than a step could draft there "
                            "(accept_len > min(8, max_new_tokens - position - 1, seq_len - "
                            "position)); re-profile them.")
    verify = _stack(df["cost_verify_s"], GAMMA_MAX + 1, "cost_verify_s")
    draft = df["cost_draft_s"].to_numpy(np.float64)
    costs = step_costs(draft, verify)
    if not (np.isfinite(verify).all() and (verify > 0).all() and (draft >= 0).all()):
        raise EvaluateError("cost_draft_s / cost_verify_s must be finite and positive; the "
                            "profile's cost measurement failed, re-profile.")
    first = df.iloc[starts]
    return Traces(
        features=feature_matrix(df),
        costs=costs,
        verify0=verify[:, 0],
        accept=accept,
        top1_k=_stack(df["draft_top1_k"], GAMMA_MAX, "draft_top1_k"),
        entropy_k=_stack(df["draft_entropy_k"], GAMMA_MAX, "draft_entropy_k"),
        starts=starts,
        lengths=lengths,
        budgets=budget[starts],
        compression=first["compression"].astype(str).to_numpy(),
        task=first["task"].astype(str).to_numpy(),
        prompt=sequence_ids(first).to_numpy(),
    )


# -------------------------------------------------------------------------------- replay
@dataclass
class Replay:
    """Per-sequence totals of one policy's replay (arrays ``[S]``) and its choices."""

    name: str
    tokens: np.ndarray
    steps: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    time_s: np.ndarray
    chosen: np.ndarray  # [S, GAMMA_MAX + 1]: how often the policy chose each γ (index = γ;
    #                     index 0 = a plain target step the policy chose)

    def parts(self, target_time: np.ndarray) -> np.ndarray:
        """``[S, len(_PARTS)]`` sums in ``_PARTS`` order."""
        return np.stack([self.tokens, self.steps, self.drafted, self.accepted, self.time_s,
                         target_time], -1).astype(np.float64)


def _gain(accept_len: int, left: int) -> int:
    """What ``StepContext.oracle_accept_len`` holds: the accepted length, less one when it
    reaches the answer's end (an accepted EOS ends the answer without a bonus token, so
    drafting it gains nothing over letting the target emit it)."""
    return accept_len - 1 if accept_len >= left else accept_len


def _checked(name: str, gamma: Any) -> int:
    g = int(gamma)
    if not PLAIN <= g <= GAMMA_MAX:
        raise EvaluateError(f"Policy {name!r} chose γ={gamma}; choose() must return 1.."
                            f"{GAMMA_MAX}, or {PLAIN} for a plain target step.")
    return g


def replay(traces: Traces, policy: Policy) -> Replay:
    """Replay ``policy`` on every sequence of ``traces`` (see the module docstring).

    A choice of ``PLAIN`` (0) is a plain target step: one token at ``cost_verify_s[0]``, no
    drafting, no ``keep_drafting`` or ``observe`` call (see :mod:`speckv.policies`).
    """
    S = traces.n_sequences
    lists = traces.as_lists()
    accept, top1, entropy = lists["accept"], lists["top1"], lists["entropy"]
    costs, verify0 = lists["costs"], lists["verify0"]
    feats, cost_rows = traces.features, traces.costs
    pre: list[int] | None = None
    batch = getattr(policy, "choose_batch", None)
    if callable(batch):  # stateless policy: decide every row at once
        pre_arr = np.asarray(batch(traces.features, traces.costs)).reshape(-1)
        if len(pre_arr) != traces.n_rows:
            raise EvaluateError(f"Policy {policy.name!r}: choose_batch returned {len(pre_arr)} "
                                f"choices for {traces.n_rows} rows.")
        bad = (pre_arr < PLAIN) | (pre_arr > GAMMA_MAX)
        if bad.any():
            _checked(policy.name, pre_arr[np.flatnonzero(bad)[0]])
        pre = pre_arr.astype(np.int64).tolist()
    choose, keep, observe = policy.choose, policy.keep_drafting, policy.observe
    out = np.zeros((5, S), np.float64)
    chosen = np.zeros((S, GAMMA_MAX + 1), np.int64)
    for s in range(S):
        start, n = int(traces.starts[s]), int(traces.lengths[s])
        budget = int(traces.budgets[s])
        comp = str(traces.compression[s])
        policy.reset()
        p = tokens = steps = drafted_sum = accepted_sum = 0
        t = 0.0
        counts = [0] * (GAMMA_MAX + 1)
        while p < n:
            r = start + p
            left = budget - p - 1
            if left == 0:  # the budget's last token: a plain target step, no decision
                t += verify0[r]
                tokens += 1
                steps += 1
                break
            max_gamma = left if left < GAMMA_MAX else GAMMA_MAX
            if pre is None:
                ctx = StepContext(feats[r], comp, p, max_gamma, cost_rows[r],
                                  _gain(accept[r], n - p))
                g = _checked(policy.name, choose(ctx))
            else:
                g = pre[r]
            counts[g] += 1
            if g == PLAIN:  # no speculation this step: the target decodes one token
                t += verify0[r]
                tokens += 1
                steps += 1
                p += 1
                continue
            if g > max_gamma:
                g = max_gamma
            d = g
            row_top1, row_ent = top1[r], entropy[r]
            for k in range(1, g):  # after token g drafting ends anyway
                if not keep(k, row_top1[k - 1], row_ent[k - 1]):
                    d = k
                    break
            a = accept[r]
            if a > d:
                a = d
            made = a + 1 if a < n - p else n - p  # an accepted EOS: no bonus token
            t += costs[r][d - 1]
            tokens += made
            steps += 1
            drafted_sum += d
            accepted_sum += a
            observe(d, a)
            p += made
        out[:, s] = (tokens, steps, drafted_sum, accepted_sum, t)
        chosen[s] = counts
    return Replay(policy.name, *out, chosen=chosen)


def replay_bound(traces: Traces, objective: Objective = "tokens_per_s", *,
                 plain_steps: bool = True) -> Replay:
    """The exact best any policy could do on each sequence (an upper bound, not a policy).

    The per-step :class:`~speckv.policies.Oracle` is greedy: after a step capped at γmax it
    can land on the very token the draft gets wrong and pay a whole drafting step for one
    token, where a shorter step before it would have saved time. This dynamic programme over
    positions finds the least total time (or, for ``tokens_per_step``, the fewest steps) of
    any sequence of drafted lengths d in 1..max_gamma, which covers every up-front-γ and
    stop-per-token policy: ``T[p] = min_d cost(d) + T[p + min(min(L_p, d) + 1, n - p)]``.
    A plain target step (d = 0: one token at ``cost_verify_s[0]``, what :class:`BestStatic`
    and the target alone do) is a candidate too, so the bound covers policies that skip
    speculation. Drafting more than L_p tokens only costs more, so only d <= max(L_p, 1) is
    tried; ties go to the smaller d (plain first). With ``plain_steps=False`` only d >= 1 is
    tried (the budget's last token stays a plain step): the best of the policies that always
    speculate, named ``BOUND_DRAFTING``; that is no bound for a policy taking plain steps.
    """
    S = traces.n_sequences
    lists = traces.as_lists()
    accept, costs, verify0 = lists["accept"], lists["costs"], lists["verify0"]
    by_time = objective == "tokens_per_s"
    out = np.zeros((5, S), np.float64)
    chosen = np.zeros((S, GAMMA_MAX + 1), np.int64)
    for s in range(S):
        start, n = int(traces.starts[s]), int(traces.lengths[s])
        budget = int(traces.budgets[s])
        best = [0.0] * (n + 1)
        pick = [0] * n  # 0: a plain target step (the budget's last token)
        for p in range(n - 1, -1, -1):
            r = start + p
            if budget - p - 1 == 0:
                best[p] = (verify0[r] if by_time else 1.0) + best[p + 1]
                continue
            row = costs[r]
            value, choice = math.inf, 1
            if plain_steps:
                value, choice = (verify0[r] if by_time else 1.0) + best[p + 1], 0
            for d in range(1, max(accept[r], 1) + 1):
                a = accept[r] if accept[r] < d else d
                v = (row[d - 1] if by_time else 1.0) + best[p + min(a + 1, n - p)]
                if v < value * (1 - 1e-12):
                    value, choice = v, d
            best[p], pick[p] = value, choice
        p = steps = drafted_sum = accepted_sum = 0
        t = 0.0
        while p < n:
            r = start + p
            steps += 1
            d = pick[p]
            if d == 0:
                if budget - p - 1 > 0:
                    chosen[s, 0] += 1  # a plain step by choice, not the budget's last token
                t += verify0[r]
                p += 1
                continue
            a = min(accept[r], d)
            chosen[s, d] += 1
            t += costs[r][d - 1]
            drafted_sum += d
            accepted_sum += a
            p += min(a + 1, n - p)
        out[:, s] = (n, steps, drafted_sum, accepted_sum, t)
    return Replay(BOUND if plain_steps else BOUND_DRAFTING, *out, chosen=chosen)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def metrics(parts: np.ndarray) -> dict[str, np.ndarray]:
    """Ratio-of-sums metrics from summed parts ``[..., len(_PARTS)]``."""
    tok, steps, drafted, accepted, t, target = (parts[..., i] for i in range(len(_PARTS)))
    return {
        "tokens_per_s": _ratio(tok, t),
        "tokens_per_step": _ratio(tok, steps),
        "acceptance_rate": _ratio(accepted, drafted),
        "speedup": _ratio(target, t),
    }


def static_scores(traces: Traces, objective: Objective = "tokens_per_s"
                  ) -> dict[str, np.ndarray]:
    """Objective of plain decoding and every fixed γ per compression, by replay:
    ``{compression: [plain, fixed:1, ..., fixed:8]}`` (index = the choice, 0 = plain)."""
    target = traces.target_time()
    scores: dict[str, list[float]] = {c: [] for c in sorted(set(traces.compression))}
    for pol in [Plain(), *(FixedGamma(g) for g in GAMMAS)]:
        parts = replay(traces, pol).parts(target)
        for comp in scores:
            m = metrics(parts[traces.compression == comp].sum(0))
            scores[comp].append(float(m[objective]))
    return {c: np.asarray(v) for c, v in scores.items()}


def fixed_scores(traces: Traces, objective: Objective = "tokens_per_s") -> dict[str, np.ndarray]:
    """Objective of every fixed γ per compression: ``{compression: [len(GAMMAS)]}``."""
    target = traces.target_time()
    scores: dict[str, list[float]] = {c: [] for c in sorted(set(traces.compression))}
    for g in GAMMAS:
        parts = replay(traces, FixedGamma(g)).parts(target)
        for comp in scores:
            m = metrics(parts[traces.compression == comp].sum(0))
            scores[comp].append(float(m[objective]))
    return {c: np.asarray(v) for c, v in scores.items()}


# ---------------------------------------------------------------------------- statistics
def bootstrap_weights(units: np.ndarray, strata: np.ndarray | None, resamples: int,
                      seed: int) -> np.ndarray:
    """How often each unit is drawn in each resample: ``[resamples, n_units]`` float64.

    Units (prompts) are drawn with replacement within their stratum (task), as many as the
    stratum holds, so every resample keeps the split's task mix.
    """
    units = np.asarray(units)
    n = len(units)
    strata = np.zeros(n, np.int64) if strata is None else np.unique(strata, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, n), np.float64)
    rows = np.arange(resamples)[:, None]
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        np.add.at(weights, (np.broadcast_to(rows, draws.shape), draws), 1.0)
    return weights


def compare(per_prompt: np.ndarray, better: int, baseline: int, objective: Objective, *,
            seed: int = 0, draws: int = MIN_DRAWS) -> dict[str, Any]:
    """Sign-flip test of policy ``better`` against ``baseline`` over the prompts of a group.

    ``per_prompt`` ``[n_prompts, n_policies, len(_PARTS)]`` holds the group's sums per
    prompt (only the group's prompts). The paired difference of a prompt is what the pooled
    objective's denominator loses: seconds (tokens_per_s) or steps (tokens_per_step) saved
    by ``better`` (see :func:`speckv.statistics.ratio_of_sums_differences`). Returns the
    test's JSON entry: ``p``, ``method``, ``resolution``, ``n_prompts``, ``statistic``.
    """
    den = _PARTS.index("time_s" if objective == "tokens_per_s" else "steps")
    tok = _PARTS.index("tokens")
    try:
        diff = ratio_of_sums_differences(per_prompt[:, better, tok], per_prompt[:, better, den],
                                         per_prompt[:, baseline, tok],
                                         per_prompt[:, baseline, den])
    except ValueError as exc:  # replay emits every token once: cannot happen unless broken
        raise EvaluateError(f"Cannot compare the policies prompt by prompt: {exc}") from None
    return sign_flip_test(diff, seed=seed, draws=draws).as_dict()


def _ci(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class _Group:
    name: str
    kind: str  # overall | compression | task | compression_task
    mask: np.ndarray  # [S] sequences in the group


def _groups(traces: Traces) -> list[_Group]:
    comps = [c for c in COMPRESSIONS if c in set(traces.compression)]
    tasks = sorted(set(traces.task))
    out = [_Group("overall", "overall", np.ones(traces.n_sequences, bool))]
    out += [_Group(c, "compression", traces.compression == c) for c in comps]
    out += [_Group(t, "task", traces.task == t) for t in tasks]
    for c in comps:
        for t in tasks:
            mask = (traces.compression == c) & (traces.task == t)
            if mask.any():
                out.append(_Group(f"{c}/{t}", "compression_task", mask))
    return out


def summarize(traces: Traces, replays: dict[str, Replay], objective: Objective,
              resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Every figure of the evaluation, with bootstrap CIs and, for the learned policy, exact
    paired sign-flip tests against the baselines of ``COMPARISONS`` (JSON-ready)."""
    names = list(replays)
    prompts, prompt_idx = np.unique(traces.prompt, return_inverse=True)
    prompt_task = np.empty(len(prompts), dtype=object)
    prompt_task[prompt_idx] = traces.task
    weights = bootstrap_weights(prompts, prompt_task.astype(str), resamples, seed)
    target = traces.target_time()
    parts = np.stack([replays[n].parts(target) for n in names], 1)  # [S, P, K]
    policies: dict[str, dict[str, Any]] = {n: {} for n in names}
    p_values: dict[str, Any] = {"overall": {}, "per_compression": {}, "per_task": {},
                                "per_compression_task": {}}
    target_alone: dict[str, Any] = {}
    for group in _groups(traces):
        per_prompt = np.zeros((len(prompts), *parts.shape[1:]))
        np.add.at(per_prompt, prompt_idx[group.mask], parts[group.mask])
        point = metrics(per_prompt.sum(0))  # each [P]
        boot_parts = (weights @ per_prompt.reshape(len(prompts), -1)).reshape(
            resamples, *per_prompt.shape[1:])
        boot = metrics(boot_parts)  # each [B, P]
        present = (weights @ (np.bincount(prompt_idx[group.mask], minlength=len(prompts)) > 0)) > 0
        boot = {k: np.where(present[:, None], v, np.nan) for k, v in boot.items()}
        oracle = names.index(ORACLE) if ORACLE in names else None
        for i, name in enumerate(names):
            entry: dict[str, Any] = {m: _num(point[m][i]) for m in METRICS}
            cis = {m: _ci(boot[m][:, i]) for m in METRICS}
            entry["ci95"] = cis["tokens_per_s"]
            entry["ci95_by_metric"] = cis
            if oracle is not None:
                entry["regret_to_oracle"] = _num(1 - point["tokens_per_s"][i]
                                                 / point["tokens_per_s"][oracle])
                entry["ci95_by_metric"]["regret_to_oracle"] = _ci(
                    1 - boot["tokens_per_s"][:, i] / boot["tokens_per_s"][:, oracle])
            totals = per_prompt[:, i].sum(0)
            entry.update({k: _num(totals[j]) for j, k in enumerate(_PARTS[:5])})
            entry["n_sequences"] = int(group.mask.sum())
            if group.kind == "overall":
                policies[name].update(entry)
            else:
                policies[name].setdefault(f"per_{group.kind}", {})[group.name] = entry
        tgt = per_prompt[:, 0, _PARTS.index("target_time_s")]
        tok = per_prompt[:, 0, _PARTS.index("tokens")]
        alone = {"tokens_per_s": _num(tok.sum() / tgt.sum()),
                 "ci95": _ci(_ratio(weights @ tok, weights @ tgt))}
        if group.kind == "overall":
            target_alone.update(alone)
        else:
            target_alone.setdefault(f"per_{group.kind}", {})[group.name] = alone
        if LEARNED in names:
            li = names.index(LEARNED)
            members = np.unique(prompt_idx[group.mask])  # the group's prompts: the units
            pv = {}
            for key, base in COMPARISONS:
                if base in names:
                    bi = names.index(base)
                    entry = compare(per_prompt[members], li, bi, objective, seed=seed)
                    entry["ratio"] = _num(point[objective][li] / point[objective][bi])
                    entry["ratio_ci95"] = _ci(boot[objective][:, li] / boot[objective][:, bi])
                    pv[key] = entry
            if group.kind == "overall":
                p_values["overall"] = pv
            else:
                p_values[f"per_{group.kind}"][group.name] = pv
    gamma_hist = {}
    for name in names:
        if name in (BOUND, BOUND_DRAFTING):
            continue
        gamma_hist[name] = {
            c: replays[name].chosen[traces.compression == c, 1:].sum(0).tolist()
            for c in COMPRESSIONS if (traces.compression == c).any()
        }
    tps = {n: _ratio(replays[n].tokens, replays[n].time_s) for n in names}
    beaten: dict[str, dict[str, int]] = {}
    for ref in (ORACLE, BOUND):
        if ref in names:
            beaten[ref] = {n: k for n in names if n not in (ORACLE, BOUND, BOUND_DRAFTING)
                           and (k := int((tps[ref] < tps[n] * (1 - 1e-9)).sum()))}
    if BOUND in names:  # the oracle and the drafting-only bound are policies it must beat too
        for other in (ORACLE, BOUND_DRAFTING):
            if other in names and (k := int((tps[BOUND] < tps[other] * (1 - 1e-9)).sum())):
                beaten[BOUND][other] = k
    bound = policies.pop(BOUND, None)
    bound_drafting = policies.pop(BOUND_DRAFTING, None)
    return {
        "policies": policies,
        "upper_bound": bound,
        "upper_bound_drafting": bound_drafting,
        "target_alone": target_alone,
        "p_value_vs_fixed4": p_values["overall"].get("vs_fixed4"),
        "p_value_vs_best_fixed": p_values["overall"].get("vs_best_fixed"),
        "p_value_vs_best_static": p_values["overall"].get("vs_best_static"),
        "p_value_metric": objective,
        "p_value_test": ("one-sided paired sign-flip test over prompts (H1: learned better); "
                         "per-prompt difference: "
                         + ("seconds" if objective == "tokens_per_s" else "steps")
                         + " saved by the learned policy, whose sum has the sign of the "
                         "pooled ratio's gain; exact over all 2^n sign patterns for n <= 16 "
                         f"prompts, else {MIN_DRAWS} seeded random patterns"),
        "p_values": p_values,
        "gamma_chosen": gamma_hist,
        "oracle_beaten_on_sequences": beaten.get(ORACLE, {}),
        "bound_beaten_on_sequences": beaten.get(BOUND, {}),
        "n_prompts": len(prompts),
        "n_sequences": traces.n_sequences,
        "n_rows": traces.n_rows,
        "resamples": resamples,
        "seed": seed,
    }


# ----------------------------------------------------------------------------- pipeline
def baseline_policies(train: Traces | None, objective: Objective,
                      extra: Sequence[str] = ()) -> list[Policy]:
    """best_static and best_fixed (both fitted on ``train``), fixed:1..8, heuristic,
    confidence, entropy, ema, oracle, and any extra specs."""
    policies: list[Policy] = []
    if train is not None:
        scores = static_scores(train, objective)  # one replay serves both fits
        policies += [BestStatic.from_scores(scores), BestFixed.from_scores(scores)]
    policies += [FixedGamma(g) for g in GAMMAS]
    policies += [Heuristic(), ConfidenceStop(), EntropyStop(), EmaRule(), Oracle(objective)]
    for spec in extra:
        pol = from_spec(spec, objective=objective)
        if pol is None:
            continue  # "ar" is the target-alone baseline, reported anyway
        if any(p.name == pol.name for p in policies):
            raise EvaluateError(f"--policy {spec}: {pol.name!r} is evaluated already.")
        policies.append(pol)
    return policies


def run(records: pd.DataFrame, learned: Policy | None = None, *,
        objective: Objective = "tokens_per_s", split: str = "test", seed: int = 0,
        resamples: int = RESAMPLES, extra: Sequence[str] = (),
        split_fractions: tuple[float, float, int] = (SPLIT_VAL, SPLIT_TEST, SPLIT_SEED),
        ) -> tuple[dict[str, Any], Traces, dict[str, Replay]]:
    """Split by prompt, fit best_static and best_fixed on train, replay every policy on
    ``split``, summarize."""
    if objective not in OBJECTIVES:
        raise EvaluateError(f"--objective must be one of {', '.join(OBJECTIVES)}.")
    if resamples < 1:
        raise EvaluateError("--resamples must be at least 1 (10000 for a reported p-value).")
    usable = replayable_rows(records)  # refuse before the split can complain
    val, test, split_seed = split_fractions
    assign = split_prompts(records, val=val, test=test, seed=split_seed)
    if not (usable & (assign == split)).any():
        raise EvaluateError(f"The {split!r} split holds no replayable prompts.")
    started = time.perf_counter()
    train = prepare(records.loc[usable & (assign == "train")])
    evaluated = prepare(records.loc[usable & (assign == split)])
    policies = baseline_policies(train, objective, extra)
    if learned is not None:
        learned.name = LEARNED
        policies.insert(0, learned)
    replays = {}
    for pol in policies:
        t0 = time.perf_counter()
        replays[pol.name] = replay(evaluated, pol)
        log.debug("replayed %s in %.2fs", pol.name, time.perf_counter() - t0)
    replays[BOUND] = replay_bound(evaluated, objective)
    replays[BOUND_DRAFTING] = replay_bound(evaluated, objective, plain_steps=False)
    replay_s = time.perf_counter() - started
    log.info("replayed %d policies on %d %s sequences (%d rows) and fitted the static "
             "baselines on %d train sequences in %.1fs", len(policies), evaluated.n_sequences,
             split, evaluated.n_rows, train.n_sequences, replay_s)
    t0 = time.perf_counter()
    result = summarize(evaluated, replays, objective, resamples, seed)
    best = next(p for p in policies if isinstance(p, BestFixed))
    static = next(p for p in policies if isinstance(p, BestStatic))
    keys = sequence_ids(records)
    result.update({
        "objective": objective,
        "split": {"name": split, "val": val, "test": test, "seed": split_seed,
                  "train_sequences": train.n_sequences,
                  "prompts": {s: int(keys[assign == s].nunique())
                              for s in ("train", "val", "test")}},
        "best_fixed_gamma": best.gammas,
        "best_static_choice": static.choices,  # 0 = plain decoding (the target alone)
        "learned": {"status": "evaluated" if learned is not None else "skipped"},
        "replay_seconds": round(replay_s, 3),
        "bootstrap_seconds": round(time.perf_counter() - t0, 3),
        "speckv_version": __version__,
    })
    if result["bound_beaten_on_sequences"]:  # cannot happen unless replay is broken
        log.error("the exact upper bound is beaten on some sequences (%s): please report this",
                  result["bound_beaten_on_sequences"])
    return result, evaluated, replays


# ------------------------------------------------------------------------------- output
def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: Sequence[float | None], digits: int = 2) -> str:
    return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_test(entry: dict[str, Any] | None, ratio: bool = True) -> str:
    """``learned ÷ baseline`` and the test of one comparison entry, on one line."""
    if not entry:
        return "–"
    text = f"p = {_fmt_p(entry['p'])} ({entry['method']}; resolution {entry['resolution']:.1e})"
    if ratio and entry.get("ratio") is not None:
        text = f"{entry['ratio']:.3f}x {_fmt_ci(entry['ratio_ci95'], 3)}, " + text
    return text


#: how the table and the report label the rows that are not plain policies.
ORACLE_LABEL: Final = "oracle (per step; not a bound)"
BOUND_LABEL: Final = "upper bound (exact DP)"
BOUND_DRAFTING_LABEL: Final = "best if every step drafts (exact DP)"


def _rows_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every policy's entry, then the exact bound's; the oracle and the bound labelled as
    what they are (only the DP is an upper bound)."""
    rows = [(ORACLE_LABEL if n == ORACLE else n, e) for n, e in result["policies"].items()]
    if result.get("upper_bound_drafting"):
        rows.append((BOUND_DRAFTING_LABEL, result["upper_bound_drafting"]))
    if result.get("upper_bound"):
        rows.append((BOUND_LABEL, result["upper_bound"]))
    return rows


def _table_rows(result: dict[str, Any]) -> list[list[str]]:
    comps = list(result["target_alone"].get("per_compression", {}))
    rows = []
    for name, e in _rows_of(result):
        row = [name, f"{_fmt(e['tokens_per_s'])} {_fmt_ci(e['ci95'])}",
               f"{_fmt(e['speedup'])}x", _fmt(e["tokens_per_step"]),
               _fmt(e["acceptance_rate"]),
               _fmt(None if e.get("regret_to_oracle") is None else 100 * e["regret_to_oracle"], 1)]
        row += [_fmt(e["per_compression"][c]["tokens_per_s"]) for c in comps]
        rows.append(row)
    return rows


def _headers(result: dict[str, Any]) -> list[str]:
    comps = list(result["target_alone"].get("per_compression", {}))
    return ["policy", "tokens/s [95% CI]", "speedup", "tokens/step", "accept", "regret %",
            *(f"{c} tok/s" for c in comps)]


def print_table(result: dict[str, Any], file: Any) -> None:
    """A readable summary (rich) of the overall and per-compression figures."""
    from rich.console import Console
    from rich.table import Table

    tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if tty else 160)
    table = Table(title=f"speckv evaluate: {result['split']['name']} split, "
                        f"{result['n_prompts']} prompts, {result['n_sequences']} sequences "
                        f"(objective {result['objective']})")
    for i, h in enumerate(_headers(result)):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in _table_rows(result):
        table.add_row(*row)
    console.print(table)
    alone = result["target_alone"]
    console.print(f"target alone: {_fmt(alone['tokens_per_s'])} tokens/s "
                  f"{_fmt_ci(alone['ci95'])}; fitted on train per compression: best fixed γ "
                  f"{result['best_fixed_gamma']}, best static {result['best_static_choice']} "
                  "(0 = plain decoding)")
    if result["learned"]["status"] == "evaluated":
        console.print(f"learned ÷ baseline [95% bootstrap CI] and {result['p_value_test']} "
                      f"(metric {result['p_value_metric']}):")
        for key, base in COMPARISONS:
            console.print(f"  vs {base}: {_fmt_test(result['p_values']['overall'].get(key))}")
    else:
        console.print(f"learned policy skipped: {result['learned'].get('reason', '')}")


def _fmt_cell(entry: dict[str, Any] | None) -> str:
    """A report cell: ratio [CI], p (resolution)."""
    if not entry:
        return "–"
    ratio = "–" if entry.get("ratio") is None else f"{entry['ratio']:.3f}x"
    return (f"{ratio} {_fmt_ci(entry.get('ratio_ci95', [None, None]), 3)}, "
            f"p = {_fmt_p(entry['p'])} (res. {entry['resolution']:.1e})")


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """``report.md`` and PNG plots in ``out``; returns the files written."""
    out = Path(out)
    plots = write_plots(result, out)
    comps = list(result["target_alone"].get("per_compression", {}))
    tasks = list(result["target_alone"].get("per_task", {}))
    md = [f"# speckv evaluation ({result['split']['name']} split)", ""]
    md += [f"- records: {', '.join(result.get('records', [])) or '(in memory)'}",
           f"- prompts: {result['n_prompts']}, sequences: {result['n_sequences']}, rows: "
           f"{result['n_rows']} (split by prompt: {result['split']['prompts']})",
           f"- objective: `{result['objective']}`; fitted on the train prompts per "
           f"compression: best fixed γ {result['best_fixed_gamma']}, best static (plain "
           f"decoding or a fixed γ) {result['best_static_choice']} (0 = plain)",
           f"- 95% CIs: percentile bootstrap over prompts (stratified by task), "
           f"{result['resamples']} resamples, seed {result['seed']}; paired across policies",
           f"- learned policy: {result['learned']['status']}"
           + (f" ({result['learned'].get('source')})" if result["learned"].get("source") else "")
           + (f": {result['learned']['reason']}" if result["learned"].get("reason") else ""),
           ""]
    md += ["## Overall", "", _md_table(_headers(result), _table_rows(result)), "",
           f"Target alone: {_fmt(result['target_alone']['tokens_per_s'])} tokens/s "
           f"{_fmt_ci(result['target_alone']['ci95'])}. The `{BOUND_LABEL}` row is the only "
           "upper bound: the best any policy could do on these traces, plain steps included "
           "(a dynamic programme over each answer). The same programme restricted to steps "
           f"that draft gives `{BOUND_DRAFTING_LABEL}`, the best of the policies that always "
           "speculate; the gap between the two is what a per-step \"speculate at all?\" "
           "decision could add at most (replay does not price the draft's longer catch-up "
           "after plain steps, so that gap is optimistic). The per-step oracle knows each "
           "step's accepted length but chooses greedily, step by step: it is not an upper bound "
           "(another policy can beat it on a sequence). Regret is 1 − tokens/s ÷ the per-step "
           "oracle's, so it can be negative.", ""]
    if result["learned"]["status"] == "evaluated":
        md += ["## Is the learned policy better?", "",
               f"Each cell: learned ÷ baseline on `{result['p_value_metric']}` [95% bootstrap "
               f"CI] and the p-value of a {result['p_value_test']}. A group of n prompts "
               "cannot give a p-value below its resolution (1/2^n when exact). The p-values "
               "are per comparison, not corrected for the number of groups.", ""]
        rows = []
        for kind in ("overall", "per_compression", "per_task", "per_compression_task"):
            groups = ({"overall": result["p_values"]["overall"]} if kind == "overall"
                      else result["p_values"][kind])
            for k, v in groups.items():
                first = next((e for e in v.values() if e), None)
                n = str(first["n_prompts"]) if first else "–"
                rows.append([k, n, *(_fmt_cell(v.get(key)) for key, _ in COMPARISONS)])
        md += [_md_table(["group", "prompts", *(f"vs {b}" for _, b in COMPARISONS)], rows), ""]
    for kind, keys, title in (("per_compression", comps, "compression"),
                              ("per_task", tasks, "task")):
        md += [f"## Tokens/s per {title} [95% CI]", ""]
        rows = [[name] + [f"{_fmt(e[kind][k]['tokens_per_s'])} {_fmt_ci(e[kind][k]['ci95'])}"
                          for k in keys] for name, e in _rows_of(result)]
        alone = result["target_alone"][kind]
        rows.append(["target alone"] + [f"{_fmt(alone[k]['tokens_per_s'])} "
                                        f"{_fmt_ci(alone[k]['ci95'])}" for k in keys])
        md += [_md_table(["policy", *keys], rows), ""]
        md += [f"Speedup over the target alone per {title}:", ""]
        rows = [[name] + [f"{_fmt(e[kind][k]['speedup'])}x" for k in keys]
                for name, e in _rows_of(result)]
        md += [_md_table(["policy", *keys], rows), ""]
    if LEARNED in result["gamma_chosen"]:
        md += ["## γ chosen by the learned policy", ""]
        rows = [[c] + [str(n) for n in hist]
                for c, hist in result["gamma_chosen"][LEARNED].items()]
        md += [_md_table(["compression", *map(str, GAMMAS)], rows), ""]
    if result["oracle_beaten_on_sequences"]:
        md += ["The per-step oracle is greedy, not an exact bound: on a few sequences another "
               f"policy beats it ({result['oracle_beaten_on_sequences']}, policy: sequences). "
               f"The `{BOUND_LABEL}` row is the best any policy could do.", ""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    report = atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    return [report, *plots]


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Policy comparison with CIs, the learned policy's γ histograms, regret to the oracle."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    comps = list(result["target_alone"].get("per_compression", {}))
    pol = result["policies"]
    names = list(pol)
    written = []

    fig = Figure(figsize=(4.2 * len(comps), 0.32 * len(names) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(comps), squeeze=False, sharey=True)[0]
    y = np.arange(len(names))[::-1]
    for ax, comp in zip(axes, comps, strict=True):
        e = [pol[n]["per_compression"][comp] for n in names]
        mid = np.array([x["tokens_per_s"] or np.nan for x in e])
        lo = np.array([x["ci95"][0] if x["ci95"][0] is not None else np.nan for x in e])
        hi = np.array([x["ci95"][1] if x["ci95"][1] is not None else np.nan for x in e])
        colors = ["tab:red" if n == LEARNED else "tab:gray" if n == ORACLE else "tab:blue"
                  for n in names]
        ax.barh(y, mid, color=colors, alpha=0.75)
        ax.errorbar(mid, y, xerr=[mid - lo, hi - mid], fmt="none", ecolor="black", capsize=2)
        ax.axvline(result["target_alone"]["per_compression"][comp]["tokens_per_s"],
                   color="black", ls="--", lw=1, label="target alone")
        ax.set_title(comp)
        ax.set_xlabel("tokens/s (95% CI)")
        ax.set_yticks(y, names)
    axes[0].legend(loc="lower right", fontsize="small")
    written.append(_save(fig, out / "policy_comparison.png"))

    hist = result["gamma_chosen"].get(LEARNED)
    if hist:
        fig = Figure(figsize=(4.2 * len(comps), 3.2), layout="constrained")
        axes = fig.subplots(1, len(comps), squeeze=False, sharey=True)[0]
        for ax, comp in zip(axes, comps, strict=True):
            counts = np.asarray(hist[comp], float)
            ax.bar(GAMMAS, counts / max(counts.sum(), 1), color="tab:red", alpha=0.75)
            best = result["best_fixed_gamma"].get(comp)
            if best:
                ax.axvline(best, color="black", ls="--", lw=1, label=f"best fixed γ={best}")
                ax.legend(fontsize="small")
            ax.set_title(f"{comp}: γ chosen by learned")
            ax.set_xlabel("γ")
            ax.set_xticks(GAMMAS)
        axes[0].set_ylabel("share of steps")
        written.append(_save(fig, out / "learned_gamma.png"))

    others = [n for n in names if n != ORACLE and pol[n].get("regret_to_oracle") is not None]
    if others:
        fig = Figure(figsize=(max(6.0, 0.55 * len(others) * len(comps) / 2 + 2), 3.6),
                     layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(comps)
        x = np.arange(len(others))
        for j, comp in enumerate(comps):
            entries = [pol[n]["per_compression"][comp] for n in others]
            vals = np.array([100 * (e["regret_to_oracle"] or 0.0) for e in entries])
            ci = np.array([[np.nan if v is None else 100 * v
                            for v in e["ci95_by_metric"]["regret_to_oracle"]] for e in entries])
            err = np.abs(np.nan_to_num(np.stack([vals - ci[:, 0], ci[:, 1] - vals])))
            ax.bar(x + (j - (len(comps) - 1) / 2) * width, vals, width, label=comp,
                   yerr=err, capsize=1.5, error_kw={"elinewidth": 0.7})
        ax.set_xticks(x, others, rotation=45, ha="right")
        ax.set_ylabel("regret to oracle (% tokens/s, 95% CI)")
        ax.legend(fontsize="small")
        written.append(_save(fig, out / "regret_to_oracle.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ---------------------------------------------------------------------------------- CLI
def _find(pattern: str) -> list[Path]:
    """Files matching ``pattern`` relative to the working directory (the repository root)."""
    return sorted(Path().glob(pattern))


def _learned(args: argparse.Namespace) -> tuple[Policy | None, dict[str, Any]]:
    objective = args.objective
    if args.ckpt:
        return Learned(TorchChooser.load(args.ckpt), objective), {"source": str(args.ckpt)}
    if args.controller:
        return (Learned(load_onnx_chooser(args.controller), objective),
                {"source": str(args.controller)})
    default = _find(DEFAULT_CONTROLLER)
    if not default:
        return None, {"reason": f"no controller given (--ckpt C or --controller X.onnx) and "
                                f"no {DEFAULT_CONTROLLER}"}
    try:
        return Learned(load_onnx_chooser(default[0]), objective), {"source": str(default[0])}
    except SpeckvError as exc:
        log.warning("cannot load the default controller %s: %s", default[0], exc)
        return None, {"reason": f"the default controller {default[0]} could not be loaded: {exc}"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speckv evaluate",
        description="Replay every γ policy on the held-out prompts of trace records: "
                    "tokens/s, speedup, tokens/step, acceptance with bootstrap CIs, and exact "
                    "paired sign-flip tests over prompts of the learned policy against fixed "
                    "γ=4, the best fixed γ and the best static choice (plain decoding or a "
                    "fixed γ per compression).")
    parser.add_argument("--records", nargs="+", metavar="R",
                        help=f"trace record files (default: {DEFAULT_RECORDS})")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="C", help="training checkpoint (.ckpt, or a run folder)")
    src.add_argument("--controller", metavar="X.onnx",
                     help=f"exported controller (default: {DEFAULT_CONTROLLER} if present)")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object with every figure on stdout")
    parser.add_argument("--report", metavar="DIR", type=Path,
                        help="write report.md and PNG plots to DIR")
    parser.add_argument("--objective", choices=OBJECTIVES, default="tokens_per_s",
                        help="what the learned policy, the oracle and best_fixed maximise, and "
                             "the metric of the p-values (default: tokens_per_s)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="prompts to evaluate on (default: test, held out from training)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap and of any Monte Carlo sign-flip test "
                             "(default 0)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"bootstrap resamples (default {RESAMPLES})")
    parser.add_argument("--policy", action="append", default=[], metavar="SPEC",
                        help="evaluate another policy too, e.g. confidence:0.6 (repeatable)")
    parser.add_argument("--val", type=float, default=SPLIT_VAL,
                        help="validation fraction of the split (must match training)")
    parser.add_argument("--test", type=float, default=SPLIT_TEST,
                        help="test fraction of the split (must match training)")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                        help="seed of the split (must match training)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records:
        paths = [Path(p) for p in args.records]
    else:
        paths = _find(DEFAULT_RECORDS)
        if not paths:
            raise EvaluateError(
                f"No records given and none at {DEFAULT_RECORDS}. Make trace records with "
                "`speckv profile --draft D --target T --compression fp16,int8,nf4 --mode "
                "trace --out data/records/X.parquet`, or pass --records R ..."
            )
    learned, learned_info = _learned(args)  # a bad --ckpt/--controller is a PolicyError
    if learned is None:
        log.warning("learned policy skipped: %s; evaluating the baselines only",
                    learned_info["reason"])
    records = read_records(paths)
    result, _, _ = run(records, learned, objective=args.objective, split=args.split,
                            seed=args.seed, resamples=args.resamples, extra=args.policy,
                            split_fractions=(args.val, args.test, args.split_seed))
    result["learned"].update(learned_info)
    result["records"] = [str(p) for p in paths]
    if args.report:
        files = write_report(result, args.report)
        result["report"] = [str(f) for f in files]
        log.info("wrote %s", ", ".join(str(f) for f in files))
    if args.json:
        print_table(result, sys.stderr)
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        print_table(result, sys.stdout)
    return 0
