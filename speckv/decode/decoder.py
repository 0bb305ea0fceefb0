"""Lossless speculative decoding over Hugging Face causal LMs, with a pluggable γ policy.

One step (the definition :mod:`speckv.policies` documents):

1. before the draft runs, ``policy.speculate(pre_ctx)`` decides whether to speculate at all
   (from the agreement history as settled so far, the tokens it does not cover yet, the
   position, the compression and the costs). If not, the target decodes one token alone and
   its agreement is deferred: nothing has scored it yet;
2. the draft's first forward catches up on every token it has not seen (one, two after a
   fully accepted step, more after plain steps) in one batch: its rows score the deferred
   tokens (the history is complete again) and the last yields the first proposal. Those
   logits and the history give the step's features
   (:func:`speckv.runtime.features.fill_step_features`);
3. ``γ = min(policy.choose(ctx), max_gamma)``, ``max_gamma = min(8, max_new_tokens -
   produced - 1)``; when ``max_gamma == 0`` the step is a plain target step instead. A
   policy may also answer ``PLAIN`` here: the target then decodes one token, and the draft's
   proposal scores it at once;
4. the draft proposes up to γ tokens; ``policy.keep_drafting(k, top1, entropy)`` after each
   (the decoder computes only the statistics the policy's ``token_stats`` lists);
5. the target verifies ``[last emitted token, drafted tokens...]`` in ONE forward;
6. greedy: accept while the target's argmax equals the draft token, then emit the target's
   token. Sampling (temperature > 0): accept token x with probability min(1, p(x)/q(x)); on
   rejection sample from norm(max(0, p − q)); after a fully accepted step sample the bonus
   token from p. Either way the output has exactly the target's distribution;
7. both KV caches are cropped back to the accepted prefix (no recomputation). An emitted
   EOS ends the answer, even inside the accepted drafted tokens (nothing after it is kept).

Cache invariants between steps, for the sequence ``tokens`` (prompt + emitted):
the target's cache holds ``tokens[:-1]``; the draft's holds ``tokens[:draft_seen]``, and the
``len(tokens) - draft_seen - 1`` tokens in between are exactly the deferred ones. With policy
``None`` ("ar") the same loop runs plain target steps and the draft never runs.

Agreement history (:class:`speckv.runtime.features.History`): agreed = "the draft's greedy
token given the true prefix equals the emitted token". Accepted tokens and the first rejected
position are known at verification (the draft's logits there were computed while drafting);
the bonus token and the tokens of plain steps are deferred and settled by the next catch-up
forward. So the features at every γ decision equal those of a trace at the same position
whatever the policy did (:mod:`speckv.profile.profiler`), and the pre-draft features are the
trace's history where the draft last ran (what replay rebuilds).

The work between the forwards (statistics, features, the two decisions, bookkeeping) is
timed per step: records carry ``t_draft_s``, ``t_verify_s`` and ``t_decision_s`` beside
``t_step_s``; the statistics run in numpy on the float32 logits (one pass, no softmax tensor),
where torch's reductions over a 49,152-token row cost several times more on a CPU.

Greedy losslessness, exactly: every emitted token is the argmax of the target's logits in the
forward that verified it. :attr:`DecodeResult.target_forwards` logs every target forward
(:class:`TargetForward`), and :func:`greedy_invariant` recomputes them from a fresh cache with
the same chunking and checks that. It holds on any machine, whatever the dtype.

Equality with one-token decoding is a different matter: it holds only where the target gives
a position the same logits alone and inside a chunk of tokens, which nothing guarantees on a
CPU. Kernels pick their blocking and reduction order by shape and by instruction set (AVX2,
AVX-512, AMX), so float32 logits may differ by a few ulps between a one-token and a
multi-token forward; bfloat16 (also nf4's compute dtype) by a bfloat16 step (0.125-0.25 at
typical sizes); LLM.int8 picks its outlier columns per forward, so its numerics depend on which
tokens share the forward. At a near-tie the greedy output can then part from one-token
decoding (Hugging Face's assisted generation parts at the same places).
:func:`explain_difference` shows, at the first such position, that the target's own one-token
forward gives the one-token token and its chunked forward the emitted one: the difference is
the target's numerics, not the decoder.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from speckv.decode.costs import lm_forward, module_of, new_cache
from speckv.decode.tree import (
    Root,
    Slots,
    TreeDraft,
    grow,
    keep_rows,
    keep_state_rows,
    supports_4d_masks,
    verify_sampled_tree,
)
from speckv.errors import SpeckvError
from speckv.llm.feature_draft import TargetStates, is_feature_draft
from speckv.policies import (
    PLAIN,
    TOKEN_STATS,
    Learned,
    LookupContext,
    Policy,
    PreContext,
    StepContext,
)
from speckv.runtime.costs import CATCHUP_MAX, StepCosts
from speckv.runtime.features import (
    GAMMA_MAX,
    N_FEATURES,
    N_PRE_FEATURES,
    History,
    RowStats,
    fill_pre_features,
    fill_step_features,
)
from speckv.runtime.lookup import ContextLookup, LookupProposal
from speckv.runtime.proposal import N_DRAFT_OPTIONS, TREES, Proposal, TreeShape, tree_index

if TYPE_CHECKING:
    import pandas as pd
    from transformers import DynamicCache

    from speckv.decode.costs import CostModel
    from speckv.llm.load import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS: Final = 128


class DecodeError(SpeckvError, ValueError):
    """Bad decoding input; the message says what to pass instead."""


@dataclass(frozen=True)
class TargetForward:
    """One target forward of a :meth:`SpeculativeDecoder.generate` call, as a replay needs it.

    The target's cache held ``start`` tokens before it (cropped back to that length), the
    forward fed ``ids`` with ``logits_to_keep=keep``, and the first ``emitted`` of the kept
    logit rows gave emitted tokens (row ``r`` scores the position after ``ids[len(ids) - keep
    + r]``). The prefill over ``prompt[:-1]`` emits nothing; a plain step feeds one id and
    emits one token; a verification feeds ``[last token, drafted...]`` and emits the accepted
    drafted tokens and the target's next token (fewer when an EOS ends the answer).
    """

    start: int
    ids: tuple[int, ...]
    keep: int
    emitted: int
    #: a tree's verify forward: the parent of each node ``ids[1:]`` (-1: the root ``ids[0]``),
    #: fed with :func:`speckv.decode.tree.verify_mask` at positions ``start + depth``, all rows
    #: kept; ``path``: the accepted nodes, which with the root stay in the cache
    parents: tuple[int, ...] | None = None
    path: tuple[int, ...] = ()

    def emitting_rows(self) -> list[int]:
        """The kept logit row that emitted each emitted token, in order."""
        if self.parents is None:
            return list(range(self.emitted))
        return [0, *(1 + j for j in self.path)][: self.emitted]

    def kept_ids(self) -> list[int]:
        """The ids that stay in the target's cache after the forward (before the next
        forward's crop): all of them, or a tree's root and its accepted path."""
        if self.parents is None:
            return list(self.ids)
        return [self.ids[r] for r in [0, *(1 + j for j in self.path)][: self.emitted]]


@dataclass
class DecodeResult:
    """One generated answer with its per-step records (``speckv.records.SCHEMA`` columns)."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, EOS included when it ended the answer
    steps: list[dict[str, Any]]
    seconds: float  # wall clock of the whole call: prefill + every step
    stop: str  # "eos" or "length"
    #: every target forward in order, prefill first (see :func:`greedy_invariant`)
    target_forwards: list[TargetForward] = field(default_factory=list)
    temperature: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per speculative step (0.0 when no step drafted)."""
        accepted = [s["accept_len"] for s in self.steps if s["drafted"]]
        return float(np.mean(accepted)) if accepted else 0.0


@dataclass
class StepView:
    """What an ``on_step`` callback sees after each step (streaming, debugging, tests)."""

    new_tokens: list[int]
    tokens: list[int]  # prompt + everything emitted so far
    n_prompt: int
    target_cache: DynamicCache
    draft_cache: DynamicCache | None
    draft_seen: int  # tokens of ``tokens`` in the draft's cache
    record: dict[str, Any] = field(default_factory=dict)


def eos_ids(model: torch.nn.Module | LoadedModel) -> frozenset[int]:
    """The target's end-of-sequence ids: generation config, model config and tokenizer."""
    found: set[int] = set()
    module = module_of(model)
    sources = (getattr(getattr(module, "generation_config", None), "eos_token_id", None),
               getattr(module.config, "eos_token_id", None),
               getattr(getattr(model, "tokenizer", None), "eos_token_id", None))
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, Iterable):
            found.update(int(v) for v in value)
    return frozenset(found)


class _RowBuffer:
    """A float32 buffer the logits of one role are converted into, reused across steps.

    ``logits.float()`` allocates ~200 kB per row at a 49k vocabulary, and a fresh allocation
    that size is fresh pages (page faults) every time: copying into the same buffer saves
    ~30 µs per forward. A view stays valid until the next conversion of the same role.
    """

    def __init__(self) -> None:
        self._tensor = torch.empty(0, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> np.ndarray:
        if logits.dtype == torch.float32 and logits.device.type == "cpu":
            return logits.numpy()
        size = logits.numel()
        if self._tensor.numel() < size:
            self._tensor = torch.empty(size, dtype=torch.float32)
        view = self._tensor[:size].view(logits.shape)
        view.copy_(logits)
        return view.numpy()


def token_prob(x: np.ndarray, token: int, stats: RowStats) -> float:
    """softmax(x)[token] for one row of logits, in the statistics' one pass."""
    best, _, top1, _ = stats.with_argmax(x)
    return top1 if token == best else math.exp(float(x[token]) - float(x[best])) * top1


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafted: list[int],
                   generator: torch.Generator | None) -> tuple[int, int, list[float]]:
    """Speculative (rejection) sampling of one step; the output is distributed as ``p``.

    ``p``: target probabilities ``[k + 1, V]`` at the drafted positions and the one after;
    ``q``: draft probabilities ``[k, V]`` the drafted tokens were sampled from. Returns
    ``(accepted, next_token, accept_probs)``: drafted tokens ``[:accepted]`` stand, then
    ``next_token`` (a residual sample after a rejection, the bonus token after none).
    """
    k = len(drafted)
    rows = torch.arange(k)
    idx = torch.tensor(drafted)
    accept = torch.clamp(p[rows, idx] / q[rows, idx], max=1.0)
    u = torch.rand(k, generator=generator, dtype=accept.dtype)
    ok = (u < accept).tolist()
    accepted = ok.index(False) if False in ok else k
    if accepted < k:
        residual = torch.clamp(p[accepted] - q[accepted], min=0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[accepted]
    else:
        dist = p[k]
    token = int(torch.multinomial(dist, 1, generator=generator))
    return accepted, token, accept.tolist()


@dataclass
class _Sequence:
    """The state of one sequence being decoded (see the cache invariants above)."""

    tokens: list[int]  # prompt + emitted tokens
    n_prompt: int
    t_cache: DynamicCache  # holds tokens[:-1]
    d_cache: DynamicCache | None  # holds tokens[:draft_seen]
    draft_seen: int
    history: History
    #: a feature-conditioned draft's input: the target's last hidden state at each position
    #: of its cache (rows below ``t_cache``'s length are valid)
    states: TargetStates | None = None
    forwards: list[TargetForward] = field(default_factory=list)  # the target's, in order
    skipped: int = 0  # steps in a row the draft did not run (plain or lookup)
    lookup: ContextLookup | None = None  # the n-gram index of tokens, when the policy uses it

    @property
    def produced(self) -> int:
        return len(self.tokens) - self.n_prompt


@dataclass
class _Proposal:
    """What the draft proposed in one step, position by position."""

    tokens: list[int]
    greedy: list[int]  # the draft's argmax at each position (agreement is defined on it)
    probs: list[torch.Tensor]  # sampling: the distribution each token was drawn from
    entropy: list[float]  # draft entropy (nats) and top-1 probability at each position
    top1: list[float]


class _Sampler:
    """Temperature sampling for one sequence, from one seeded generator."""

    def __init__(self, temperature: float, seed: int) -> None:
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, -1)

    def sample(self, logits: torch.Tensor) -> int:
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def propose(self, logits: torch.Tensor, prop: _Proposal) -> int:
        q = self.probs(logits)
        prop.probs.append(q)
        return int(torch.multinomial(q, 1, generator=self.generator))

    def verify(self, t_logits: torch.Tensor, prop: _Proposal) -> tuple[int, int, list[float]]:
        return verify_sampled(self.probs(t_logits), torch.stack(prop.probs), prop.tokens,
                              self.generator)


#: the record columns of a plain target step: nothing drafted, no γ decision taken.
_PLAIN_RECORD: Final = {
    "draft_entropy": None, "draft_top1": None, "draft_margin": None,
    "target_top1_prev": None, "agree_ema": None, "agree_run": None,
    "draft_entropy_k": None, "draft_top1_k": None,
    "accept_len": 0, "accept_cap": 0, "accept_prob_k": None, "gamma": 0, "drafted": 0,
    "tree_size": None, "source": None,
    "t_draft_s": 0.0, "t_verify_s": 0.0, "t_decision_s": 0.0,
}


def _array_or_none(values: Any) -> np.ndarray | None:
    return np.asarray(values, np.float32) if values else None


@dataclass
class _Clock:
    """Seconds spent in the step's draft forwards, target forward and decisions."""

    draft: float = 0.0
    verify: float = 0.0
    decision: float = 0.0

    def record(self) -> dict[str, float]:
        return {"t_draft_s": self.draft, "t_verify_s": self.verify,
                "t_decision_s": self.decision}


class SpeculativeDecoder:
    """Speculative decoding of one sequence at a time with a γ policy (``None``: target alone).

    ``draft``/``target``: :class:`~speckv.llm.load.LoadedModel` or bare HF causal LMs sharing a
    vocabulary. ``costs`` feeds the decisions' costs (with its ``cost_catchup_s`` when
    measured); a learned policy needs it (others ignore it, and get NaN when it is missing).
    ``eos_token_ids`` overrides the target's. ``record_token_stats``: compute the draft's
    entropy and top-1 probability at every drafted token for the records, even where the
    policy's stopping rule reads neither (by default only those it reads are computed).
    """

    def __init__(self, draft: torch.nn.Module | LoadedModel | None,
                 target: torch.nn.Module | LoadedModel, policy: Policy | None,
                 costs: CostModel | None = None, *, compression: str | None = None,
                 eos_token_ids: Iterable[int] | None = None, run_id: str | None = None,
                 max_gamma: int = GAMMA_MAX, record_token_stats: bool = False) -> None:
        if policy is not None and draft is None:
            raise DecodeError(f"Policy {policy.name!r} drafts tokens: pass a draft model (or "
                              "use policy 'ar' for the target alone).")
        if isinstance(policy, Learned) and costs is None:
            raise DecodeError("A learned controller chooses γ from measured step costs: pass "
                              "costs=speckv.decode.costs.measure_costs(draft, target) (the CLI "
                              "measures them at start-up, or reads --costs FILE).")
        if not 1 <= max_gamma <= GAMMA_MAX:
            raise DecodeError(f"max_gamma must lie in 1..{GAMMA_MAX}, got {max_gamma}.")
        self.draft = module_of(draft) if policy is not None else None
        self.target = module_of(target)
        #: the draft reads the target's hidden states (speckv.llm.feature_draft): it
        #: recomputes its drafted positions from them after each verification
        self.reads_target = is_feature_draft(self.draft)
        self.policy = policy
        self.costs = costs
        self.max_gamma = max_gamma
        self.compression = compression or getattr(target, "compression", None) or "fp16"
        self.eos = frozenset(eos_token_ids) if eos_token_ids is not None else eos_ids(target)
        catchup = getattr(costs, "cost_catchup_s", None) if costs is not None else None
        self._costs = (StepCosts(costs.cost_draft_s, costs.cost_verify_s, catchup,
                                 getattr(costs, "cost_tree_draft_s", None),
                                 getattr(costs, "cost_tree_verify_s", None))
                       if costs is not None else None)
        self._nan_costs = np.full(GAMMA_MAX, np.nan, np.float32)
        needs = getattr(policy, "token_stats", TOKEN_STATS) if policy is not None else ()
        self._token_stats = bool(record_token_stats or set(needs) & TOKEN_STATS)
        self._speculate = getattr(policy, "speculate", None)
        self._lookup = getattr(policy, "lookup", None)
        self._join_lookup = getattr(policy, "join_lookup", None)
        self._stats = RowStats()
        self._draft_rows, self._target_rows = _RowBuffer(), _RowBuffer()
        self._features = np.empty(N_FEATURES, np.float32)
        self._pre = np.empty(N_PRE_FEATURES, np.float32)
        dtype = getattr(target, "compute_dtype", None) or str(
            next(self.target.parameters()).dtype).removeprefix("torch.")
        cost_verify = (np.asarray(costs.cost_verify_s, np.float32) if costs is not None
                       else None)
        self._ident = {
            "run_id": run_id or f"live-{uuid.uuid4().hex[:8]}",
            "draft_model": getattr(draft, "name", "") if policy is not None else "",
            "draft_kind": "feature" if self.reads_target else "lm",
            "target_model": getattr(target, "name", ""),
            "compression": self.compression, "compute_dtype": dtype,
            "mode": "live", "replayable": False,
            "cost_draft_s": costs.cost_draft_s if costs is not None else None,
            "cost_verify_s": cost_verify,
            "cost_catchup_s": np.asarray(catchup, np.float32) if catchup else None,
            "cost_tree_draft_s": _array_or_none(getattr(costs, "cost_tree_draft_s", None)),
            "cost_tree_verify_s": _array_or_none(getattr(costs, "cost_tree_verify_s", None)),
            "tree_accept_len": None,
            "paper_mean_entropy": None, "paper_mean_confidence": None,
            "paper_max_entropy": None, "paper_min_confidence": None,
        }

    @property
    def name(self) -> str:
        return "ar" if self.policy is None else self.policy.name

    # -------------------------------------------------------------------------------- API
    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, seed: int = 0, task: str = "chat",
                 prompt_id: str = "", on_step: Callable[[StepView], None] | None = None,
                 ) -> DecodeResult:
        """Generate up to ``max_new_tokens`` after ``prompt_ids``; stops after an EOS token.

        ``temperature`` 0 is greedy; above 0, ``seed`` seeds the sampling. ``task`` and
        ``prompt_id`` label the step records; ``on_step`` sees every step as it ends.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise DecodeError("The prompt is empty: speculative decoding needs at least one "
                              "token to continue from.")
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if not temperature >= 0 or not math.isfinite(temperature):
            raise DecodeError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        if temperature > 0 and self._join_lookup is not None:
            raise DecodeError(f"Policy {self.name!r} joins the context lookup's continuation to "
                              "its trees, which speckv verifies greedily only (temperature 0): "
                              "decode greedily, or sample with lookup:M+SPEC, which verifies "
                              "the lookup alone.")
        started = time.perf_counter()
        sampler = _Sampler(temperature, seed) if temperature > 0 else None
        seq = self._prefill(prompt_ids)
        if self.policy is not None:
            self.policy.reset()
        ident = {**self._ident, "task": task, "prompt_id": prompt_id,
                 "temperature": float(temperature), "max_new_tokens": max_new_tokens}
        steps: list[dict[str, Any]] = []
        stop = "length"
        while seq.produced < max_new_tokens:
            t0 = time.perf_counter()
            max_gamma = min(self.max_gamma, max_new_tokens - seq.produced - 1)
            if self.policy is None or max_gamma == 0:
                emitted, record = self._plain_step(seq, sampler, _Clock(), defer=False)
            else:
                clock = _Clock()
                lookup = self._lookup_proposal(seq, max_gamma, clock)
                if lookup is not None:
                    emitted, record = self._lookup_step(seq, lookup, sampler, clock)
                elif self._decide_to_speculate(seq, max_gamma, clock):
                    emitted, record = self._speculative_step(seq, max_gamma, sampler, clock)
                else:
                    emitted, record = self._plain_step(seq, sampler, clock, defer=True)
            record.update(ident, step=len(steps), position=seq.produced)
            seq.tokens.extend(emitted)
            if seq.lookup is not None:
                seq.lookup.extend(emitted)
            record["t_step_s"] = time.perf_counter() - t0
            steps.append(record)
            if on_step is not None:
                on_step(StepView(emitted, seq.tokens, seq.n_prompt, seq.t_cache, seq.d_cache,
                                 seq.draft_seen, record))
            if emitted[-1] in self.eos:
                stop = "eos"
                break
        for record in steps:
            record["seq_len"] = seq.produced
        return DecodeResult(prompt_ids, seq.tokens[seq.n_prompt :], steps,
                            time.perf_counter() - started, stop, seq.forwards,
                            float(temperature))

    # -------------------------------------------------------------------------- the steps
    def _prefill(self, prompt_ids: list[int]) -> _Sequence:
        """Caches over the prompt but its last token, which the first step feeds."""
        t_cache = new_cache(self.target)
        d_cache = new_cache(self.draft) if self.draft is not None else None
        states = None
        if self.reads_target:
            param = next(self.draft.parameters())
            states = TargetStates(self.draft.cfg.hidden_size, param.dtype, param.device)
            d_cache.states = states
        seq = _Sequence(list(prompt_ids), len(prompt_ids), t_cache, d_cache,
                        len(prompt_ids) - 1, History(), states=states,
                        lookup=ContextLookup(tokens=prompt_ids)
                        if self._lookup or self._join_lookup else None)
        if len(prompt_ids) > 1:
            self._target_forward(seq, prompt_ids[:-1], keep=1)
            seq.forwards.append(TargetForward(0, tuple(prompt_ids[:-1]), 1, 0))
            if d_cache is not None:
                lm_forward(self.draft, prompt_ids[:-1], d_cache)
        return seq

    def _target_forward(self, seq: _Sequence, ids: list[int], keep: int,
                        tree: Proposal | None = None) -> torch.Tensor:
        """The target's forward over ``ids`` after its cache (``tree``: a tree's verify
        forward); with a feature-conditioned draft its last hidden states are kept for the
        draft's next catch-up."""
        if seq.states is None:
            return lm_forward(self.target, ids, seq.t_cache, keep=keep, tree=tree)
        start = seq.t_cache.get_seq_length()
        with seq.states.capture(self.target, start):
            logits = lm_forward(self.target, ids, seq.t_cache, keep=keep, tree=tree)
        seq.states.valid = seq.t_cache.get_seq_length()
        return logits

    def _tree_costs(self, unseen: int) -> np.ndarray | None:
        return self._costs.trees(unseen) if self._costs is not None else None

    def _step_costs(self, unseen: int) -> np.ndarray:
        return self._costs.drafting(unseen) if self._costs is not None else self._nan_costs

    def _decide_to_speculate(self, seq: _Sequence, max_gamma: int, clock: _Clock) -> bool:
        """The pre-draft decision (a policy without ``speculate`` always speculates)."""
        if self._speculate is None:
            return True
        started = time.perf_counter()
        history = seq.history
        unseen = history.unsettled + 1
        fill_pre_features(self._pre, history, self.compression)
        ctx = PreContext(self._pre.copy(), self.compression, seq.produced, max_gamma,
                         self._step_costs(unseen),
                         self._costs.plain if self._costs is not None else math.nan,
                         unseen, seq.skipped, tree_costs=self._tree_costs(unseen))
        go = bool(self._speculate(ctx))
        seq.skipped = 0 if go else seq.skipped + 1
        clock.decision += time.perf_counter() - started
        return go

    def _lookup_proposal(self, seq: _Sequence, max_gamma: int, clock: _Clock
                         ) -> LookupProposal | None:
        """The context lookup's continuation when the policy takes it this step (asked
        whenever the lookup proposes tokens), else None."""
        if self._lookup is None:
            return None
        started = time.perf_counter()
        prop = seq.lookup.propose(max_gamma)
        take = False
        if prop.tokens:
            history = seq.history
            unseen = history.unsettled + 1
            fill_pre_features(self._pre, history, self.compression)
            plain = self._costs.plain if self._costs is not None else math.nan
            pre = PreContext(self._pre.copy(), self.compression, seq.produced, max_gamma,
                             self._step_costs(unseen), plain, unseen, seq.skipped,
                             tree_costs=self._tree_costs(unseen))
            cost = (self._costs.t_verify[len(prop.tokens)] if self._costs is not None
                    else math.nan)
            take = bool(self._lookup(LookupContext(pre, len(prop.tokens), prop.match,
                                                   prop.occurrences, prop.agreeing, cost)))
        clock.decision += time.perf_counter() - started
        return prop if take else None

    def _lookup_step(self, seq: _Sequence, lookup: LookupProposal, sampler: _Sampler | None,
                     clock: _Clock) -> tuple[list[int], dict[str, Any]]:
        """Verify the context lookup's continuation in ONE target forward, no draft forward:
        a deterministic draft (q is one-hot), so sampling accepts token x with probability
        p(x) and otherwise samples p without x. The draft has seen none of the emitted
        tokens: they all wait for its next catch-up, as a plain step's token does."""
        tokens = list(lookup.tokens)
        k = len(tokens)
        start = seq.t_cache.get_seq_length()
        verify_ids = (seq.tokens[-1], *tokens)
        started = time.perf_counter()
        t_logits = self._target_forward(seq, list(verify_ids), keep=k + 1)
        clock.verify += time.perf_counter() - started
        t_rows = self._target_rows(t_logits)
        if sampler is None:
            accepted = len(Proposal.chain(tokens, "lookup").walk(
                lambda node: int(t_rows[node + 1].argmax())))
            nxt = int(t_rows[accepted].argmax())
        else:
            q = torch.nn.functional.one_hot(torch.tensor(tokens), t_rows.shape[-1]).float()
            accepted, nxt, _ = verify_sampled(sampler.probs(torch.from_numpy(t_rows)), q,
                                              tokens, sampler.generator)
        emitted = [*tokens[:accepted], nxt]
        p_emit = [token_prob(t_rows[i], token, self._stats) for i, token in enumerate(emitted)]
        emitted = self._cut_at_eos(emitted)
        seq.forwards.append(TargetForward(start, verify_ids, k + 1, len(emitted)))
        if len(emitted) < k + 1:
            seq.t_cache.crop(len(emitted) - k - 1)
            if seq.states is not None:
                seq.states.valid = seq.t_cache.get_seq_length()
        for p in p_emit[: len(emitted)]:
            seq.history.defer(p)
        seq.skipped += 1
        return emitted, {**_PLAIN_RECORD, **clock.record(),
                         "accept_len": min(accepted, len(emitted)), "accept_cap": k,
                         "gamma": None, "drafted": k, "source": "lookup",
                         "lookup_accept": min(accepted, len(emitted)), "lookup_length": k,
                         "lookup_match": lookup.match, "lookup_occurrences": lookup.occurrences,
                         "lookup_agreeing": lookup.agreeing}

    def _joined_lookup(self, seq: _Sequence, max_gamma: int, clock: _Clock
                       ) -> LookupProposal | None:
        """The context lookup's continuation (up to ``max_gamma`` tokens, as a lookup step
        would verify) when the policy joins it to this step's tree (asked whenever the lookup
        proposes tokens), else None."""
        if self._join_lookup is None:
            return None
        started = time.perf_counter()
        prop = seq.lookup.propose(max_gamma)
        take = bool(prop.tokens) and bool(self._join_lookup(
            len(prop.tokens), prop.match, prop.occurrences, prop.agreeing))
        clock.decision += time.perf_counter() - started
        return prop if take else None

    def _target_token(self, seq: _Sequence, sampler: _Sampler | None, clock: _Clock
                      ) -> tuple[int, np.ndarray]:
        """One target forward over the last token: the next token and its logits row."""
        start = seq.t_cache.get_seq_length()
        started = time.perf_counter()
        logits = self._target_forward(seq, seq.tokens[-1:], keep=1)[0]
        clock.verify += time.perf_counter() - started
        x = self._target_rows(logits)
        token = int(x.argmax()) if sampler is None else sampler.sample(logits)
        seq.forwards.append(TargetForward(start, (seq.tokens[-1],), 1, 1))
        return token, x

    def _plain_step(self, seq: _Sequence, sampler: _Sampler | None, clock: _Clock, *,
                    defer: bool) -> tuple[list[int], dict[str, Any]]:
        """One target forward, one token: policy "ar", the budget's last token, or a step the
        policy declined to speculate on (``defer``: the draft scores the token later)."""
        token, x = self._target_token(seq, sampler, clock)
        if defer:
            seq.history.defer(token_prob(x, token, self._stats))
        return [token], {**_PLAIN_RECORD, **clock.record()}

    def _speculative_step(self, seq: _Sequence, max_gamma: int, sampler: _Sampler | None,
                          clock: _Clock) -> tuple[list[int], dict[str, Any]]:
        policy, history = self.policy, seq.history
        # 1. catch-up: the draft's first forward of the step scores the deferred tokens and
        #    yields the first proposal
        unseen = seq.tokens[seq.draft_seen :]
        if len(unseen) != history.unsettled + 1:  # the cache invariant; cannot happen
            raise DecodeError(f"internal: the draft is {len(unseen)} tokens behind with "
                              f"{history.unsettled} deferred; please report this.")
        costs = self._step_costs(len(unseen))
        started = time.perf_counter()
        d_logits = lm_forward(self.draft, unseen, seq.d_cache, keep=len(unseen))
        clock.draft += time.perf_counter() - started
        started = time.perf_counter()
        seq.draft_seen = len(seq.tokens)
        rows = self._draft_rows(d_logits)
        if history.pending:  # row r scores the token after unseen[r]
            verdicts = rows[:-1].argmax(-1) == np.asarray(seq.tokens[-len(history.pending):])
            history.settle_deferred(verdicts.tolist())
        first = rows[-1]
        best, entropy, top1, margin = self._stats.with_argmax(first)
        fill_step_features(self._features, entropy, top1, margin, history, self.compression)
        features = self._features.copy()
        record = {"draft_entropy": float(features[0]), "draft_top1": float(features[1]),
                  "draft_margin": float(features[2]),
                  "target_top1_prev": history.target_top1_prev, "agree_ema": history.ema,
                  "agree_run": history.run}
        ctx = StepContext(features=features, compression=self.compression,
                          position=seq.produced, max_gamma=max_gamma, costs=costs,
                          tree_costs=self._tree_costs(len(unseen)))
        choice = int(policy.choose(ctx))
        clock.decision += time.perf_counter() - started
        if not PLAIN <= choice < N_DRAFT_OPTIONS:
            raise DecodeError(f"Policy {policy.name!r} chose {choice}; choose() must return "
                              f"1..{GAMMA_MAX} (a chain of γ tokens), {GAMMA_MAX + 1}.."
                              f"{N_DRAFT_OPTIONS - 1} (a tree, speckv.runtime.proposal.TREES), or "
                              f"{PLAIN} for a plain target step.")
        if choice == PLAIN:  # drafted once, then a plain step: the proposal scores the token
            token, x = self._target_token(seq, sampler, clock)
            history.settle(best == token, token_prob(x, token, self._stats))
            return [token], {**_PLAIN_RECORD, **record, **clock.record()}
        tree = tree_index(choice)
        if tree is not None:
            return self._tree_step(seq, TREES[tree], max_gamma, first, best, sampler, clock,
                                   record)
        gamma = min(choice, max_gamma)
        # 2. drafting, with the policy's per-token stopping rule
        prop = self._draft(seq, first, best, gamma, top1, entropy, sampler, clock)
        k = len(prop.tokens)
        # 3. verification: ONE target forward over [last emitted token, drafted tokens]
        start = seq.t_cache.get_seq_length()
        verify_ids = (seq.tokens[-1], *prop.tokens)
        started = time.perf_counter()
        t_logits = self._target_forward(seq, list(verify_ids), keep=k + 1)
        clock.verify += time.perf_counter() - started
        t_rows = self._target_rows(t_logits)
        t_logits = torch.from_numpy(t_rows)
        if sampler is None:
            target_best = t_rows.argmax(-1).tolist()
            accepted = len(Proposal.chain(prop.tokens).walk(lambda node: target_best[node + 1]))
            nxt, accept_probs = target_best[accepted], None
        else:
            accepted, nxt, accept_probs = sampler.verify(t_logits, prop)
        emitted = [*prop.tokens[:accepted], nxt]
        p_emit = [token_prob(t_rows[i], token, self._stats) for i, token in enumerate(emitted)]
        emitted = self._cut_at_eos(emitted)
        seq.forwards.append(TargetForward(start, verify_ids, k + 1, len(emitted)))
        from_draft = min(accepted, len(emitted))
        # 4. history in position order; a bonus token waits for the next catch-up forward.
        #    A feature-conditioned draft proposed tokens 2.. from its own states, not from
        #    the target's: its agreement there is settled by the next catch-up, which reads
        #    the target's (what a trace scores)
        for i, token in enumerate(emitted):
            if i == 0 or (not self.reads_target and (i < accepted or accepted < k)):
                history.settle(prop.greedy[i] == token, p_emit[i])
            else:
                history.defer(p_emit[i])
        # 5. rollback: the target keeps tokens[:-1], the draft its still valid prefix (a
        #    feature-conditioned draft: the positions it computed from the target's states)
        if len(emitted) < k + 1:
            seq.t_cache.crop(len(emitted) - k - 1)
            if seq.states is not None:
                seq.states.valid = seq.t_cache.get_seq_length()
        keep = len(seq.tokens) + (0 if self.reads_target else min(from_draft, k - 1))
        if seq.draft_seen > keep:
            seq.d_cache.crop(keep - seq.draft_seen)
            seq.draft_seen = keep
        policy.observe(k, from_draft)
        record.update(draft_entropy_k=prop.entropy, draft_top1_k=prop.top1,
                      accept_len=from_draft, accept_cap=k, accept_prob_k=accept_probs,
                      gamma=gamma, drafted=k, tree_size=None, source="draft", **clock.record())
        return emitted, record

    def _tree_step(self, seq: _Sequence, shape: TreeShape, max_gamma: int, first: np.ndarray,
                   best: int, sampler: _Sampler | None, clock: _Clock,
                   record: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """Grow a tree from the first proposal, verify it in ONE target forward, keep the
        accepted path (:mod:`speckv.decode.tree`). Near the budget's end the tree is no deeper
        than the tokens left (a trace records the same cut).

        Every emitted token but the first waits for the next catch-up, whatever the draft's
        kind: the draft's cache keeps none of the tree (its nodes sit in tree order), so the
        catch-up feeds the emitted tokens again and scores them on the true prefix.
        """
        history = seq.history
        for role, model in (("target", self.target), ("draft", self.draft)):
            if not supports_4d_masks(model):
                raise DecodeError(
                    f"Policy {self.policy.name!r} chose a tree, but the {role} cannot take the "
                    "4-D attention mask a tree needs (sliding-window layers, or an attention "
                    "implementation other than sdpa/eager): use chains (fixed:K, a chain-only "
                    "controller) with this pair.")
        shape = TreeShape(shape.size, min(shape.depth, max_gamma), shape.branch)
        started = time.perf_counter()
        base = seq.d_cache.get_seq_length()
        root = Root(torch.from_numpy(first), 0, base, base,
                    getattr(seq.d_cache, "own", None))
        draft = TreeDraft(self.draft, seq.d_cache, [root])
        slots = Slots() if sampler is None else Slots(sampler.temperature, sampler.generator)
        try:
            grown = grow(draft, [root], shape.depth, shape.branch, slots)[0].top(shape)
        finally:
            draft.reset()
        prop = grown.proposal
        clock.draft += time.perf_counter() - started
        joined = self._joined_lookup(seq, max_gamma, clock)
        if joined is not None:  # one more branch, verified in the same forward
            prop, _ = prop.with_branch(joined.tokens)
        # verification: [last emitted token, nodes...] with the tree's mask
        start = seq.t_cache.get_seq_length()
        verify_ids = (seq.tokens[-1], *prop.tokens.tolist())
        started = time.perf_counter()
        t_logits = self._target_forward(seq, list(verify_ids), keep=len(verify_ids), tree=prop)
        clock.verify += time.perf_counter() - started
        t_rows = self._target_rows(t_logits)
        if sampler is None:
            path = prop.walk(lambda node: int(t_rows[node + 1].argmax()))
            nxt = int(t_rows[path[-1] + 1 if path else 0].argmax())
        else:
            path, nxt = verify_sampled_tree(sampler.probs(torch.from_numpy(t_rows)), grown,
                                            sampler.generator)
        rows = [0, *(1 + j for j in path)]
        emitted = [*prop.tokens[path].tolist(), nxt]
        p_emit = [token_prob(t_rows[r], token, self._stats)
                  for r, token in zip(rows, emitted, strict=True)]
        emitted = self._cut_at_eos(emitted)
        seq.forwards.append(TargetForward(start, verify_ids, len(verify_ids), len(emitted),
                                          tuple(prop.parents.tolist()), tuple(path)))
        keep_rows(seq.t_cache, start, rows[: len(emitted)])
        if seq.states is not None:
            keep_state_rows(seq.states, start, rows[: len(emitted)])
        history.settle(best == emitted[0], p_emit[0])
        for p in p_emit[1 : len(emitted)]:
            history.defer(p)
        from_draft = min(len(path), len(emitted))
        cap = shape.depth
        if joined is not None:  # the lookup's own outcome: its tokens the target agrees with
            cap = max(cap, len(joined.tokens))
            lookup = Proposal.chain(joined.tokens, "lookup").walk(
                lambda node: emitted[node + 1] if node + 1 < len(emitted) else None)
            record.update(lookup_accept=len(lookup),
                          lookup_length=len(joined.tokens), lookup_match=joined.match,
                          lookup_occurrences=joined.occurrences,
                          lookup_agreeing=joined.agreeing)
        self.policy.observe(cap, from_draft)
        record.update(draft_entropy_k=None, draft_top1_k=None, accept_len=from_draft,
                      accept_cap=cap, accept_prob_k=None, gamma=None,
                      drafted=len(grown.proposal),
                      tree_size=shape.size, source=prop.source, **clock.record())
        return emitted, record

    def _draft(self, seq: _Sequence, first: np.ndarray, best: int, gamma: int, top1: float,
               entropy: float, sampler: _Sampler | None, clock: _Clock) -> _Proposal:
        """Propose up to ``gamma`` tokens from the first proposal's logits ``first``."""
        prop = _Proposal([], [], [], [entropy], [top1])
        x = first
        while True:
            prop.greedy.append(best)
            prop.tokens.append(best if sampler is None
                               else sampler.propose(torch.from_numpy(x), prop))
            k = len(prop.tokens)
            if k >= gamma or not self.policy.keep_drafting(k, prop.top1[-1], prop.entropy[-1]):
                return prop
            started = time.perf_counter()
            logits = lm_forward(self.draft, prop.tokens[-1:], seq.d_cache)[0]
            clock.draft += time.perf_counter() - started
            seq.draft_seen += 1
            x = self._draft_rows(logits)
            if self._token_stats:
                best, entropy, top1, _ = self._stats.with_argmax(x)
            else:  # the stopping rule reads neither: the greedy token is all it takes
                best, entropy, top1 = int(x.argmax()), math.nan, math.nan
            prop.entropy.append(entropy)
            prop.top1.append(top1)

    # ---------------------------------------------------------------------------- helpers
    def _cut_at_eos(self, emitted: list[int]) -> list[int]:
        for i, tok in enumerate(emitted):
            if tok in self.eos:
                return emitted[: i + 1]
        return emitted


@torch.inference_mode()
def measure_catchup(draft: torch.nn.Module | LoadedModel, sizes: int = CATCHUP_MAX,
                    context_len: int | None = None, repeats: int = 5, warmup: int = 1
                    ) -> list[float]:
    """Seconds of one draft forward over ``n = 1..sizes`` tokens (median of ``repeats``).

    The forward the decoder runs to catch the draft up after plain steps (and after every
    step, over one or two tokens), timed as :func:`speckv.decode.costs.measure_costs` times
    the others: after a ``context_len``-token prefix, cropped back after each call, the sizes
    round-robin. Store the list as ``CostModel.cost_catchup_s`` (see :func:`with_catchup`).
    """
    from speckv.decode.costs import CONTEXT_LEN

    model = module_of(draft)
    context_len = CONTEXT_LEN if context_len is None else context_len
    rng = np.random.default_rng(1)
    vocab = int(model.config.vocab_size)
    context = rng.integers(3, vocab, size=context_len).tolist()
    probe = rng.integers(3, vocab, size=sizes).tolist()
    cache = new_cache(model)
    lm_forward(model, context, cache)

    def call(n: int) -> float:
        started = time.perf_counter()
        lm_forward(model, probe[:n], cache, keep=n)
        elapsed = time.perf_counter() - started
        cache.crop(-n)
        return elapsed

    for _ in range(warmup):
        for n in range(1, sizes + 1):
            call(n)
    times: list[list[float]] = [[] for _ in range(sizes)]
    for _ in range(repeats):
        for n in range(1, sizes + 1):
            times[n - 1].append(call(n))
    return [float(np.median(t)) for t in times]


def with_catchup(costs: CostModel, draft: torch.nn.Module | LoadedModel, **kwargs: Any
                 ) -> CostModel:
    """``costs`` with a measured ``cost_catchup_s`` (:func:`measure_catchup`), a new object."""
    import dataclasses

    catchup = measure_catchup(draft, context_len=costs.context_len, **kwargs)
    return dataclasses.replace(costs, cost_catchup_s=catchup)


def measure_step_costs(draft: torch.nn.Module | LoadedModel,
                       target: torch.nn.Module | LoadedModel) -> CostModel:
    """Every cost a policy is priced with, measured for this pair on this machine: the draft
    token and the target's verify forwards (:func:`speckv.decode.costs.measure_costs`), the
    catch-up forward per size (:func:`with_catchup`) and, where both models take a tree's
    4-D mask, each tree's growth and verify (:func:`speckv.decode.costs.measure_tree_costs`)."""
    from speckv.decode.costs import measure_costs, measure_tree_costs

    costs = with_catchup(measure_costs(draft, target), draft)
    if supports_4d_masks(module_of(target)) and supports_4d_masks(module_of(draft)):
        costs = measure_tree_costs(costs, draft, target)
    return costs


def records_frame(steps: list[dict[str, Any]]) -> pd.DataFrame:
    """Step records as a frame in ``speckv.records.COLUMNS`` order, validated."""
    import pandas as pd

    from speckv.records import COLUMNS, validate

    df = pd.DataFrame(steps, columns=list(COLUMNS))
    lookup = [(c, "Int16") for c in COLUMNS if c.startswith("lookup_")]
    for name, dtype in (("agree_run", "Int32"), ("gamma", "Int16"), ("drafted", "Int16"),
                        ("tree_size", "Int16"), ("seq_len", "Int32"),
                        ("max_new_tokens", "Int32"), *lookup):
        df[name] = df[name].astype(dtype)
    return validate(df)
