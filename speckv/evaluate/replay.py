"""``speckv evaluate``: replay every γ policy on held-out trace records and say what it is worth.

Greedy speculative decoding is lossless, so a trace of the target's own answer, with the
draft's proposals at every position, replays ANY policy exactly (see :mod:`speckv.policies`
for what a step is). Replay of one answer of length n decoded with a budget of M new tokens
(n < M when it ended with EOS, which the decoder cannot see coming), tracking ``u``, the
emitted tokens the draft has not scored yet, as the decoder does::

    p = u = 0
    while p < n:
        max_gamma = min(8, M - p - 1)
        if max_gamma == 0: plain target step (cost_verify_s[0], one token)
        if not policy.speculate(pre-draft features at (p, u), ...):   # before the draft
            plain target step (cost_verify_s[0], one token); u += 1; continue
        catch-up over n_u = u + 1 tokens; u = 0
        γ = policy.choose(step features at p, ...)                     # after its first forward
        if γ == 0: plain target step after the draft (t_catchup[n_u] + cost_verify_s[0])
        γ = min(γ, max_gamma)
        drafted = first k < γ where not keep_drafting(k, top1_k, entropy_k), else γ
        accepted = min(accept_len[p], drafted)         # accept_len <= n - p
        time += t_catchup[n_u] + (drafted - 1) * cost_draft_s + cost_verify_s[drafted]
        u = 1 if every drafted token was accepted and a bonus token followed, else 0
        p += min(accepted + 1, n - p)                  # an accepted EOS brings no bonus token

A tree (``choose`` returns a tree's code, :mod:`speckv.runtime.proposal`) accepts the
records' ``tree_accept_len`` of it and costs ``t_catchup[n_u] + t_tree_draft + t_tree_verify``;
every token it makes but the first waits for the next catch-up. A policy with ``lookup``
is asked first, wherever the records' context lookup proposes tokens: taking it costs
``t_verify[length]`` and no draft forward, makes ``lookup_accept + 1`` tokens (fewer at an
accepted EOS), all of which wait for the draft's next catch-up. A policy with
``join_lookup`` that takes the lookup's continuation into a tree accepts the longer of the
tree's and the lookup's recorded walks (exact: see ``Proposal.with_branch``) and pays the
tree's verify grown by the continuation's tokens (:meth:`Traces.joined_verify`, an upper
bound).

The pre-draft features at (p, u) are the trace's history at position ``p - u`` (the settled
part) with the target's confidence and the position at ``p``
(:func:`speckv.runtime.features.pre_from_step_features`); the step features at p are the
trace's. ``t_catchup[n]`` comes from the records' ``cost_catchup_s`` where measured, else it is
one draft token for every ``n`` (:mod:`speckv.runtime.costs`).

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
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pandas as pd

from speckv.errors import SpeckvError
from speckv.policies import (
    PLAIN,
    LookupContext,
    Objective,
    Policy,
    PreContext,
    StepContext,
    probe_due,
)
from speckv.records import LOOKUP_COLUMNS, feature_matrix, llamacpp_rows, sequence_ids
from speckv.runtime.costs import (
    catchup_seconds,
    catchup_table,
    catchup_vector,
    drafting_costs,
    tree_step_costs,
)
from speckv.runtime.features import GAMMA_MAX, pre_from_step_features
from speckv.runtime.proposal import LOOKUP_CODE, N_DRAFT_OPTIONS, N_OPTIONS, TREE_SIZES, TREES

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
    draft: np.ndarray  # [n] seconds of one draft token
    verify: np.ndarray  # [n, GAMMA_MAX + 1] seconds of a target forward over 1.. tokens
    catchup: np.ndarray  # [n, CATCHUP_MAX] seconds of a draft forward over 1.. tokens
    accept: np.ndarray  # [n] accept_len
    top1_k: np.ndarray  # [n, GAMMA_MAX]
    entropy_k: np.ndarray  # [n, GAMMA_MAX]
    starts: np.ndarray  # [S]
    lengths: np.ndarray  # [S] answer length n
    budgets: np.ndarray  # [S] max_new_tokens M of the decoding (M >= n)
    compression: np.ndarray  # [S] str
    task: np.ndarray  # [S] str
    prompt: np.ndarray  # [S] str: task/prompt_id, the unit of resampling
    catchup_measured: bool = False  # any row with a measured catch-up cost
    #: [S] bool: the draft reads the target's states (``draft_kind == "feature"``), so every
    #: token a step emits but the first waits for the next catch-up (None: no such sequence)
    reads_target: np.ndarray | None = None
    #: [n, len(TREES)] each tree's accepted length, its nodes, and its measured growth and
    #: verify seconds (None: records without trees, or without their costs)
    tree_accept: np.ndarray | None = None
    tree_nodes: np.ndarray | None = None
    tree_draft: np.ndarray | None = None
    tree_verify: np.ndarray | None = None
    #: [n, 5] the context lookup at each row: accepted, length, match, occurrences,
    #: agreeing (speckv.runtime.lookup; None: records without it)
    lookup: np.ndarray | None = None
    #: [S] bool: sequences profiled in llama.cpp (their draft is a GGUF file), whose loop
    #: probes at the interval its costs price (speckv.engines.llamacpp.loop_probe_interval)
    llamacpp: np.ndarray | None = None
    _lists: dict[str, list] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_sequences(self) -> int:
        return len(self.starts)

    @property
    def n_rows(self) -> int:
        return len(self.accept)

    @property
    def verify0(self) -> np.ndarray:
        """``[n]`` seconds of a plain target step."""
        return self.verify[:, 0]

    @property
    def costs(self) -> np.ndarray:
        """``[n, len(GAMMAS)]`` seconds of a step drafting each γ after a one-token catch-up."""
        return self.costs_for(1)

    def costs_for(self, unseen: int) -> np.ndarray:
        """``[n, len(GAMMAS)]`` float32: a step drafting each γ whose catch-up covers
        ``unseen`` tokens."""
        key = ("costs", unseen)
        if key not in self._cache:
            self._cache[key] = drafting_costs(self.draft, self.verify, self.catchup, unseen)
        return self._cache[key]

    @property
    def has_trees(self) -> bool:
        """Every row holds each tree's outcome and costs, so tree policies replay."""
        return self.tree_accept is not None and self.tree_draft is not None

    def tree_costs_for(self, unseen: int) -> np.ndarray | None:
        """``[n, len(TREES)]`` float32: a step verifying each tree after a catch-up over
        ``unseen`` tokens (None without trees)."""
        if not self.has_trees:
            return None
        key = ("trees", unseen)
        if key not in self._cache:
            self._cache[key] = tree_step_costs(self.draft, self.tree_draft, self.tree_verify,
                                               self.catchup, unseen)
        return self._cache[key]

    def joined_verify(self, r: int, tree: int, length: int) -> float:
        """Seconds a lookup continuation of ``length`` tokens adds to the verify forward of
        tree ``tree`` at row ``r`` when joined to it as one more branch: the row's tree verify
        costs, linear in the nodes between the measured sizes (beyond the largest, the last
        slope), at the tree's nodes plus ``length`` less at its nodes. An upper bound: the
        branch may share nodes with the tree, and the records do not say how many."""
        sizes = np.asarray(TREE_SIZES, np.float64)
        verify = self.tree_verify[r].astype(np.float64)
        nodes = float(self.tree_nodes[r, tree])

        def at(x: float) -> float:
            if x <= sizes[-1]:
                return float(np.interp(x, sizes, verify))
            slope = (verify[-1] - verify[-2]) / (sizes[-1] - sizes[-2])
            return float(verify[-1] + slope * (x - sizes[-1]))

        return max(at(nodes + length) - at(nodes), 0.0)

    def pre_features_for(self, unsettled: int) -> np.ndarray:
        """``[n, N_PRE_FEATURES]``: each row's pre-draft vector with ``unsettled`` tokens
        unsettled (rows closer than that to their answer's start are never asked for)."""
        key = ("pre", unsettled)
        if key not in self._cache:
            rows = np.arange(self.n_rows)
            first = np.repeat(self.starts, self.lengths)
            settled = np.maximum(rows - unsettled, first)
            self._cache[key] = pre_from_step_features(self.features, self.features[settled],
                                                      unsettled)
        return self._cache[key]

    def as_lists(self) -> dict[str, list]:
        """Python lists of the per-row arrays (scalar access in the replay loop is faster)."""
        if not self._lists:
            self._lists.update(accept=self.accept.tolist(), top1=self.top1_k.tolist(),
                               entropy=self.entropy_k.tolist(), draft=self.draft.tolist(),
                               verify=self.verify.tolist(), catch=self.catchup.tolist(),
                               verify0=self.verify0.tolist())
            if self.lookup is not None:
                self._lists["lookup"] = self.lookup.tolist()
            if self.has_trees:
                self._lists.update(
                    tree_accept=self.tree_accept.tolist(), tree_nodes=self.tree_nodes.tolist(),
                    tree_cost=(self.tree_draft + self.tree_verify).tolist())
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


def _catchup(df: pd.DataFrame, draft: np.ndarray) -> tuple[np.ndarray, bool]:
    """``[n, CATCHUP_MAX]`` catch-up seconds per row (measured, or one draft token) and
    whether any row was measured."""
    table = catchup_table(draft, None)
    column = df["cost_catchup_s"] if "cost_catchup_s" in df.columns else None
    if column is None:
        return table, False
    measured = column.map(lambda v: v is not None and len(v) > 0 and bool(
        np.isfinite(np.asarray(v, np.float64)).all() and (np.asarray(v) > 0).all())
    ).to_numpy(bool)
    for i in np.flatnonzero(measured):
        table[i] = catchup_table(draft[i], np.asarray(column.iat[i], np.float64))
    return table, bool(measured.any())


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
    if not (np.isfinite(verify).all() and (verify > 0).all() and (draft >= 0).all()):
        raise EvaluateError("cost_draft_s / cost_verify_s must be finite and positive; the "
                            "profile's cost measurement failed, re-profile.")
    catchup, measured = _catchup(df, draft)
    first = df.iloc[starts]
    trees = _trees(df, pos, budget)
    return Traces(
        features=feature_matrix(df),
        draft=draft,
        verify=verify,
        catchup=catchup,
        catchup_measured=measured,
        accept=accept,
        top1_k=_stack(df["draft_top1_k"], GAMMA_MAX, "draft_top1_k"),
        entropy_k=_stack(df["draft_entropy_k"], GAMMA_MAX, "draft_entropy_k"),
        starts=starts,
        lengths=lengths,
        budgets=budget[starts],
        compression=first["compression"].astype(str).to_numpy(),
        task=first["task"].astype(str).to_numpy(),
        prompt=sequence_ids(first).to_numpy(),
        reads_target=_reads_target(first),
        lookup=_lookup(df),
        llamacpp=_llamacpp(first),
        **trees,
    )


def _engine_probe(traces: Traces, row: int, max_skip_run: int) -> int:
    """llama.cpp's probe interval at a sequence's costs (its first row's)."""
    from speckv.engines.llamacpp import loop_probe_interval
    from speckv.runtime.costs import StepCosts

    costs = StepCosts(float(traces.draft[row]), traces.verify[row],
                      traces.catchup[row] if traces.catchup_measured else None)
    return loop_probe_interval(costs, int(max_skip_run))


def _llamacpp(first: pd.DataFrame) -> np.ndarray | None:
    """Which sequences llama.cpp profiled (:func:`speckv.records.llamacpp_rows`), or None."""
    kind = llamacpp_rows(first)
    return kind if kind.any() else None


def _lookup(df: pd.DataFrame) -> np.ndarray | None:
    """``[n, 5]`` of :data:`LOOKUP_COLUMNS`, or None unless every row has them."""
    if any(c not in df.columns or df[c].isna().any() for c in LOOKUP_COLUMNS):
        return None
    return np.stack([df[c].to_numpy(np.int64) for c in LOOKUP_COLUMNS], -1)


def _column_or_none(df: pd.DataFrame, name: str, width: int) -> np.ndarray | None:
    """``[n, width]`` from a list column present in every row, else None."""
    if name not in df.columns or df[name].isna().any():
        return None
    return _stack(df[name], width, name)


def _trees(df: pd.DataFrame, position: np.ndarray, budget: np.ndarray) -> dict:
    """The tree columns of :class:`Traces` (all None unless every row has them)."""
    accept = _column_or_none(df, "tree_accept_len", len(TREES))
    grow = _column_or_none(df, "cost_tree_draft_s", len(TREES))
    verify = _column_or_none(df, "cost_tree_verify_s", len(TREES))
    if accept is None or grow is None or verify is None:
        return {}
    if not (np.isfinite(grow).all() and (grow > 0).all() and np.isfinite(verify).all()
            and (verify > 0).all()):
        raise EvaluateError("cost_tree_draft_s / cost_tree_verify_s must be finite and "
                            "positive; the profile's tree cost measurement failed, re-profile.")
    # the nodes a live step verifies: the tree is no deeper than the budget left, and a
    # tree of depth d has at most branch + (d - 1) * branch**2 nodes to keep
    left = (budget - position - 1)[:, None]
    depth = np.minimum([t.depth for t in TREES], np.maximum(left, 1))
    grown = [t.branch for t in TREES] + (depth - 1) * np.square([t.branch for t in TREES])
    nodes = np.minimum([t.size for t in TREES], grown)
    return {"tree_accept": accept.astype(np.int64), "tree_nodes": nodes.astype(np.int64),
            "tree_draft": grow, "tree_verify": verify}


def _reads_target(first: pd.DataFrame) -> np.ndarray | None:
    if "draft_kind" not in first.columns:
        return None
    kind = first["draft_kind"].astype(object).to_numpy()
    reads = np.array([k == "feature" for k in kind], dtype=bool)
    return reads if reads.any() else None


def unsettled_after(made: int, drafted: int, accepted: int, bonus: bool,
                    reads_target: bool) -> int:
    """Tokens a step leaves for the next catch-up: a bonus token after a full acceptance; for
    a draft reading the target's states, every emitted token but the first."""
    if reads_target:
        return made - 1
    return 1 if bonus and accepted == drafted else 0


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
    chosen: np.ndarray  # [S, N_OPTIONS]: how often the policy chose each option code
    #                     (index 0 = a plain target step the policy chose, 1..8 = γ, then the
    #                     trees of speckv.runtime.proposal.TREES)

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
    if not PLAIN <= g < N_DRAFT_OPTIONS:
        raise EvaluateError(f"Policy {name!r} chose {gamma}; choose() must return 1.."
                            f"{GAMMA_MAX} (a chain), {GAMMA_MAX + 1}..{N_DRAFT_OPTIONS - 1} (a "
                            f"tree) or {PLAIN} for a plain target step.")
    return g


class _Decisions:
    """A policy's batch methods, called once per catch-up size or staleness, on demand."""

    def __init__(self, traces: Traces, policy: Policy) -> None:
        self.traces, self.policy = traces, policy
        self.choose_batch = getattr(policy, "choose_batch", None)
        self.speculate_batch = getattr(policy, "speculate_batch", None)
        self.max_skip_run = getattr(policy, "max_skip_run", None)
        self._gammas: dict[int, list[int]] = {}
        self._speculate: dict[int, list[bool]] = {}

    def gammas(self, unseen: int) -> list[int]:
        if unseen not in self._gammas:
            t = self.traces
            got = np.asarray(self.choose_batch(t.features, t.costs_for(unseen),
                                               t.tree_costs_for(unseen))).reshape(-1)
            if len(got) != t.n_rows:
                raise EvaluateError(f"Policy {self.policy.name!r}: choose_batch returned "
                                    f"{len(got)} choices for {t.n_rows} rows.")
            bad = (got < PLAIN) | (got >= N_DRAFT_OPTIONS)
            if bad.any():
                _checked(self.policy.name, got[np.flatnonzero(bad)[0]])
            self._gammas[unseen] = got.astype(np.int64).tolist()
        return self._gammas[unseen]

    def speculate(self, unsettled: int, skipped: int) -> list[bool] | None:
        """Each row's decision at this staleness, or None when a probe is due."""
        if self.max_skip_run is not None and probe_due(skipped, self.max_skip_run):
            return None
        if unsettled not in self._speculate:
            t = self.traces
            got = np.asarray(self.speculate_batch(t.pre_features_for(unsettled),
                                                  t.costs_for(unsettled + 1), t.verify0,
                                                  t.tree_costs_for(unsettled + 1)),
                             dtype=bool).reshape(-1)
            if len(got) != t.n_rows:
                raise EvaluateError(f"Policy {self.policy.name!r}: speculate_batch returned "
                                    f"{len(got)} decisions for {t.n_rows} rows.")
            self._speculate[unsettled] = got.tolist()
        return self._speculate[unsettled]


def replay(traces: Traces, policy: Policy) -> Replay:
    """Replay ``policy`` on every sequence of ``traces`` (see the module docstring).

    A plain step (``speculate`` False before the draft, or ``PLAIN`` from ``choose`` after
    it) makes one token at ``cost_verify_s[0]`` (plus the draft's forward when it ran), with
    no ``keep_drafting`` or ``observe`` call (see :mod:`speckv.policies`).
    """
    S = traces.n_sequences
    lists = traces.as_lists()
    accept, top1, entropy = lists["accept"], lists["top1"], lists["entropy"]
    draft, verify, catch, verify0 = lists["draft"], lists["verify"], lists["catch"], \
        lists["verify0"]
    feats = traces.features
    trees = traces.has_trees
    if trees:
        tree_accept, tree_nodes, tree_cost = (lists["tree_accept"], lists["tree_nodes"],
                                              lists["tree_cost"])
    batch = _Decisions(traces, policy)
    lookup_rule = getattr(policy, "lookup", None)
    if lookup_rule is not None and traces.lookup is None:
        raise EvaluateError(f"Policy {policy.name!r} uses the context lookup, but these "
                            "records hold no lookup columns: re-profile them with this version "
                            "of speckv (`speckv profile --mode trace`).")
    join = getattr(policy, "join_lookup", None)
    if join is not None and (traces.lookup is None or not trees):
        raise EvaluateError(f"Policy {policy.name!r} joins the context lookup to trees, but "
                            "these records lack the lookup or tree columns: re-profile them "
                            "with this version of speckv (`speckv profile --mode trace`).")
    lookup_rows = lists.get("lookup")
    speculate = getattr(policy, "speculate", None)
    choose, keep, observe = policy.choose, policy.keep_drafting, policy.observe
    out = np.zeros((5, S), np.float64)
    chosen = np.zeros((S, N_OPTIONS), np.int64)
    max_skip_run = getattr(policy, "max_skip_run", None)
    for s in range(S):
        start, n = int(traces.starts[s]), int(traces.lengths[s])
        budget = int(traces.budgets[s])
        comp = str(traces.compression[s])
        reads = traces.reads_target is not None and bool(traces.reads_target[s])
        # llama.cpp's loop probes at its own priced interval: the policy sees no plain steps
        # in a row before it (so it does not probe at its own), then all of them
        engine_probe = (_engine_probe(traces, start, max_skip_run)
                        if max_skip_run is not None and traces.llamacpp is not None
                        and traces.llamacpp[s] else None)
        policy.reset()
        p = tokens = steps = drafted_sum = accepted_sum = 0
        unsettled = skipped = 0  # emitted tokens the draft has not scored; plain steps in a row
        t = 0.0
        counts = [0] * N_OPTIONS
        while p < n:
            r = start + p
            left = budget - p - 1
            if left == 0:  # the budget's last token: a plain target step, no decision
                t += verify0[r]
                tokens += 1
                steps += 1
                break
            max_gamma = left if left < GAMMA_MAX else GAMMA_MAX
            unseen = unsettled + 1
            seen = skipped if engine_probe is None or skipped >= engine_probe else 0
            if lookup_rule is not None and lookup_rows[r][1] > 0:
                a, length, match, occurrences, agreeing = lookup_rows[r]
                pre = PreContext(traces.pre_features_for(unsettled)[r], comp, p, max_gamma,
                                 traces.costs_for(unseen)[r], verify0[r], unseen, seen,
                                 _gain(accept[r], n - p), *_tree_context(traces, unseen, r,
                                                                        n - p))
                if lookup_rule(LookupContext(pre, length, match, occurrences, agreeing,
                                             verify[r][length], a)):
                    made = a + 1 if a < n - p else n - p  # an accepted EOS: no bonus token
                    t += verify[r][length]
                    tokens += made
                    steps += 1
                    drafted_sum += length
                    accepted_sum += a
                    counts[LOOKUP_CODE] += 1
                    unsettled += made  # the draft saw none of them
                    skipped += 1
                    p += made
                    continue
            if speculate is not None:
                if batch.speculate_batch is not None:
                    rows = batch.speculate(unsettled, seen)
                    go = rows is None or rows[r]
                else:
                    pre = traces.pre_features_for(unsettled)[r]
                    go = bool(speculate(PreContext(
                        pre, comp, p, max_gamma, traces.costs_for(unseen)[r], verify0[r],
                        unseen, seen, _gain(accept[r], n - p),
                        *_tree_context(traces, unseen, r, n - p))))
                if not go:  # no speculation this step: the target decodes one token alone
                    t += verify0[r]
                    tokens += 1
                    steps += 1
                    counts[PLAIN] += 1
                    p += 1
                    unsettled += 1
                    skipped += 1
                    continue
            skipped = 0
            caught = catchup_seconds(catch[r], unseen)
            if batch.choose_batch is not None:
                g = batch.gammas(unseen)[r]
            else:
                tree_costs, tree_gain = _tree_context(traces, unseen, r, n - p)
                ctx = StepContext(feats[r], comp, p, max_gamma, traces.costs_for(unseen)[r],
                                  tree_costs, _gain(accept[r], n - p), tree_gain)
                g = _checked(policy.name, choose(ctx))
            counts[g] += 1
            if g == PLAIN:  # the draft ran (its proposal scores this position), then plain
                t += caught + verify0[r]
                tokens += 1
                steps += 1
                p += 1
                unsettled = 0
                continue
            if g > GAMMA_MAX:  # a tree: its outcome and cost come from the records
                if not trees:
                    raise EvaluateError(
                        f"Policy {policy.name!r} chose a tree, but these records hold no tree "
                        "outcomes or tree costs: re-profile them with this version of speckv "
                        "(`speckv profile --mode trace`), or replay chain policies only.")
                i = g - GAMMA_MAX - 1
                a = tree_accept[r][i]
                cost = tree_cost[r][i]
                cap = min(TREES[i].depth, max_gamma)
                if join is not None and lookup_rows[r][1] > 0 and join(*lookup_rows[r][1:]):
                    a = max(a, lookup_rows[r][0])  # the longer walk (Proposal.with_branch)
                    cost += traces.joined_verify(r, i, lookup_rows[r][1])
                    cap = max(cap, lookup_rows[r][1])
                made = a + 1 if a < n - p else n - p  # an accepted EOS: no bonus token
                t += caught + cost
                tokens += made
                steps += 1
                drafted_sum += tree_nodes[r][i]
                accepted_sum += a
                observe(cap, a)
                unsettled = made - 1  # the draft keeps none of the tree: all but the first
                p += made
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
            bonus = a < n - p  # the target adds a token after the accepted ones
            made = a + 1 if bonus else n - p  # an accepted EOS: no bonus token
            t += caught + (d - 1) * draft[r] + verify[r][d]
            tokens += made
            steps += 1
            drafted_sum += d
            accepted_sum += a
            observe(d, a)
            unsettled = unsettled_after(made, d, a, bonus, reads)
            p += made
        out[:, s] = (tokens, steps, drafted_sum, accepted_sum, t)
        chosen[s] = counts
    return Replay(policy.name, *out, chosen=chosen)


def _tree_context(traces: Traces, unseen: int, r: int, left: int
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A row's tree costs and (for the oracle) each tree's gain, as :func:`_gain` counts it."""
    if not traces.has_trees:
        return None, None
    accept = traces.tree_accept[r]
    return traces.tree_costs_for(unseen)[r], np.where(accept >= left, accept - 1, accept)


#: codes of the bound's choices besides γ = 1..GAMMA_MAX
_SKIP: Final = 0  # a plain step before the draft
_PLAIN_AFTER_DRAFT: Final = N_OPTIONS  # the draft ran, then a plain step


def replay_bound(traces: Traces, objective: Objective = "tokens_per_s", *,
                 plain_steps: bool = True) -> Replay:
    """The exact best any policy could do on each sequence (an upper bound, not a policy).

    The per-step :class:`~speckv.policies.Oracle` is greedy: after a step capped at γmax it
    can land on the very token the draft gets wrong and pay a whole drafting step for one
    token, where a shorter step before it would have saved time. This dynamic programme finds
    the least total time (or, for ``tokens_per_step``, the fewest steps) over every sequence
    of actions at every position p and every count u of tokens the draft has not scored
    (its catch-up then covers u + 1 tokens): draft d in 1..max_gamma tokens, at
    ``t_catchup[u + 1] + (d - 1)·t_draft + t_verify[d]``, after which u is 1 if all d were
    accepted and a bonus token followed, else 0; a plain step (one token at
    ``t_verify[0]``, u + 1), which covers policies that skip speculation (:class:`BestStatic`,
    the learned one); a plain step after the draft's forward (u back to 0); where the
    records hold them, every tree (its catch-up, growth and verify costs; u becomes the
    tokens made less one) and the context lookup's continuation (no draft forward, the verify
    over its tokens; u grows by the tokens made). So it covers
    every up-front-γ, stop-per-token and skipping policy. Ties go to the plain step, then the
    smaller d. With ``plain_steps=False`` only d >= 1 is tried (the budget's last token stays a
    plain step): the best of the policies that always speculate, named ``BOUND_DRAFTING``;
    that is no bound for a policy taking plain steps.
    """
    S = traces.n_sequences
    lists = traces.as_lists()
    accept, draft, verify, catch = lists["accept"], lists["draft"], lists["verify"], \
        lists["catch"]
    verify0 = lists["verify0"]
    by_time = objective == "tokens_per_s"
    trees = traces.has_trees
    lookup_rows = lists.get("lookup")
    out = np.zeros((5, S), np.float64)
    chosen = np.zeros((S, N_OPTIONS), np.int64)
    for s in range(S):
        start, n = int(traces.starts[s]), int(traces.lengths[s])
        budget = int(traces.budgets[s])
        reads = traces.reads_target is not None and bool(traces.reads_target[s])
        width = n + 1  # u = 0..n
        # columns past u = n are never reached (u <= p), but a lookup's u + made indexes them
        best = np.zeros((n + 1, width + 1 + GAMMA_MAX))
        pick = np.zeros((n, width), np.int64)
        for p in range(n - 1, -1, -1):
            r = start + p
            plain = verify0[r] if by_time else 1.0
            if budget - p - 1 == 0:
                best[p, :width] = plain + best[p + 1, :width]
                continue
            if by_time:
                caught = catchup_vector(traces.catchup[r], width)
            value = np.full(width, np.inf)
            choice = np.zeros(width, np.int64)
            if plain_steps:
                value = plain + best[p + 1, 1:width + 1]
            length = accept[r]
            for d in range(1, min(GAMMA_MAX, budget - p - 1) + 1):
                a = length if length < d else d
                made = min(a + 1, n - p)
                u_next = unsettled_after(made, d, a, a < n - p, reads)
                cost = caught + (d - 1) * draft[r] + verify[r][d] if by_time else 1.0
                v = cost + best[p + made, u_next]
                better = v < value * (1 - 1e-12)
                value = np.where(better, v, value)
                choice[better] = d
            for i in range(len(TREES) if trees else 0):  # every tree; all but one token wait
                made = min(lists["tree_accept"][r][i] + 1, n - p)
                cost = caught + lists["tree_cost"][r][i] if by_time else 1.0
                v = cost + best[p + made, made - 1]
                better = v < value * (1 - 1e-12)
                value = np.where(better, v, value)
                choice[better] = GAMMA_MAX + 1 + i
            if lookup_rows is not None and lookup_rows[r][1] > 0:  # the lookup, no draft
                a, length = lookup_rows[r][0], lookup_rows[r][1]
                made = min(a + 1, n - p)
                v = (verify[r][length] if by_time else 1.0) + best[p + made, made:made + width]
                better = v < value * (1 - 1e-12)
                value = np.where(better, v, value)
                choice[better] = LOOKUP_CODE
            if plain_steps:
                v = (caught + verify0[r] if by_time else 1.0) + best[p + 1, 0]
                better = v < value * (1 - 1e-12)
                value = np.where(better, v, value)
                choice[better] = _PLAIN_AFTER_DRAFT
            best[p, :width] = value
            pick[p] = choice
        p = u = steps = drafted_sum = accepted_sum = 0
        t = 0.0
        while p < n:
            r = start + p
            steps += 1
            if budget - p - 1 == 0:
                t += verify0[r]
                p += 1
                continue
            d = int(pick[p, u])
            if d in (_SKIP, _PLAIN_AFTER_DRAFT):
                chosen[s, 0] += 1  # a plain step by choice, not the budget's last token
                t += verify0[r]
                if d == _SKIP:
                    u += 1
                else:
                    t += catchup_seconds(catch[r], u + 1)
                    u = 0
                p += 1
                continue
            chosen[s, d] += 1
            if d == LOOKUP_CODE:
                a, length = lookup_rows[r][0], lookup_rows[r][1]
                made = min(a + 1, n - p)
                t += verify[r][length]
                drafted_sum += length
                accepted_sum += a
                u += made
                p += made
                continue
            if d > GAMMA_MAX:  # a tree
                i = d - GAMMA_MAX - 1
                a = lists["tree_accept"][r][i]
                t += catchup_seconds(catch[r], u + 1) + lists["tree_cost"][r][i]
                drafted_sum += lists["tree_nodes"][r][i]
                accepted_sum += a
                u = min(a + 1, n - p) - 1
                p += min(a + 1, n - p)
                continue
            a = min(accept[r], d)
            t += catchup_seconds(catch[r], u + 1) + (d - 1) * draft[r] + verify[r][d]
            drafted_sum += d
            accepted_sum += a
            u = unsettled_after(min(a + 1, n - p), d, a, a < n - p, reads)
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


