"""Speculation-length policies: one interface for offline replay and the live decoder.

A step of speculative decoding, as both :mod:`speckv.evaluate.replay` (replay) and
:mod:`speckv.decode.decoder` (live) run it:

1. before the draft runs, ``policy.speculate(pre_ctx)`` (:class:`PreContext`: the pre-draft
   features of :mod:`speckv.runtime.features`, the costs of a plain step and of a step drafting
   each γ) decides whether to speculate at all. If not, the target decodes one token alone
   (cost ``cost_verify_s[0]``); the draft does not run, and its next forward catches up on
   that token too. A policy without a ``speculate`` method always speculates;
2. otherwise the draft's first forward of the step (catch-up on every unseen token + first
   proposal) yields the step's features, and ``gamma = min(policy.choose(ctx),
   ctx.max_gamma)`` is decided, before any more drafting;
3. the draft proposes tokens k = 1..gamma; after token k, ``policy.keep_drafting(k, top1,
   entropy)`` may end drafting early (per-token stopping rules); ``drafted`` <= gamma;
4. the target verifies the drafted tokens in one forward; ``accepted`` of them survive;
5. ``policy.observe(drafted, accepted)`` updates whatever state the policy keeps.

When ``ctx.max_gamma == 0`` (one token left to produce) there is no decision: the step is a
plain target forward and no policy method is called. ``choose`` may also return ``PLAIN``
(0) after the draft has run: the target then decodes one token alone, the draft's forward
already paid (and its proposal scores that token); ``keep_drafting`` and ``observe`` are not
called for a plain step. Deciding before the draft runs (``speculate``) is the cheaper way.

Both decisions are exact under replay: the step features at a γ decision equal the trace's at
that position whatever the policy did before (the catch-up forward completes the history), and
the pre-draft features are the trace's history ``u`` positions back, where ``u`` is the number
of emitted tokens the draft has not scored yet (replay tracks it as the decoder does).

Cost of a step that drafts g tokens after a catch-up over n tokens:
``t_catchup[n] + (g - 1) * cost_draft_s + cost_verify_s[g]``
(:func:`speckv.runtime.costs.drafting_costs`; ``cost_verify_s[g]`` is one target forward over
g+1 tokens, ``cost_verify_s[0]`` a plain autoregressive step). The same formula is used by
replay, the decoder and the learned controller.

Policies whose γ depends only on the features and costs of the step (no state, no
per-token stopping) may also offer ``choose_batch(features [n, F], costs [n, G], tree_costs
[n, T] or None) -> [n]``,
and a pre-draft decision that depends only on its context may offer
``speculate_batch(pre_features [n, P], costs [n, G], plain_cost [n], tree_costs) -> bool
[n]`` (the
decision when no probe is due, see :func:`probe_due`); replay then decides every step of a
record file in a few calls. They must agree with ``choose`` / ``speculate`` row by row.

This module imports numpy only: the live decoder and the torch-free runtime path use it. The
torch-backed chooser for training checkpoints imports torch when it is built, not before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np

from speckv.errors import SpeckvError
from speckv.runtime.contract import UNAVAILABLE_COST
from speckv.runtime.features import (
    COMPRESSIONS,
    GAMMA_MAX,
    GAMMAS,
    MAX_SKIP_RUN,
    lookup_features,
)
from speckv.runtime.proposal import N_DRAFT_OPTIONS, TREE_SIZES, tree_by_size, tree_code

Objective = Literal["tokens_per_s", "tokens_per_step"]
OBJECTIVES: Final = ("tokens_per_s", "tokens_per_step")

#: γ the +2/−1 heuristic starts from. Hugging Face starts at ``num_assistant_tokens`` (20 by
#: default in transformers 5) and never caps it; speckv's candidates stop at γmax = 8, and 4
#: is their middle and the paper's fixed-γ baseline.
HEURISTIC_START: Final = 4
CONFIDENCE_THRESHOLD: Final = 0.4
#: Entropy stop, in nats. Perplexity e^2 ≈ 7.4: past 2 nats the draft is as unsure as a
#: uniform pick among more than seven tokens, a token it is unlikely to share with the
#: target. It is a scale-free reading of "lost": it does not depend on the vocabulary size
#: (a uniform distribution over 49k tokens has 10.8 nats), and since top-1 ≥ exp(−entropy)
#: the rule keeps drafting only while top-1 ≥ e^-2 ≈ 0.14, so it stops later than the 0.4
#: confidence rule: the two bracket "mild doubt" and "lost cause". A starting point, not a
#: tuned value: compare thresholds on real records with ``speckv evaluate --policy entropy:T``.
ENTROPY_THRESHOLD: Final = 2.0
EMA_RATE: Final = 0.5
EMA_START: Final = float(HEURISTIC_START - 1)  # first γ = round(3) + 1 = 4, like the heuristic

#: what ``choose`` returns for a plain target step (no speculation this step).
PLAIN: Final = 0
#: per-token statistics ``keep_drafting`` may read; a policy lists those it needs in
#: ``token_stats`` (the decoder computes only those), and one without the attribute gets both.
TOKEN_STATS: Final = frozenset({"top1", "entropy"})

SPECS: Final = ("ar", "fixed:K", "tree:N", "heuristic", "confidence:T", "entropy:T", "ema",
                "oracle", "onnx:PATH", "ckpt:PATH", "lookup:M", "lookup:M+SPEC", "lookup:auto+SPEC",
                "join:M+SPEC")


class PolicyError(SpeckvError, ValueError):
    """A policy was built or used wrongly; the message says what to pass instead."""


@dataclass
class StepContext:
    """What a policy may look at when it chooses γ (all known before drafting)."""

    features: np.ndarray  # [N_FEATURES], speckv.runtime.features.FEATURE_NAMES order
    compression: str
    position: int  # tokens generated before this step
    max_gamma: int  # most tokens this step may draft (γmax, or fewer near the end)
    costs: np.ndarray  # [len(GAMMAS)] seconds of a step drafting each candidate γ
    #: [len(TREES)] seconds of a step verifying each tree (speckv.runtime.proposal.TREES), or
    #: None where tree costs were not measured (no tree can be priced)
    tree_costs: np.ndarray | None = None
    #: the step's true accepted length (of γmax drafted tokens), less one when it runs to the
    #: answer's end (an accepted EOS ends the answer without a bonus token, so those drafted
    #: tokens gain nothing over the target's own): the step makes min(L, γ) + 1 tokens. Only
    #: offline replay knows it and fills it in; only :class:`Oracle` may read it. ``None``
    #: in the live decoder.
    oracle_accept_len: int | None = None
    #: the same for each tree (replay only, for :class:`Oracle`)
    oracle_tree_accept: np.ndarray | None = None


@dataclass
class PreContext:
    """What a policy may look at when it decides whether to speculate (before the draft)."""

    features: np.ndarray  # [N_PRE_FEATURES], speckv.runtime.features.PRE_FEATURE_NAMES order
    compression: str
    position: int  # tokens generated before this step
    max_gamma: int  # most tokens this step may draft
    costs: np.ndarray  # [len(GAMMAS)] seconds of a step drafting each γ (catch-up included)
    plain_cost: float  # seconds of a plain target step
    unseen: int  # tokens the draft's next forward catches up on (unsettled + 1)
    skipped: int  # plain steps this policy chose in a row just before this one
    #: as :attr:`StepContext.oracle_accept_len` (replay only, for :class:`Oracle`)
    oracle_accept_len: int | None = None
    tree_costs: np.ndarray | None = None  # as StepContext.tree_costs (catch-up included)
    oracle_tree_accept: np.ndarray | None = None


@dataclass
class LookupContext:
    """What a policy may look at when it decides whether to verify the context lookup's
    continuation (:mod:`speckv.runtime.lookup`) instead of running the draft at all: the
    proposal's signals (:class:`~speckv.runtime.lookup.LookupProposal`: how many tokens, the
    matched suffix's length, its earlier occurrences, how many of them the first proposed
    token followed), what the step costs (one target forward over the tokens and the last
    emitted one; no draft forward), and everything :class:`PreContext` holds."""

    pre: PreContext
    length: int
    match: int
    occurrences: int
    agreeing: int
    cost: float  # seconds: the target's forward over length + 1 tokens
    #: the proposal's true accepted length (replay only)
    oracle_accept_len: int | None = None


def probe_due(skipped: int, max_skip_run: int = MAX_SKIP_RUN) -> bool:
    """After ``max_skip_run`` plain steps in a row a policy drafts anyway (a probe): the
    history stops growing while the draft does not run, so only drafting can show that it
    has become worth it again. It also bounds the catch-up forward and the staleness the
    pre-draft features see (:data:`speckv.runtime.features.MAX_SKIP_RUN`)."""
    return skipped >= max_skip_run


class Policy(Protocol):
    """A policy may also offer ``lookup(ctx: LookupContext) -> bool`` (asked first, before
    ``speculate``, whenever the context lookup proposes tokens): True verifies the lookup's
    continuation in this step and the draft does not run. Without it the policy never uses
    the context lookup. And it may offer ``join_lookup(length, match, occurrences, agreeing)
    -> bool`` (asked in each tree step whenever the lookup proposes tokens, with the
    proposal's signals as in :class:`LookupContext`): True adds the lookup's continuation to
    the tree as one more branch, verified in the same target forward (greedy decoding
    only)."""

    name: str

    def reset(self) -> None:
        """Start of a new sequence."""

    def speculate(self, ctx: PreContext) -> bool:
        """Before the draft runs: draft this step (True) or a plain target step (False)?
        Optional: a policy without it always speculates."""

    def choose(self, ctx: StepContext) -> int:
        """How many tokens to draft at most (1..GAMMA_MAX), decided after the draft's first
        forward; or ``PLAIN`` (0): a plain target step (see the module docstring)."""

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        """After drafting token k (1-based) with these draft statistics: draft token k+1?"""

    def observe(self, drafted: int, accepted: int) -> None:
        """Outcome of the step just verified."""


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise PolicyError(f"Unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}.")


class _Stateless:
    """Defaults for policies that keep no state (and, unless overridden, never stop early)."""

    name: str

    #: per-token statistics keep_drafting reads (none: it never stops early)
    token_stats: frozenset[str] = frozenset()

    def reset(self) -> None:
        pass

    def speculate(self, ctx: PreContext) -> bool:
        return True

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class FixedGamma(_Stateless):
    """Always draft the same number of tokens."""

    def __init__(self, gamma: int) -> None:
        if not 1 <= gamma <= GAMMA_MAX:
            raise PolicyError(f"fixed γ must lie in 1..{GAMMA_MAX}, got {gamma}.")
        self.gamma = gamma
        self.name = f"fixed:{gamma}"

    def choose(self, ctx: StepContext) -> int:
        return self.gamma


class FixedTree(_Stateless):
    """Every step verifies the same tree of ``size`` nodes grown from the draft
    (:data:`speckv.runtime.proposal.TREES`; near the budget's end no deeper than the tokens
    left)."""

    def __init__(self, size: int) -> None:
        try:
            self.code = tree_code(tree_by_size(size))
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
        self.size = size
        self.name = f"tree:{size}"

    def choose(self, ctx: StepContext) -> int:
        return self.code


class _Wrapping:
    """A rule around another policy (``inner``), which makes the step's other decisions."""

    name: str
    inner: Policy | None

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def choose(self, ctx: StepContext) -> int:
        return self.inner.choose(ctx)

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return self.inner.keep_drafting(k, top1, entropy)

    def observe(self, drafted: int, accepted: int) -> None:
        self.inner.observe(drafted, accepted)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LookupRule(_Wrapping):
    """Verify the context lookup's continuation whenever its match is at least ``min_match``
    tokens (no draft forward); otherwise do what ``inner`` does (a drafting policy), or, with
    no inner policy, take a plain step: ``lookup:M`` is lookup decoding alone (Hugging Face's
    prompt lookup, which also falls back to plain steps), ``lookup:M+SPEC`` combines it with
    any drafting policy, the learned controller included."""

    def __init__(self, min_match: int = 1, inner: Policy | None = None) -> None:
        if min_match < 1:
            raise PolicyError(f"lookup needs a match of at least 1 token, got {min_match}.")
        self.min_match = int(min_match)
        self.inner = inner
        self.name = f"lookup:{min_match}" + (f"+{inner.name}" if inner is not None else "")
        self.token_stats = getattr(inner, "token_stats", frozenset())
        self.max_skip_run = int(getattr(inner, "max_skip_run", MAX_SKIP_RUN))

    def lookup(self, ctx: LookupContext) -> bool:
        return ctx.match >= self.min_match

    def speculate(self, ctx: PreContext) -> bool:
        if self.inner is None:
            return False
        inner = getattr(self.inner, "speculate", None)
        return True if inner is None else bool(inner(ctx))


class LearnedLookup(LookupRule):
    """The learned controller chooses the source: before the draft runs, wherever the context
    lookup proposes, verify its continuation when the controller's lookup head expects more
    tokens per unit of cost from it than from a plain step or any draft option
    (:func:`speckv.train.network.lookup_rule`); otherwise ``inner`` (the same controller)
    decides as it would alone. ``lookup:auto+SPEC`` with SPEC ``onnx:PATH`` or ``ckpt:PATH``."""

    def __init__(self, inner: Policy) -> None:
        if not callable(getattr(inner, "choose_lookup", None)):
            raise PolicyError(f"lookup:auto needs a learned controller to choose the source "
                              f"(onnx:PATH or ckpt:PATH), not {getattr(inner, 'name', inner)!r}."
                              " A fixed rule is lookup:M+SPEC.")
        super().__init__(1, inner)
        self.name = f"lookup:auto+{inner.name}"

    def lookup(self, ctx: LookupContext) -> bool:
        return self.inner.choose_lookup(ctx)


class JoinLookup(_Wrapping):
    """``inner``, with the context lookup's continuation joined to every tree it chooses as
    one more branch whenever the lookup's match is at least ``min_match`` tokens: one target
    forward verifies the draft's candidates and the context's together, and the step accepts
    the longer of the two walks (:meth:`speckv.runtime.proposal.Proposal.with_branch`).
    Chains and plain steps are ``inner``'s unchanged. ``join:M+SPEC``; greedy decoding only
    (the tree's rejection sampling does not cover a deterministic branch)."""

    def __init__(self, min_match: int, inner: Policy) -> None:
        if min_match < 1:
            raise PolicyError(f"join needs a match of at least 1 token, got {min_match}.")
        self.min_match = int(min_match)
        self.inner = inner
        self.name = f"join:{min_match}+{inner.name}"
        self.token_stats = getattr(inner, "token_stats", TOKEN_STATS)
        self.max_skip_run = int(getattr(inner, "max_skip_run", MAX_SKIP_RUN))
        for name in ("lookup", "speculate"):  # what the decoder and replay look for
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def join_lookup(self, length: int, match: int, occurrences: int, agreeing: int) -> bool:
        return match >= self.min_match


class BestFixed(_Stateless):
    """A fixed γ per compression level, the best one on the training prompts.

    Fitted on training records by :func:`speckv.evaluate.baselines.fit_best_fixed`; the
    constructor takes the already chosen ``{compression: γ}``.
    """

    def __init__(self, gammas: Mapping[str, int], name: str = "best_fixed") -> None:
        for comp, g in gammas.items():
            if comp not in COMPRESSIONS or not 1 <= int(g) <= GAMMA_MAX:
                raise PolicyError(f"BestFixed needs γ in 1..{GAMMA_MAX} per compression "
                                  f"({', '.join(COMPRESSIONS)}); got {comp!r}: {g!r}.")
        self.gammas = {c: int(g) for c, g in gammas.items()}
        self.name = name

    @classmethod
    def from_scores(cls, scores: Mapping[str, Any]) -> BestFixed:
        """From ``{compression: [fixed:1, ..., fixed:8]}`` objective values, or the
        ``[plain, fixed:1..8]`` rows of :func:`speckv.evaluate.baselines.static_scores`
        (plain is then ignored); near-ties go to the smaller γ."""
        out = {}
        for comp, row in scores.items():
            row = np.asarray(row, np.float64)
            if row.shape == (GAMMA_MAX + 1,):
                row = row[1:]
            if row.shape != (len(GAMMAS),):
                raise PolicyError(f"BestFixed.from_scores needs {len(GAMMAS)} scores per "
                                  f"compression; got {row.shape} for {comp!r}.")
            out[comp] = _best_choice(row, GAMMAS[0])
        return cls(out)

    def choose(self, ctx: StepContext) -> int:
        try:
            return self.gammas[ctx.compression]
        except KeyError:
            raise PolicyError(
                f"{self.name} has no γ for compression {ctx.compression!r}: it was fitted on "
                f"{', '.join(sorted(self.gammas)) or 'nothing'}. Fit it on records that include "
                "that compression level."
            ) from None


class Plain(_Stateless):
    """Plain decoding: every step is the target alone (``speculate`` is always False).

    In replay this is the target-alone baseline (its time is ``seq_len * cost_verify_s[0]``);
    the live decoder spells it ``policy=None`` (spec ``ar``), which also skips the draft.
    """

    name = "plain"

    def speculate(self, ctx: PreContext) -> bool:
        return False

    def speculate_batch(self, pre_features, costs, plain_cost, tree_costs=None) -> np.ndarray:
        return np.zeros(len(pre_features), bool)

    def choose(self, ctx: StepContext) -> int:
        return PLAIN


def _best_choice(scores: np.ndarray, first: int) -> int:
    """Index (offset by ``first``) of the best score; a near-tie (relative 1e-9, i.e. float
    noise) goes to the earlier, cheaper candidate (plain, then the smaller γ)."""
    scores = np.asarray(scores, np.float64)
    finite = np.where(np.isfinite(scores), scores, -np.inf)
    best = float(finite.max())
    return first + int(np.flatnonzero(finite >= best - 1e-9 * abs(best))[0])


class BestStatic(_Stateless):
    """Per compression, the best of plain decoding and fixed γ = 1..8 on the training prompts.

    The strongest baseline that needs no per-step decision: where speculation does not pay
    at all (a fast target, a weak draft) it decodes plainly: ``speculate`` is False there,
    before the draft runs, so neither replay nor the decoder pays for it. Elsewhere ``choose``
    returns the fitted γ. Fitted by :func:`speckv.evaluate.baselines.fit_best_static`; the
    constructor takes the already made ``{compression: 0..8}`` (0: plain decoding).
    """

    def __init__(self, choices: Mapping[str, int], name: str = "best_static") -> None:
        for comp, g in choices.items():
            if comp not in COMPRESSIONS or not PLAIN <= int(g) < N_DRAFT_OPTIONS:
                raise PolicyError(f"BestStatic needs 0 (plain), γ in 1..{GAMMA_MAX} or a tree "
                                  f"code {GAMMA_MAX + 1}..{N_DRAFT_OPTIONS - 1} per compression "
                                  f"({', '.join(COMPRESSIONS)}); got {comp!r}: {g!r}.")
        self.choices = {c: int(g) for c, g in choices.items()}
        self.name = name

    @classmethod
    def from_scores(cls, scores: Mapping[str, Any]) -> BestStatic:
        """From ``{compression: [plain, fixed:1, ..., fixed:8(, tree:N...)]}`` objective
        values (as :func:`speckv.evaluate.baselines.static_scores` gives, the trees where the
        records have them); near-ties go to plain, then the smaller γ, then the chains."""
        out = {}
        for comp, row in scores.items():
            row = np.asarray(row, np.float64)
            if row.shape not in ((GAMMA_MAX + 1,), (N_DRAFT_OPTIONS,)):
                raise PolicyError(f"BestStatic.from_scores needs {GAMMA_MAX + 1} scores (plain, "
                                  f"γ=1..{GAMMA_MAX}) or {N_DRAFT_OPTIONS} (and every tree) per "
                                  f"compression; got {row.shape} for {comp!r}.")
            out[comp] = _best_choice(row, PLAIN)
        return cls(out)

    def _choice(self, compression: str) -> int:
        try:
            return self.choices[compression]
        except KeyError:
            raise PolicyError(
                f"{self.name} has no choice for compression {compression!r}: it was fitted "
                f"on {', '.join(sorted(self.choices)) or 'nothing'}. Fit it on records that "
                "include that compression level."
            ) from None

    def speculate(self, ctx: PreContext) -> bool:
        return self._choice(ctx.compression) != PLAIN

    def choose(self, ctx: StepContext) -> int:
        return self._choice(ctx.compression)


class Heuristic:
    """Hugging Face's "heuristic" schedule: +2 after a fully accepted step, else −1.

    Starts at ``start``; γ grows by 2 when every drafted token was accepted (as in HF, the
    tokens actually drafted, which near the end of an answer can be fewer than γ) and shrinks
    by 1 otherwise, kept within 1..``cap``.
    """

    def __init__(self, start: int = HEURISTIC_START, cap: int = GAMMA_MAX) -> None:
        if not 1 <= start <= cap <= GAMMA_MAX:
            raise PolicyError(f"heuristic needs 1 <= start <= cap <= {GAMMA_MAX}.")
        self.start, self.cap = start, cap
        self.gamma = start
        self.name = "heuristic"
        self.token_stats: frozenset[str] = frozenset()

    def reset(self) -> None:
        self.gamma = self.start

    def speculate(self, ctx: PreContext) -> bool:
        return True

    def choose(self, ctx: StepContext) -> int:
        return self.gamma

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        if accepted >= drafted:
            self.gamma = min(self.gamma + 2, self.cap)
        else:
            self.gamma = max(self.gamma - 1, 1)


class ConfidenceStop(_Stateless):
    """Draft up to γmax and stop after the first token whose top-1 probability < threshold.

    The low-confidence token itself stays drafted (it is already computed and may be right).
    """

    def __init__(self, threshold: float = CONFIDENCE_THRESHOLD) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise PolicyError(f"confidence threshold must lie in [0, 1], got {threshold}.")
        self.threshold = float(threshold)
        self.name = f"confidence:{threshold:g}"
        self.token_stats = frozenset({"top1"})

    def choose(self, ctx: StepContext) -> int:
        return GAMMA_MAX

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return top1 >= self.threshold


class EntropyStop(_Stateless):
    """Draft up to γmax and stop after the first token whose entropy (nats) > threshold.

    See ``ENTROPY_THRESHOLD`` for why 2 nats is the default.
    """

    def __init__(self, threshold: float = ENTROPY_THRESHOLD) -> None:
        if not threshold > 0 or not math.isfinite(threshold):
            raise PolicyError(f"entropy threshold must be a positive number of nats, got "
                              f"{threshold}.")
        self.threshold = float(threshold)
        self.name = f"entropy:{threshold:g}"
        self.token_stats = frozenset({"entropy"})

    def choose(self, ctx: StepContext) -> int:
        return GAMMA_MAX

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return entropy <= self.threshold


class EmaRule:
    """γ from an exponential moving average of accepted lengths: clip(round(ema) + 1, 1, 8).

    ``ema <- (1 - rate) * ema + rate * accepted`` after every step; rounding is half up.
    """

    def __init__(self, rate: float = EMA_RATE, start: float = EMA_START) -> None:
        if not 0 < rate <= 1:
            raise PolicyError(f"EMA rate must lie in (0, 1], got {rate}.")
        self.rate, self.start = float(rate), float(start)
        self.ema = self.start
        self.name = "ema"
        self.token_stats: frozenset[str] = frozenset()

    def reset(self) -> None:
        self.ema = self.start

    def speculate(self, ctx: PreContext) -> bool:
        return True

    def choose(self, ctx: StepContext) -> int:
        return int(min(max(math.floor(self.ema + 0.5) + 1, 1), GAMMA_MAX))

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        self.ema = (1 - self.rate) * self.ema + self.rate * accepted


class Oracle(_Stateless):
    """Per-step upper bound: knows the step's accepted length L (replay only).

    Before the draft: a plain step when no γ's ``(min(L, γ) + 1) / cost(γ)`` beats a plain
    step's ``1 / plain_cost`` (ties go to the plain step). After it: the γ in 1..max_gamma
    maximising ``(min(L, γ) + 1) / cost(γ)`` (tokens per second) or ``min(L, γ) + 1``
    (tokens per step); ties go to the smaller γ.
    """

    def __init__(self, objective: Objective = "tokens_per_s") -> None:
        _check_objective(objective)
        self.objective = objective
        self.name = "oracle"
        self._gammas = np.asarray(GAMMAS, dtype=np.float64)

    def _values(self, ctx: StepContext | PreContext) -> np.ndarray:
        """Per option code 1..: chains ``1..max_gamma`` (the rest -inf), then the trees
        when the step knows their outcomes and costs."""
        if ctx.oracle_accept_len is None:
            raise PolicyError("The oracle needs each step's true accepted length, which only "
                              "offline replay of trace records knows (`speckv evaluate`); it "
                              "cannot drive the live decoder.")
        m = max(int(ctx.max_gamma), 1)
        tokens = np.full(GAMMA_MAX, -np.inf)
        tokens[:m] = np.minimum(float(ctx.oracle_accept_len), self._gammas[:m]) + 1.0
        costs = np.asarray(ctx.costs, dtype=np.float64)[:GAMMA_MAX]
        if ctx.oracle_tree_accept is not None and ctx.tree_costs is not None:
            tokens = np.concatenate([tokens, np.asarray(ctx.oracle_tree_accept, float) + 1.0])
            costs = np.concatenate([costs, np.asarray(ctx.tree_costs, np.float64)])
        if self.objective == "tokens_per_s":
            tokens = tokens / costs
        return tokens

    def speculate(self, ctx: PreContext) -> bool:
        plain = 1.0 / ctx.plain_cost if self.objective == "tokens_per_s" else 1.0
        return bool(self._values(ctx).max() > plain)

    def choose(self, ctx: StepContext) -> int:
        return int(np.argmax(self._values(ctx))) + 1  # ties: the first, the smallest γ


class Chooser(Protocol):
    """What :class:`Learned` needs: the runtime ``Controller`` or a training checkpoint's
    :class:`speckv.train.chooser.TorchChooser`. A chooser may also offer ``speculate(
    pre_features, costs, plain_cost) -> bool`` (and ``speculate_batch``, ``choose_batch``);
    without it the learned policy always speculates."""

    def choose(self, features: np.ndarray, costs: np.ndarray) -> int:
        """γ for one feature vector ``[N_FEATURES]`` and step costs ``[len(GAMMAS)]``."""


class Learned(_Stateless):
    """The learned controller: its decisions, by expected tokens per unit of cost.

    Before the draft: speculate when the chooser's pre-draft head says so, or when a probe is
    due (:func:`probe_due`, after the chooser's ``max_skip_run`` plain steps in a row). After
    it: the γ with the most expected tokens per unit of cost. The lookup decision
    (:meth:`choose_lookup`) is offered but not asked by this policy alone: wrap it in
    :class:`LearnedLookup` (``lookup:auto+onnx:PATH``) to let it choose the source.
    ``objective="tokens_per_step"`` passes unit costs, so the controller maximises expected
    tokens per step alone (the seed paper's objective; it drifts to the largest γ, and never
    declines to speculate).
    """

    def __init__(self, chooser: Chooser, objective: Objective = "tokens_per_s",
                 name: str = "learned") -> None:
        _check_objective(objective)
        if not callable(getattr(chooser, "choose", None)):
            raise PolicyError(f"Learned needs a chooser with choose(features, costs) -> int; "
                              f"got {type(chooser).__name__}.")
        self.chooser = chooser
        self.objective = objective
        self.name = name
        self.max_skip_run = int(getattr(chooser, "max_skip_run", MAX_SKIP_RUN))
        self._speculate = getattr(chooser, "speculate", None)
        self._speculate_batch = getattr(chooser, "speculate_batch", None)
        if self._speculate is not None:  # replay decides in batches only when it can
            self.speculate_batch = self._batch_speculate

    def _costs(self, costs: np.ndarray, tree_costs: np.ndarray | None = None) -> np.ndarray:
        """The chooser's costs: the chains', then (a controller with trees) the trees', at
        :data:`~speckv.runtime.contract.UNAVAILABLE_COST` where they are not measured."""
        costs = np.asarray(costs, dtype=np.float32)
        extra = int(getattr(self.chooser, "n_options", costs.shape[-1])) - costs.shape[-1]
        if extra > 0:
            trees = (np.broadcast_to(np.asarray(tree_costs, np.float32),
                                     (*costs.shape[:-1], extra))
                     if tree_costs is not None else
                     np.full((*costs.shape[:-1], extra), UNAVAILABLE_COST, np.float32))
            costs = np.concatenate([costs, trees], -1)
        if self.objective == "tokens_per_step":  # unit costs, for the options there are
            return np.where(costs >= UNAVAILABLE_COST, costs, np.float32(1.0))
        return costs

    def _plain(self, plain_cost):
        return np.ones_like(plain_cost) if self.objective == "tokens_per_step" else plain_cost

    def speculate(self, ctx: PreContext) -> bool:
        if self._speculate is None or probe_due(ctx.skipped, self.max_skip_run):
            return True
        return bool(self._speculate(np.asarray(ctx.features, np.float32),
                                    self._costs(ctx.costs, ctx.tree_costs),
                                    float(self._plain(ctx.plain_cost))))

    @property
    def chooses_lookup(self) -> bool:
        """Whether the chooser has a lookup decision (a format-4 controller or checkpoint)."""
        return callable(getattr(self.chooser, "use_lookup", None)) and bool(
            getattr(self.chooser, "has_lookup", True))

    def choose_lookup(self, ctx: LookupContext) -> bool:
        """Verify the context lookup's continuation instead (the controller's lookup head)?"""
        use = getattr(self.chooser, "use_lookup", None)
        if use is None:
            raise PolicyError(f"{type(self.chooser).__name__} has no lookup decision; load a "
                              "controller exported by this speckv (format 4).")
        pre = ctx.pre
        x = lookup_features(pre.features, ctx.length, ctx.match, ctx.occurrences, ctx.agreeing)
        cost = 1.0 if self.objective == "tokens_per_step" else ctx.cost
        return bool(use(x, float(cost), np.asarray(pre.features, np.float32),
                        self._costs(pre.costs, pre.tree_costs),
                        float(self._plain(pre.plain_cost))))

    def _batch_speculate(self, pre_features: np.ndarray, costs: np.ndarray,
                         plain_cost: np.ndarray, tree_costs: np.ndarray | None = None
                         ) -> np.ndarray:
        """The pre-draft decision for many rows (no probe due): ``[n, P]``, ``[n, G]``,
        ``[n]`` (and ``[n, len(TREES)]``) -> bool ``[n]``."""
        pre = np.asarray(pre_features, np.float32)
        costs = self._costs(costs, tree_costs)
        plain = self._plain(np.asarray(plain_cost, np.float32).reshape(-1))
        if self._speculate_batch is not None:
            return np.asarray(self._speculate_batch(pre, costs, plain), dtype=bool)
        return np.array([self._speculate(p, c, float(q))
                         for p, c, q in zip(pre, costs, plain, strict=True)], dtype=bool)

    def choose(self, ctx: StepContext) -> int:
        return int(self.chooser.choose(np.asarray(ctx.features, np.float32),
                                       self._costs(ctx.costs, ctx.tree_costs)))

    def choose_batch(self, features: np.ndarray, costs: np.ndarray,
                     tree_costs: np.ndarray | None = None) -> np.ndarray:
        """The option for many decisions at once (``[n, F]``, ``[n, G]``, and the trees'
        ``[n, len(TREES)]`` -> ``[n]``)."""
        batch = getattr(self.chooser, "choose_batch", None)
        costs = self._costs(costs, tree_costs)
        if batch is not None:
            return np.asarray(batch(np.asarray(features, np.float32), costs), dtype=np.int64)
        return np.array([self.chooser.choose(f, c) for f, c in zip(features, costs, strict=True)],
                        dtype=np.int64)


def load_onnx_chooser(path: str | Path) -> Chooser:
    """The runtime ``Controller`` for an exported ONNX file (numpy + onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"Controller {path} does not exist. Export one with `speckv export "
                          "--ckpt C --out export/speckv.onnx`.")
    try:
        from speckv.runtime import Controller
    except ImportError as exc:
        raise PolicyError(f"The ONNX runtime controller is unavailable ({exc}); evaluate the "
                          "training checkpoint instead with --ckpt C.") from None
    return Controller.load(path)


def _number(spec: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise PolicyError(f"Policy {spec!r}: {text!r} is not {what}.") from None


def from_spec(spec: str, *, objective: Objective = "tokens_per_s",
              load_checkpoint: Callable[[str], Chooser] | None = None) -> Policy | None:
    """Build a policy from its command-line spelling; ``"ar"`` (no speculation) gives None.

    Specs: ``ar``, ``fixed:K``, ``heuristic``, ``confidence:T``, ``entropy:T``, ``ema``,
    ``oracle`` (replay only), ``onnx:PATH`` (exported controller), ``ckpt:PATH`` (training
    checkpoint: needs ``load_checkpoint``, which the training stage provides as
    :func:`speckv.train.chooser.policy_from_spec`). ``objective`` applies to the oracle and
    the learned ones.
    """
    try:
        return _build(spec, objective, load_checkpoint)
    except PolicyError as exc:
        text = str(exc)
        raise PolicyError(text if text.startswith("Policy ") else f"Policy {spec!r}: {text}"
                          ) from None


def _build(spec: str, objective: Objective,
           load_checkpoint: Callable[[str], Chooser] | None) -> Policy | None:
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.lower()
    if kind in ("ar", "heuristic", "ema", "oracle") and sep:
        raise PolicyError(f"Policy {spec!r}: {kind!r} takes no argument.")
    if kind == "ar":
        return None
    if kind == "heuristic":
        return Heuristic()
    if kind == "ema":
        return EmaRule()
    if kind == "oracle":
        return Oracle(objective)
    if kind == "fixed":
        if not arg:
            raise PolicyError(f"Policy {spec!r}: write fixed:K with K in 1..{GAMMA_MAX}.")
        return FixedGamma(_number(spec, arg, int))
    if kind == "lookup":  # lookup:M, lookup:M+SPEC or lookup:auto+SPEC
        match, plus, inner = arg.partition("+")
        inner_policy = _build(inner, objective, load_checkpoint) if plus else None
        if match == "auto":
            if inner_policy is None:
                raise PolicyError(f"Policy {spec!r}: write lookup:auto+onnx:PATH (the "
                                  "controller that chooses the source).")
            return LearnedLookup(inner_policy)
        return LookupRule(_number(spec, match, int) if match else 1, inner_policy)
    if kind == "join":  # join:M+SPEC
        match, plus, inner = arg.partition("+")
        if not plus or not inner:
            raise PolicyError(f"Policy {spec!r}: write join:M+SPEC, e.g. join:1+tree:8 or "
                              "join:2+lookup:3+onnx (SPEC chooses the trees).")
        inner_policy = _build(inner, objective, load_checkpoint)
        if inner_policy is None:
            raise PolicyError(f"Policy {spec!r}: SPEC must draft (a tree policy or one that "
                              "chooses trees), not 'ar'.")
        return JoinLookup(_number(spec, match, int) if match else 1, inner_policy)
    if kind == "tree":
        if not arg:
            raise PolicyError(f"Policy {spec!r}: write tree:N with N in "
                              f"{', '.join(map(str, TREE_SIZES))}.")
        return FixedTree(_number(spec, arg, int))
    if kind == "confidence":
        return ConfidenceStop(_number(spec, arg, float) if arg else CONFIDENCE_THRESHOLD)
    if kind == "entropy":
        return EntropyStop(_number(spec, arg, float) if arg else ENTROPY_THRESHOLD)
    if kind in ("onnx", "ckpt"):
        if not arg:
            raise PolicyError(f"Policy {spec!r}: write {kind}:PATH.")
        if kind == "ckpt" and load_checkpoint is None:
            raise PolicyError("a training checkpoint needs the training stage: use "
                              "speckv.train.chooser.policy_from_spec, or export it first "
                              "(`speckv export`) and pass onnx:PATH.")
        chooser = load_onnx_chooser(arg) if kind == "onnx" else load_checkpoint(arg)
        return Learned(chooser, objective)
    raise PolicyError(f"Policy {spec!r} is unknown; use one of: {', '.join(SPECS)}.")
