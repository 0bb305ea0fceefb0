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
(:mod:`speckv.evaluate.statistics`), one-sided, H1 "learned better". Each prompt's difference is the
time (objective tokens_per_s) or the number of steps (tokens_per_step) the learned policy
saves on that prompt's sequences of the group: every policy emits the same tokens, so the
sum of these differences is positive exactly when the reported pooled ratio (Σ tokens /
Σ seconds) favours the learned policy, and each prompt weighs in as it does in that ratio.
With n prompts in a group the p-value is exact over all 2^n sign patterns up to n = 16
(resolution 1/2^n), else a Monte Carlo estimate from 100,000 seeded patterns (resolution
1/100,001). Each comparison also reports the ratio learned ÷ baseline with its bootstrap CI.
"""


from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pandas as pd

from speckv.errors import SpeckvError
from speckv.policies import PLAIN, Objective, Policy, StepContext
from speckv.records import feature_matrix, sequence_ids
from speckv.runtime.costs import step_costs
from speckv.runtime.features import GAMMA_MAX

log = logging.getLogger(__name__)

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
PARTS: Final = ("tokens", "steps", "drafted", "accepted", "time_s", "target_time_s")


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
            "records with `speckv profile --mode trace ... --out datamodules/NAME/NAME.parquet`."
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
        """``[S, len(PARTS)]`` sums in ``PARTS`` order."""
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


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def metrics(parts: np.ndarray) -> dict[str, np.ndarray]:
    """Ratio-of-sums metrics from summed parts ``[..., len(PARTS)]``."""
    tok, steps, drafted, accepted, t, target = (parts[..., i] for i in range(len(PARTS)))
    return {
        "tokens_per_s": ratio(tok, t),
        "tokens_per_step": ratio(tok, steps),
        "acceptance_rate": ratio(accepted, drafted),
        "speedup": ratio(target, t),
    }


