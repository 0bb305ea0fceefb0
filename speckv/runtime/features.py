"""THE feature definition: draft logits + history -> the decisions' feature vectors.

The profiler, the training data, the replay evaluator, the decoder and the runtime controller
all build features here, so training and serving cannot drift apart. numpy only: the
torch-free runtime imports this module.

A step makes two decisions (docs/EMBEDDING.md, "A step"), and a third before them wherever
the context lookup proposes a continuation (:mod:`speckv.runtime.lookup`): verify it instead
of drafting? Its vector (:data:`LOOKUP_FEATURE_NAMES`, :func:`lookup_features`) is the
proposal's signals before the pre-draft vector of the same moment.

1. **Before the draft runs: speculate at all?** Known then: the agreement history, the
   target's confidence in its last token, the position, the compression level and the costs.
   The history may lag: the agreement of a token the target emitted without drafting (a plain
   step), or of the bonus token after a fully accepted step, is known only once the draft's
   next forward has scored it. The *pre-draft* vector (:data:`PRE_FEATURE_NAMES`) therefore
   holds the history as settled so far and ``unsettled``, the number of emitted tokens it
   does not cover yet. Replay rebuilds it exactly from a trace (the settled history at
   position ``p`` with ``u`` tokens unsettled is the trace's history at ``p - u``).
2. **After the draft's first forward: how many tokens (γ ≥ 1)?** That forward catches the
   draft up on every unseen token in one batch (its rows score the unsettled positions, so
   the history is complete again) and yields the first proposal. The *step* vector
   (:data:`FEATURE_NAMES`) adds the proposal's entropy, top-1 probability and top-1/top-2
   margin to the (now complete) history.

Agreement at a position is "the draft's greedy token given the true prefix equals the target's
token". Every position gets exactly one agreement bit whatever the policy did, so the history
at a γ decision does not depend on the policy: every trace position is a training example and
offline replay of any policy is exact. Nothing computed from the tokens drafted in a step
enters either vector: those only exist after γ is chosen.

The draft statistics are computed in one pass-friendly form shared by every caller
(:func:`token_stats` for rows, :class:`RowStats` for the decoder's one row): with
``m = max x``, ``z = x - m``, ``e = exp z`` and ``S = sum e``::

    top1 = 1 / S,   margin = (1 - exp(x2 - m)) / S,   entropy = log S - sum(e z) / S

where ``x2`` is the second-largest logit (at another position). No softmax vector and no
partial sort: at a vocabulary of 49,152, one row costs ~50 µs in numpy on one core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

COMPRESSIONS: Final = ("fp16", "int8", "nf4")
GAMMA_MAX: Final = 8
GAMMAS: Final = tuple(range(1, GAMMA_MAX + 1))
EMA_ALPHA: Final = 0.25
EMA_PRIOR: Final = 0.5
RUN_CAP: Final = 16
#: A policy that declines to speculate re-decides at every step, on a history that stops
#: growing while it declines (nothing scores the tokens the target emits alone). After this
#: many plain steps in a row the next step drafts anyway (a probe): the draft catches up,
#: the history is complete again. It bounds the staleness the pre-draft model must handle
#: and the size of a catch-up forward (``MAX_SKIP_RUN + 2`` tokens).
MAX_SKIP_RUN: Final = 16
#: unsettled tokens at most: a bonus token, then MAX_SKIP_RUN plain steps.
MAX_UNSETTLED: Final = MAX_SKIP_RUN + 1
#: the same for a draft that reads the target's hidden states (``draft_kind`` "feature"): the
#: next catch-up settles its drafted tokens too, so a fully accepted step leaves GAMMA_MAX
#: (every emitted token but the first), then come MAX_SKIP_RUN plain steps.
MAX_UNSETTLED_READING_TARGET: Final = GAMMA_MAX + MAX_SKIP_RUN
UNSETTLED_CAP: Final = 16

#: names and order of the step (γ) feature vector (the ONNX metadata repeats them).
FEATURE_NAMES: Final = (
    "draft_entropy",       # entropy (nats) of the draft's first-proposal distribution
    "draft_top1",          # its top-1 probability
    "draft_margin",        # top-1 minus top-2 probability
    "target_top1_prev",    # target's probability of the last token it emitted
    "agree_ema",           # EMA of draft/target agreement over past positions
    "agree_run",           # consecutive agreements just before this position / RUN_CAP
    "log_position",        # log(1 + tokens generated so far)
    "compression_fp16",
    "compression_int8",
    "compression_nf4",
)
N_FEATURES: Final = len(FEATURE_NAMES)

#: names and order of the pre-draft (speculate or not) feature vector.
PRE_FEATURE_NAMES: Final = (
    "target_top1_prev",    # target's probability of the last token it emitted
    "agree_ema",           # EMA of agreement over the settled positions
    "agree_run",           # consecutive agreements at the end of the settled positions / RUN_CAP
    "unsettled",           # emitted tokens the draft has not scored yet / UNSETTLED_CAP
    "log_position",        # log(1 + tokens generated so far)
    "compression_fp16",
    "compression_int8",
    "compression_nf4",
)
N_PRE_FEATURES: Final = len(PRE_FEATURE_NAMES)

#: the context lookup's proposal (:mod:`speckv.runtime.lookup`): what the lookup decision
#: reads before the pre-draft vector. ``lookup_length`` comes first and raw: the graph sums
#: the lookup's survival curve up to it.
LOOKUP_SIGNAL_NAMES: Final = (
    "lookup_length",          # tokens the lookup proposes (1..LOOKUP_MAX_TOKENS)
    "lookup_match",           # length of the matched suffix (n of the n-gram)
    "lookup_log_occurrences",  # log(1 + earlier occurrences of that suffix)
    "lookup_agreeing",        # share of those occurrences the first proposed token followed
)
#: names and order of the lookup decision's vector: the signals, then the pre-draft vector.
LOOKUP_FEATURE_NAMES: Final = (*LOOKUP_SIGNAL_NAMES, *PRE_FEATURE_NAMES)
N_LOOKUP_FEATURES: Final = len(LOOKUP_FEATURE_NAMES)
#: the longest continuation a lookup proposes (:data:`speckv.runtime.lookup.MAX_TOKENS`)
LOOKUP_MAX_TOKENS: Final = GAMMA_MAX

_ONEHOT: Final = {c: tuple(float(c == d) for d in COMPRESSIONS) for c in COMPRESSIONS}
#: log1p of positions, computed once in float32 so every caller stores the same value.
_LOG_POSITIONS: Final = np.log1p(np.arange(4096, dtype=np.float32))


def log_position(position: int) -> float:
    """``log(1 + position)`` as float32 computes it (the ``log_position`` feature)."""
    if 0 <= position < len(_LOG_POSITIONS):
        return float(_LOG_POSITIONS[position])
    return float(np.log1p(np.float32(position)))


def compression_onehot(compression: str) -> np.ndarray:
    return np.asarray(_onehot(compression), dtype=np.float32)


def _onehot(compression: str) -> tuple[float, ...]:
    try:
        return _ONEHOT[compression]
    except KeyError:
        raise ValueError(f"Unknown compression {compression!r}: use one of "
                         f"{', '.join(COMPRESSIONS)}.") from None


# ------------------------------------------------------------------------ draft statistics
def token_stats(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Entropy (nats), top-1 probability and top-1/top-2 margin of each row of logits.

    ``logits``: ``[..., vocab]``; returns ``[..., 3]`` float32. Rows may also be
    log-probabilities (the softmax is shift-invariant). The formula is the module's; for one
    row at a time without allocations use :class:`RowStats`.
    """
    x = np.asarray(logits, dtype=np.float32)
    if temperature > 0 and temperature != 1.0:
        x = x / np.float32(temperature)
    best = x.argmax(axis=-1)[..., None]
    z = x - np.take_along_axis(x, best, -1)
    e = np.exp(z)
    total = e.sum(-1, dtype=np.float64)
    spread = np.einsum("...v,...v->...", e, z, dtype=np.float64)
    np.put_along_axis(e, best, 0.0, -1)  # the second-largest e is exp(x2 - m)
    second = e.max(-1).astype(np.float64)
    out = np.stack([np.log(total) - spread / total, 1.0 / total, (1.0 - second) / total], -1)
    return out.astype(np.float32)


class RowStats:
    """:func:`token_stats` for one row of logits, reusing its scratch buffers (one per thread).

    ``stats(x)`` -> ``(entropy, top1, margin)`` for a 1-D float32 array ``x`` (a torch CPU
    float32 tensor's ``.numpy()`` is one, without a copy); ``argmax`` comes along for free.
    """

    def __init__(self) -> None:
        self._z = np.empty(0, np.float32)
        self._e = np.empty(0, np.float32)
        self._ones = np.empty(0, np.float32)

    def _scratch(self, n: int) -> None:
        self._z = np.empty(n, np.float32)
        self._e = np.empty(n, np.float32)
        self._ones = np.ones(n, np.float32)

    def __call__(self, x: np.ndarray) -> tuple[float, float, float]:
        return self.with_argmax(x)[1:]

    def with_argmax(self, x: np.ndarray) -> tuple[int, float, float, float]:
        """``(argmax, entropy, top1, margin)`` of one row."""
        n = x.shape[0]
        if self._z.shape[0] != n:
            self._scratch(n)
        i = int(x.argmax())
        m = x[i]
        if n > 1:
            left = x[:i].max() if i else -np.inf
            right = x[i + 1 :].max() if i + 1 < n else -np.inf
            second = math.exp(float(max(left, right)) - float(m))
        else:
            second = 0.0
        z, e = self._z, self._e
        np.subtract(x, m, out=z)
        np.exp(z, out=e)
        total = float(e.dot(self._ones))
        spread = float(e.dot(z))
        if not total > 0.0:  # NaN logits: let the finiteness checks downstream say so
            return i, math.nan, math.nan, math.nan
        return i, math.log(total) - spread / total, 1.0 / total, (1.0 - second) / total


# -------------------------------------------------------------------------------- history
@dataclass
class History:
    """Per-sequence agreement history.

    Call :meth:`settle` for every target token whose agreement is known when it is emitted
    (accepted drafted tokens, the target's correction), :meth:`defer` for one whose agreement
    the draft has not computed yet (a token of a plain step, the bonus token after a fully
    accepted step), and :meth:`settle_deferred` with the draft's verdicts once its next
    forward has scored the deferred tokens (before the step's γ features are built).
    """

    ema: float = EMA_PRIOR
    run: int = 0
    position: int = 0  # settled positions
    target_top1_prev: float = 1.0  # target's probability of the last settled token
    pending: list[float] = field(default_factory=list)  # target top-1 of deferred tokens

    def settle(self, agreed: bool, target_top1: float) -> None:
        """One more target token is final: did the draft's greedy token equal it?"""
        if self.pending:
            raise ValueError(f"{len(self.pending)} earlier token(s) are deferred: settle them "
                             "first (History.settle_deferred), in position order.")
        self._settle(agreed, _probability(target_top1))

    def _settle(self, agreed: bool, target_top1: float) -> None:
        self.ema = (1 - EMA_ALPHA) * self.ema + EMA_ALPHA * float(agreed)
        self.run = self.run + 1 if agreed else 0
        self.position += 1
        self.target_top1_prev = target_top1

    def defer(self, target_top1: float) -> None:
        """A token was emitted whose agreement the draft has not computed yet."""
        self.pending.append(_probability(target_top1))

    def settle_deferred(self, agreed: Sequence[bool]) -> None:
        """The draft's verdicts on the deferred tokens, oldest first (one per token)."""
        if len(agreed) != len(self.pending):
            raise ValueError(f"{len(self.pending)} token(s) are deferred, got {len(agreed)} "
                             "verdict(s).")
        pending, self.pending = self.pending, []
        for ok, top1 in zip(agreed, pending, strict=True):
            self._settle(bool(ok), top1)

    @property
    def unsettled(self) -> int:
        """Emitted tokens whose agreement is not known yet."""
        return len(self.pending)

    @property
    def produced(self) -> int:
        """Tokens emitted so far (settled or not)."""
        return self.position + len(self.pending)

    @property
    def last_top1(self) -> float:
        """The target's probability of the last token it emitted (settled or not)."""
        return self.pending[-1] if self.pending else self.target_top1_prev


def _probability(target_top1: float) -> float:
    """``target_top1`` as a float, or ValueError when it is not a probability."""
    value = float(target_top1)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"target_top1 must be the target's probability of the emitted token, "
                         f"in [0, 1]; got {target_top1!r}. Pass softmax(target logits)[token], "
                         "not a logit or a log-probability.")
    return value


def history_arrays(agree: np.ndarray, target_top1: np.ndarray, prior_top1: float = 1.0):
    """History features for every position of a trace at once (vectorised ``History``).

    ``agree[j]``: did the draft's greedy token at answer position j equal the target's;
    ``target_top1[j]``: the target's probability of its token j. Returns ``ema, run,
    target_top1_prev`` as seen *before* position j, each ``[n]``.
    """
    n = len(agree)
    ema = np.empty(n, np.float32)
    run = np.empty(n, np.float32)
    prev = np.empty(n, np.float32)
    h = History(target_top1_prev=prior_top1)
    for j in range(n):
        ema[j], run[j], prev[j] = h.ema, h.run, h.target_top1_prev
        h.settle(bool(agree[j]), float(target_top1[j]))
    return ema, run, prev


# ----------------------------------------------------------------------- the step vector
def assemble(stats: np.ndarray, target_top1_prev, agree_ema, agree_run, position,
             compression: str) -> np.ndarray:
    """Stack the parts into ``[n, N_FEATURES]`` float32 in ``FEATURE_NAMES`` order."""
    stats = np.atleast_2d(np.asarray(stats, np.float32))
    n = stats.shape[0]
    cols = [
        stats[:, 0], stats[:, 1], stats[:, 2],
        np.broadcast_to(np.asarray(target_top1_prev, np.float32), (n,)),
        np.broadcast_to(np.asarray(agree_ema, np.float32), (n,)),
        np.minimum(np.broadcast_to(np.asarray(agree_run, np.float32), (n,)), RUN_CAP) / RUN_CAP,
        np.log1p(np.broadcast_to(np.asarray(position, np.float32), (n,))),
    ]
    onehot = np.broadcast_to(compression_onehot(compression), (n, len(COMPRESSIONS)))
    return np.concatenate([np.stack(cols, -1), onehot], -1).astype(np.float32)


def fill_step_features(out: np.ndarray, entropy: float, top1: float, margin: float,
                       history: History, compression: str) -> None:
    """Write the step vector into ``out`` (float32 ``[N_FEATURES]``) in place.

    The history must be complete (nothing deferred): the draft's catch-up forward, which
    yields the first proposal, has scored every emitted token by then.
    """
    if history.pending:
        raise ValueError(f"{len(history.pending)} token(s) are still deferred: settle them "
                         "with the catch-up forward's verdicts before building γ features.")
    out[0] = entropy
    out[1] = top1
    out[2] = margin
    out[3] = history.target_top1_prev
    out[4] = history.ema
    out[5] = min(history.run, RUN_CAP) / RUN_CAP
    out[6] = log_position(history.position)
    out[7:10] = _onehot(compression)


def step_features(first_logits: np.ndarray, history: History, compression: str,
                  stats: RowStats | None = None) -> np.ndarray:
    """The step vector ``[N_FEATURES]`` for one live γ decision."""
    x = np.ascontiguousarray(first_logits, dtype=np.float32).reshape(-1)
    entropy, top1, margin = (stats or RowStats())(x)
    out = np.empty(N_FEATURES, np.float32)
    fill_step_features(out, entropy, top1, margin, history, compression)
    return out


# -------------------------------------------------------------------- the pre-draft vector
def fill_pre_features(out: np.ndarray, history: History, compression: str) -> None:
    """Write the pre-draft vector into ``out`` (float32 ``[N_PRE_FEATURES]``) in place."""
    out[0] = history.last_top1
    out[1] = history.ema
    out[2] = min(history.run, RUN_CAP) / RUN_CAP
    out[3] = min(len(history.pending), UNSETTLED_CAP) / UNSETTLED_CAP
    out[4] = log_position(history.position + len(history.pending))
    out[5:8] = _onehot(compression)


def pre_features(history: History, compression: str) -> np.ndarray:
    """The pre-draft vector ``[N_PRE_FEATURES]`` for one live decision."""
    out = np.empty(N_PRE_FEATURES, np.float32)
    fill_pre_features(out, history, compression)
    return out


def pre_from_step_features(current: np.ndarray, settled: np.ndarray, unsettled) -> np.ndarray:
    """Pre-draft vectors ``[n, N_PRE_FEATURES]`` from step vectors of a trace.

    ``current``: the step vectors at the decision positions ``p``; ``settled``: those at
    ``p - u``, where the settled history ends; ``unsettled``: ``u`` per row. Equals
    :func:`pre_features` of a live :class:`History` in that state (the step vector at ``p``
    holds the target's confidence in token ``p - 1`` and the position; the one at ``p - u``
    the history before position ``p - u``).
    """
    current = np.atleast_2d(np.asarray(current, np.float32))
    settled = np.atleast_2d(np.asarray(settled, np.float32))
    u = np.broadcast_to(np.asarray(unsettled, np.float32), (current.shape[0],))
    out = np.empty((current.shape[0], N_PRE_FEATURES), np.float32)
    out[:, 0] = current[:, 3]
    out[:, 1] = settled[:, 4]
    out[:, 2] = settled[:, 5]
    out[:, 3] = np.minimum(u, UNSETTLED_CAP) / np.float32(UNSETTLED_CAP)
    out[:, 4] = current[:, 6]
    out[:, 5:8] = current[:, 7:10]
    return out


def lookup_features(pre: np.ndarray, length, match, occurrences, agreeing) -> np.ndarray:
    """Lookup-decision vectors ``[n, N_LOOKUP_FEATURES]`` (or one ``[N_LOOKUP_FEATURES]``):
    the proposal's signals (as :class:`speckv.runtime.lookup.LookupProposal` gives them: its
    length, match, earlier occurrences and how many of them agree) before the pre-draft
    vector ``pre`` of the same decision."""
    pre = np.asarray(pre, np.float32)
    rows = np.atleast_2d(pre)
    n = rows.shape[0]
    occurrences = np.broadcast_to(np.asarray(occurrences, np.float32), (n,))
    out = np.empty((n, N_LOOKUP_FEATURES), np.float32)
    out[:, 0] = np.broadcast_to(np.asarray(length, np.float32), (n,))
    out[:, 1] = np.broadcast_to(np.asarray(match, np.float32), (n,))
    out[:, 2] = np.log1p(occurrences)
    out[:, 3] = np.broadcast_to(np.asarray(agreeing, np.float32), (n,)) / np.maximum(
        occurrences, np.float32(1))
    out[:, len(LOOKUP_SIGNAL_NAMES):] = rows
    return out[0] if pre.ndim == 1 else out
