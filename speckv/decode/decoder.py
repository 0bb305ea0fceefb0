"""Lossless speculative decoding over Hugging Face causal LMs, with a pluggable γ policy.

One step (the definition :mod:`speckv.policies` documents):

1. the draft's first forward catches up on the tokens it has not seen yet (one, or two after
   a fully accepted step) and yields the first proposal's logits; those logits and the
   agreement history give the decision-time features (:func:`speckv.runtime.features.step_features`);
2. ``γ = min(policy.choose(ctx), max_gamma)``, ``max_gamma = min(8, max_new_tokens -
   produced - 1)``; when ``max_gamma == 0`` the step is a plain target step instead;
3. the draft proposes up to γ tokens; ``policy.keep_drafting(k, top1, entropy)`` after each;
4. the target verifies ``[last emitted token, drafted tokens...]`` in ONE forward;
5. greedy: accept while the target's argmax equals the draft token, then emit the target's
   token. Sampling (temperature > 0): accept token x with probability min(1, p(x)/q(x)); on
   rejection sample from norm(max(0, p − q)); after a fully accepted step sample the bonus
   token from p. Either way the output has exactly the target's distribution;
6. both KV caches are cropped back to the accepted prefix (no recomputation). An emitted
   EOS ends the answer, even inside the accepted drafted tokens (nothing after it is kept).

Cache invariants between steps, for the sequence ``tokens`` (prompt + emitted):
the target's cache holds ``tokens[:-1]``; the draft's holds ``tokens[:draft_seen]`` with one
or two tokens still unseen. With policy ``None`` ("ar") the same loop runs plain target steps.

Agreement history (:class:`speckv.runtime.features.History`) is settled with every emitted token:
agreed = "the draft's greedy token given the true prefix equals the emitted token". Accepted
tokens and the first rejected position are known at verification (the draft's logits there
were computed while drafting); the bonus token after a fully accepted step is settled by the
next step's catch-up forward, which computes the draft's logits for that position. So the
features at every decision equal those of a trace at the same position (:mod:`speckv.profile.profiler`).

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

import argparse
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from speckv import paths
from speckv.decode.costs import lm_forward, new_cache
from speckv.errors import SpeckvError
from speckv.paths import find_file
from speckv.policies import Learned, Policy, StepContext
from speckv.runtime.features import GAMMA_MAX, History, step_features

if TYPE_CHECKING:
    import pandas as pd
    from transformers import DynamicCache

    from speckv.decode.costs import CostModel
    from speckv.llm.load import LoadedModel

log = logging.getLogger(__name__)

#: the controller shipped with the repository; the default policy when it exists.
DEFAULT_CONTROLLER: Final = find_file(paths.DEFAULT_CONTROLLER)
DEFAULT_MAX_NEW_TOKENS: Final = 128
#: ``--draft untrained[:LAYERS]``: a draft built from the target's layers without training.
UNTRAINED: Final = "untrained"


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


def _module(model: torch.nn.Module | LoadedModel | None) -> torch.nn.Module | None:
    return model if model is None or isinstance(model, torch.nn.Module) else model.model


def eos_ids(model: torch.nn.Module | LoadedModel) -> frozenset[int]:
    """The target's end-of-sequence ids: generation config, model config and tokenizer."""
    found: set[int] = set()
    module = _module(model)
    sources = (getattr(getattr(module, "generation_config", None), "eos_token_id", None),
               getattr(module.config, "eos_token_id", None),
               getattr(getattr(model, "tokenizer", None), "eos_token_id", None))
    for value in sources:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, Iterable):
            found.update(int(v) for v in value)
    return frozenset(found)


def _entropy_top1(logits: torch.Tensor) -> tuple[float, float]:
    """Entropy (nats) and top-1 probability of one row of logits (as token_stats computes)."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    return float(-(p * logp).sum()), float(p.max())


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
    pending_top1: float | None = None  # target prob. of a bonus token not yet settled
    forwards: list[TargetForward] = field(default_factory=list)  # the target's, in order

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

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, -1)

    def sample(self, logits: torch.Tensor) -> int:
        return int(torch.multinomial(self._probs(logits), 1, generator=self.generator))

    def propose(self, logits: torch.Tensor, prop: _Proposal) -> int:
        q = self._probs(logits)
        prop.probs.append(q)
        return int(torch.multinomial(q, 1, generator=self.generator))

    def verify(self, t_logits: torch.Tensor, prop: _Proposal) -> tuple[int, int, list[float]]:
        return verify_sampled(self._probs(t_logits), torch.stack(prop.probs), prop.tokens,
                              self.generator)


#: the record columns of a plain target step: nothing drafted, no decision taken.
_PLAIN_RECORD: Final = {
    "draft_entropy": None, "draft_top1": None, "draft_margin": None,
    "target_top1_prev": None, "agree_ema": None, "agree_run": None,
    "draft_entropy_k": None, "draft_top1_k": None,
    "accept_len": 0, "accept_cap": 0, "accept_prob_k": None, "gamma": 0, "drafted": 0,
}


class SpeculativeDecoder:
    """Speculative decoding of one sequence at a time with a γ policy (``None``: target alone).

    ``draft``/``target``: :class:`~speckv.llm.load.LoadedModel` or bare HF causal LMs sharing a
    vocabulary. ``costs`` feeds ``StepContext.costs``; a learned policy needs it (others
    ignore it, and get NaN when it is missing). ``eos_token_ids`` overrides the target's.
    """

    def __init__(self, draft: torch.nn.Module | LoadedModel | None,
                 target: torch.nn.Module | LoadedModel, policy: Policy | None,
                 costs: CostModel | None = None, *, compression: str | None = None,
                 eos_token_ids: Iterable[int] | None = None, run_id: str | None = None,
                 max_gamma: int = GAMMA_MAX) -> None:
        if policy is not None and draft is None:
            raise DecodeError(f"Policy {policy.name!r} drafts tokens: pass a draft model (or "
                              "use policy 'ar' for the target alone).")
        if isinstance(policy, Learned) and costs is None:
            raise DecodeError("A learned controller chooses γ from measured step costs: pass "
                              "costs=speckv.decode.costs.measure_costs(draft, target) (the CLI measures "
                              "them at start-up, or reads --costs FILE).")
        if not 1 <= max_gamma <= GAMMA_MAX:
            raise DecodeError(f"max_gamma must lie in 1..{GAMMA_MAX}, got {max_gamma}.")
        self.draft = _module(draft) if policy is not None else None
        self.target = _module(target)
        self.policy = policy
        self.costs = costs
        self.max_gamma = max_gamma
        self.compression = compression or getattr(target, "compression", None) or "fp16"
        self.eos = frozenset(eos_token_ids) if eos_token_ids is not None else eos_ids(target)
        self._step_costs = (costs.step_costs() if costs is not None
                            else np.full(GAMMA_MAX, np.nan, np.float32))
        dtype = getattr(target, "compute_dtype", None) or str(
            next(self.target.parameters()).dtype).removeprefix("torch.")
        cost_verify = (np.asarray(costs.cost_verify_s, np.float32) if costs is not None
                       else None)
        self._ident = {
            "run_id": run_id or f"live-{uuid.uuid4().hex[:8]}",
            "draft_model": getattr(draft, "name", "") if policy is not None else "",
            "target_model": getattr(target, "name", ""),
            "compression": self.compression, "compute_dtype": dtype,
            "mode": "live", "replayable": False,
            "cost_draft_s": costs.cost_draft_s if costs is not None else None,
            "cost_verify_s": cost_verify,
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
                emitted, record = self._plain_step(seq, sampler)
            else:
                emitted, record = self._speculative_step(seq, max_gamma, sampler)
            record.update(ident, step=len(steps), position=seq.produced)
            seq.tokens.extend(emitted)
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
        forwards = []
        if len(prompt_ids) > 1:
            lm_forward(self.target, prompt_ids[:-1], t_cache)
            forwards.append(TargetForward(0, tuple(prompt_ids[:-1]), 1, 0))
            if d_cache is not None:
                lm_forward(self.draft, prompt_ids[:-1], d_cache)
        return _Sequence(list(prompt_ids), len(prompt_ids), t_cache, d_cache,
                         len(prompt_ids) - 1, History(), forwards=forwards)

    def _plain_step(self, seq: _Sequence, sampler: _Sampler | None,
                    ) -> tuple[list[int], dict[str, Any]]:
        """One target forward, one token (policy "ar", or one token left to produce)."""
        start = seq.t_cache.get_seq_length()
        logits = lm_forward(self.target, seq.tokens[-1:], seq.t_cache)[0]
        token = int(logits.float().argmax()) if sampler is None else sampler.sample(logits)
        seq.forwards.append(TargetForward(start, (seq.tokens[-1],), 1, 1))
        return [token], dict(_PLAIN_RECORD)

    def _speculative_step(self, seq: _Sequence, max_gamma: int, sampler: _Sampler | None,
                          ) -> tuple[list[int], dict[str, Any]]:
        policy, history = self.policy, seq.history
        # 1. catch-up: the draft's first forward of the step yields the first proposal
        unseen = seq.tokens[seq.draft_seen :]
        d_logits = lm_forward(self.draft, unseen, seq.d_cache, keep=len(unseen))
        seq.draft_seen = len(seq.tokens)
        if seq.pending_top1 is not None:  # row 0 scores the last step's bonus token
            history.settle(int(d_logits[0].float().argmax()) == seq.tokens[-1],
                           seq.pending_top1)
            seq.pending_top1 = None
        first = d_logits[-1]
        features = step_features(first.float().numpy(), history, self.compression)
        record = {"draft_entropy": float(features[0]), "draft_top1": float(features[1]),
                  "draft_margin": float(features[2]),
                  "target_top1_prev": history.target_top1_prev, "agree_ema": history.ema,
                  "agree_run": history.run}
        ctx = StepContext(features=features, compression=self.compression,
                          position=seq.produced, max_gamma=max_gamma, costs=self._step_costs)
        gamma = max(1, min(int(policy.choose(ctx)), max_gamma))
        # 2. drafting, with the policy's per-token stopping rule
        prop = self._draft(seq, first, gamma, record["draft_top1"], record["draft_entropy"],
                           sampler)
        k = len(prop.tokens)
        # 3. verification: ONE target forward over [last emitted token, drafted tokens]
        start = seq.t_cache.get_seq_length()
        verify_ids = (seq.tokens[-1], *prop.tokens)
        t_logits = lm_forward(self.target, list(verify_ids), seq.t_cache, keep=k + 1)
        t_logits = t_logits.float()
        if sampler is None:
            best = t_logits.argmax(-1).tolist()
            accepted = 0
            while accepted < k and prop.tokens[accepted] == best[accepted]:
                accepted += 1
            nxt, accept_probs = best[accepted], None
        else:
            accepted, nxt, accept_probs = sampler.verify(t_logits, prop)
        emitted = [*prop.tokens[:accepted], nxt]
        p_emit = torch.softmax(t_logits[: accepted + 1], -1).gather(
            1, torch.tensor(emitted)[:, None])[:, 0].tolist()
        emitted = self._cut_at_eos(emitted)
        seq.forwards.append(TargetForward(start, verify_ids, k + 1, len(emitted)))
        from_draft = min(accepted, len(emitted))
        # 4. history in position order; a bonus token waits for the next catch-up forward
        for i, token in enumerate(emitted):
            if i < accepted or accepted < k:
                history.settle(prop.greedy[i] == token, p_emit[i])
            else:
                seq.pending_top1 = p_emit[i]
        # 5. rollback: the target keeps tokens[:-1], the draft its still valid prefix
        if len(emitted) < k + 1:
            seq.t_cache.crop(len(emitted) - k - 1)
        keep = len(seq.tokens) + min(from_draft, k - 1)
        if seq.draft_seen > keep:
            seq.d_cache.crop(keep - seq.draft_seen)
            seq.draft_seen = keep
        policy.observe(k, from_draft)
        record.update(draft_entropy_k=prop.entropy, draft_top1_k=prop.top1,
                      accept_len=from_draft, accept_cap=k, accept_prob_k=accept_probs,
                      gamma=gamma, drafted=k)
        return emitted, record

    def _draft(self, seq: _Sequence, first: torch.Tensor, gamma: int, top1: float,
               entropy: float, sampler: _Sampler | None) -> _Proposal:
        """Propose up to ``gamma`` tokens from the first proposal's logits ``first``."""
        prop = _Proposal([], [], [], [entropy], [top1])
        logits = first
        while True:
            best = int(logits.float().argmax())
            prop.greedy.append(best)
            prop.tokens.append(best if sampler is None else sampler.propose(logits, prop))
            k = len(prop.tokens)
            if k >= gamma or not self.policy.keep_drafting(k, prop.top1[-1], prop.entropy[-1]):
                return prop
            logits = lm_forward(self.draft, prop.tokens[-1:], seq.d_cache)[0]
            seq.draft_seen += 1
            entropy, top1 = _entropy_top1(logits)
            prop.entropy.append(entropy)
            prop.top1.append(top1)

    # ---------------------------------------------------------------------------- helpers
    def _cut_at_eos(self, emitted: list[int]) -> list[int]:
        for i, tok in enumerate(emitted):
            if tok in self.eos:
                return emitted[: i + 1]
        return emitted


def records_frame(steps: list[dict[str, Any]]) -> pd.DataFrame:
    """Step records as a frame in ``speckv.records.COLUMNS`` order, validated."""
    import pandas as pd

    from speckv.records import COLUMNS, validate

    df = pd.DataFrame(steps, columns=list(COLUMNS))
    for name, dtype in (("agree_run", "Int32"), ("gamma", "Int16"), ("drafted", "Int16"),
                        ("seq_len", "Int32"), ("max_new_tokens", "Int32")):
        df[name] = df[name].astype(dtype)
    return validate(df)


# ------------------------------------------------------------------------ greedy checks
def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two outputs differ (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass(frozen=True)
class Violation:
    """A breach of the greedy invariant found by :func:`greedy_invariant`.

    ``position`` indexes the answer (``None`` when the forward log itself is inconsistent);
    ``emitted`` is the token there and ``argmax`` the replayed row's argmax, when known.
    """

    position: int | None
    emitted: int | None
    argmax: int | None
    reason: str

    def __str__(self) -> str:
        where = f"token {self.position}" if self.position is not None else "forward log"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Difference:
    """Where a greedy output first parts from one-token decoding, and what the target says.

    ``one_token_argmax``: the argmax of the target's one-token forward there (recomputed from
    a fresh cache, one token per forward after the prefill, as one-token decoding runs);
    ``chunked_argmax``: the argmax of the row that emitted the token in the replay of the
    decoder's own forwards (same chunks, same crops). Gaps are logit differences, positive
    when each forward prefers its own token: ``one_token_gap = l[reference] - l[emitted]`` in
    the one-token forward, ``chunked_gap = l[emitted] - l[reference]`` in the chunked one.
    A length difference (one output ends where the other goes on) has ``None`` tokens.
    """

    position: int
    reference: int | None
    emitted: int | None
    one_token_argmax: int | None = None
    chunked_argmax: int | None = None
    one_token_gap: float | None = None
    chunked_gap: float | None = None

    @property
    def explained(self) -> bool:
        """The target's one-token forward gives the reference token and its chunked forward
        the emitted one: the difference lies in the target's numerics, not the decoder."""
        return (self.reference is not None and self.emitted is not None
                and self.one_token_argmax == self.reference
                and self.chunked_argmax == self.emitted)


def _forward(module: torch.nn.Module, ids: list[int] | tuple[int, ...], cache: Any,
             keep: int) -> torch.Tensor:
    """One HF forward (not through speckv's lm_forward): float32 logits of the last ``keep``."""
    out = module(input_ids=torch.tensor([list(ids)]), cache=cache, use_cache=True,
                 logits_to_keep=keep)
    return out.logits[0].float()


def _fresh_cache(module: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=module.config)


def _replay(module: torch.nn.Module, forwards: Iterable[TargetForward],
            ) -> Iterable[tuple[int, TargetForward, torch.Tensor, list[int]]]:
    """Recompute logged forwards from a fresh cache: ``(index, forward, kept rows, context)``.

    ``context`` lists the ids the replayed cache holds after the forward. Stops early (the
    caller notices the missing rows) when a forward starts past what the cache holds.
    """
    cache = _fresh_cache(module)
    context: list[int] = []
    for i, fwd in enumerate(forwards):
        if fwd.start > len(context):
            return
        if len(context) > fwd.start:
            cache.crop(fwd.start - len(context))
            del context[fwd.start :]
        logits = _forward(module, fwd.ids, cache, fwd.keep)
        context.extend(fwd.ids)
        yield i, fwd, logits, context


@torch.inference_mode()
def greedy_invariant(target: torch.nn.Module | LoadedModel, prompt_ids: list[int],
                     result: DecodeResult) -> list[Violation]:
    """Check that every emitted token is the argmax of the target's logits in the forward that
    verified it; returns the violations (none: the invariant holds).

    Recomputes ``result.target_forwards`` independently, from a fresh cache and calling the
    HF model directly, with the decoder's chunking: the same ids per forward, the same
    ``logits_to_keep``, the same crops. Also checks that every answer position was emitted
    exactly once, by a row whose context was the true prefix (prompt + answer before it).
    This holds exactly on any machine (the replay repeats the decoder's computation), unlike
    equality with one-token decoding, which depends on the target's numerics
    (:func:`explain_difference`). Greedy results only.
    """
    if result.temperature > 0:
        raise DecodeError("greedy_invariant checks greedy decoding; this result was sampled "
                          f"at temperature {result.temperature}.")
    module = _module(target)
    prompt = [int(t) for t in prompt_ids]
    answer = [int(t) for t in result.token_ids]
    full = prompt + answer
    n_prompt = len(prompt)
    emitted_by: list[int | None] = [None] * len(answer)
    out: list[Violation] = []
    good = 0  # the replayed context agrees with ``full`` on its first ``good`` ids
    replayed = 0
    for i, fwd, logits, context in _replay(module, result.target_forwards):
        replayed += 1
        good = min(good, fwd.start)
        while good < min(len(context), len(full)) and context[good] == full[good]:
            good += 1
        lead = len(fwd.ids) - fwd.keep
        if fwd.emitted > fwd.keep or lead < 0:
            out.append(Violation(None, None, None, f"forward {i} emits {fwd.emitted} rows of "
                                 f"{fwd.keep} kept over {len(fwd.ids)} ids"))
            continue
        best = logits[: fwd.emitted].argmax(-1).tolist()
        for r in range(fwd.emitted):
            at = fwd.start + lead + r + 1  # index into ``full`` of the token row r emitted
            pos = at - n_prompt
            if not 0 <= pos < len(answer):
                out.append(Violation(None, None, int(best[r]), f"forward {i} row {r} scores "
                                     f"sequence position {at}, outside the answer"))
                continue
            if emitted_by[pos] is not None:
                out.append(Violation(pos, answer[pos], int(best[r]), f"emitted again by "
                                     f"forward {i} (first by forward {emitted_by[pos]})"))
                continue
            emitted_by[pos] = i
            if good < at:
                out.append(Violation(pos, answer[pos], int(best[r]), f"forward {i} verified "
                                     f"it after a context that is not the true prefix (first "
                                     f"wrong id at sequence position {good})"))
            elif best[r] != answer[pos]:
                out.append(Violation(pos, answer[pos], int(best[r]), f"emitted {answer[pos]}, "
                                     f"but the argmax of forward {i} row {r} is {best[r]}"))
    if replayed < len(result.target_forwards):
        fwd = result.target_forwards[replayed]
        out.append(Violation(None, None, None, f"forward {replayed} starts at {fwd.start}, "
                             "past what the cache holds"))
    out.extend(Violation(pos, answer[pos], None, "no target forward emitted it")
               for pos, by in enumerate(emitted_by) if by is None)
    return out


@torch.inference_mode()
def one_token_logits(target: torch.nn.Module | LoadedModel, prompt_ids: list[int],
                     answer: list[int]) -> torch.Tensor:
    """The target's float32 logits for the token after ``prompt_ids + answer`` by one-token
    decoding: a fresh cache, the prefill over ``prompt[:-1]``, then one token per forward
    (the chunking of ``SpeculativeDecoder(None, target, None)``, recomputed independently)."""
    module = _module(target)
    cache = _fresh_cache(module)
    prompt = [int(t) for t in prompt_ids]
    if len(prompt) > 1:
        _forward(module, prompt[:-1], cache, 1)
    logits = None
    for token in [prompt[-1], *answer]:
        logits = _forward(module, [int(token)], cache, 1)[0]
    return logits


@torch.inference_mode()
def explain_difference(target: torch.nn.Module | LoadedModel, prompt_ids: list[int],
                       result: DecodeResult, reference: list[int]) -> Difference | None:
    """Where ``result`` first parts from ``reference`` (one-token greedy decoding of the same
    prompt), the target's own verdicts there: its one-token forward and the chunked forward
    that emitted the token (:class:`Difference`). ``None`` when the outputs are identical."""
    answer = [int(t) for t in result.token_ids]
    reference = [int(t) for t in reference]
    at = first_difference(reference, answer)
    if at is None:
        return None
    ref_tok = reference[at] if at < len(reference) else None
    out_tok = answer[at] if at < len(answer) else None
    if ref_tok is None or out_tok is None:
        return Difference(at, ref_tok, out_tok)
    one = one_token_logits(target, prompt_ids, reference[:at])
    target_pos = len(prompt_ids) + at  # index into prompt + answer
    chunked = None
    with torch.inference_mode():
        for _, fwd, logits, _ in _replay(_module(target), result.target_forwards):
            lead = len(fwd.ids) - fwd.keep
            r = target_pos - 1 - fwd.start - lead
            if 0 <= r < fwd.emitted:
                chunked = logits[r]
                break
    return Difference(
        at, ref_tok, out_tok, int(one.argmax()),
        int(chunked.argmax()) if chunked is not None else None,
        float(one[ref_tok] - one[out_tok]),
        float(chunked[out_tok] - chunked[ref_tok]) if chunked is not None else None)


# ------------------------------------------------------------------------------- loading
def default_policy_spec() -> str:
    """``onnx:export/speckv.onnx`` when the shipped controller exists, else ``heuristic``."""
    return f"onnx:{DEFAULT_CONTROLLER}" if DEFAULT_CONTROLLER.is_file() else "heuristic"


def needs_costs(policy: Policy | None) -> bool:
    """Whether the policy reads ``StepContext.costs`` (the learned controllers do)."""
    return isinstance(policy, Learned)


def load_draft(spec: str, target: LoadedModel, dtype: str = "bfloat16") -> LoadedModel:
    """The draft for ``target``: the demo draft, a directory or hub id, or ``untrained[:L,..]``.

    ``untrained:0,1,2`` builds a draft from the target's layers 0, 1 and 2 without training
    (for experiments before the trained draft exists; it rarely agrees with the target).
    """
    from speckv.llm.load import LoadedModel, check_same_tokenizer, load_model
    from speckv.llm.weights import DEMO_DRAFT
    from speckv.paths import DRAFT_DIR

    started = time.perf_counter()
    if spec == UNTRAINED or spec.startswith(f"{UNTRAINED}:"):
        from speckv.llm.draft import DraftSpec, build_draft

        _, _, layers = spec.partition(":")
        try:
            init = [int(x) for x in layers.split(",")] if layers else DraftSpec().init_layers
        except ValueError:
            raise DecodeError(f"--draft {spec!r}: write untrained:0,1,2 (target layer indices "
                              "to copy).") from None
        model = build_draft(DraftSpec(base=target.name, init_layers=init)).to(getattr(torch,
                                                                                   dtype))
        model.eval()
        model.requires_grad_(False)
        return LoadedModel(spec, model, target.tokenizer, "fp16", dtype,
                           time.perf_counter() - started)
    if spec == DEMO_DRAFT and not (DRAFT_DIR / "speckv_draft.json").is_file():
        raise DecodeError(f"The demo draft {DEMO_DRAFT!r} is not there yet ({DRAFT_DIR} is "
                          "missing): train it with `python -m speckv draft distill`, or pass "
                          "--draft DIR|HUB_ID, or --draft untrained for an untrained one.")
    draft = load_model(spec, "fp16", dtype=dtype)
    check_same_tokenizer(draft.tokenizer, target.tokenizer)
    return draft


# ----------------------------------------------------------------------------------- CLI
class _Streamer:
    """Prints the answer's text as it grows (holds back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Any, out=sys.stdout) -> None:
        self.tokenizer, self.out, self.shown = tokenizer, out, 0

    def __call__(self, view: StepView) -> None:
        text = self.tokenizer.decode(view.tokens[view.n_prompt :], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    def end(self, text: str) -> None:
        self.out.write(text[self.shown :] + "\n")
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    from speckv.llm.load import COMPRESSIONS
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET

    ap = argparse.ArgumentParser(
        prog="speckv generate",
        description="Speculative decoding with a γ policy; lossless: greedy output equals the "
                    "target's, sampled output follows the target's distribution.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (its answer streams to the terminal)")
    src.add_argument("--prompts", type=Path, help='JSONL file, one {"task", "prompt"} a line')
    ap.add_argument("--policy", help="ar | fixed:K | heuristic | confidence:T | entropy:T | ema "
                    "| onnx:PATH (default: onnx:export/speckv.onnx if it exists, else heuristic)")
    ap.add_argument("--draft", default=DEMO_DRAFT,
                    help=f"draft model: {DEMO_DRAFT!r}, a directory, a hub id, or "
                         f"'{UNTRAINED}[:LAYERS]' (the target's layers, untrained)")
    ap.add_argument("--target", default=DEMO_TARGET, help="target model")
    ap.add_argument("--compression", default="fp16", choices=COMPRESSIONS)
    ap.add_argument("--dtype", default="bfloat16",
                    help="compute dtype of unquantized weights (bfloat16 or float32 on a CPU)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--costs", type=Path, help="cost model JSON (default: measure at start-up "
                    "when the policy needs costs)")
    ap.add_argument("--save-costs", type=Path, help="measure the cost model and save it here")
    ap.add_argument("--records", type=Path, help="write the live step records (.parquet)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return ap


def main(argv: list[str]) -> int:
    from speckv.decode.costs import CostModel, measure_costs
    from speckv.llm.load import load_model
    from speckv.policies import from_spec
    from speckv.prompts import Prompt, chat_ids, load_jsonl

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.records is not None and args.records.suffix != ".parquet":
        raise DecodeError(f"--records {args.records}: write step records to a .parquet file.")
    spec = args.policy or default_policy_spec()
    policy = from_spec(spec)
    prompts = ([Prompt("chat", "prompt-0", args.prompt)] if args.prompt is not None
               else load_jsonl(args.prompts))
    target = load_model(args.target, args.compression, dtype=args.dtype)
    draft = load_draft(args.draft, target, args.dtype) if policy is not None else None
    log.info("target %s (%s, %s) loaded in %.1fs; policy %s", target.name, target.compression,
             target.compute_dtype, target.load_s, spec)
    costs = None
    if args.costs is not None:
        costs = CostModel.load(args.costs)
    elif draft is not None and (needs_costs(policy) or args.save_costs is not None):
        started = time.perf_counter()
        costs = measure_costs(draft, target)
        log.info("measured step costs in %.1fs: draft %.1f ms/token, verify %s ms",
                 time.perf_counter() - started, costs.cost_draft_s * 1e3,
                 " ".join(f"{v * 1e3:.0f}" for v in costs.cost_verify_s))
    if args.save_costs is not None and costs is not None:
        costs.save(args.save_costs)
    decoder = SpeculativeDecoder(draft, target, policy, costs)
    tok = target.tokenizer
    stream = len(prompts) == 1 and not args.json
    outputs, steps = [], []
    for prompt in prompts:
        streamer = _Streamer(tok) if stream else None
        result = decoder.generate(chat_ids(tok, prompt.text), args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed, task=prompt.task,
                                  prompt_id=prompt.prompt_id, on_step=streamer)
        text = tok.decode(result.token_ids, skip_special_tokens=True)
        steps.extend(result.steps)
        outputs.append({"prompt": prompt.text, "token_ids": result.token_ids, "text": text,
                        "steps": len(result.steps), "mean_accepted": result.mean_accepted,
                        "tokens_per_s": result.tokens_per_s})
        if streamer is not None:
            streamer.end(text)
        elif not args.json:
            print(f"--- {prompt.prompt_id}\n{text}")
        log.info("%s: %d tokens in %d steps, %.2f accepted/step, %.1f tokens/s (%s)",
                 prompt.prompt_id, len(result.token_ids), len(result.steps),
                 result.mean_accepted, result.tokens_per_s, result.stop)
    if args.records is not None:
        from speckv.records import write_records

        write_records(records_frame(steps), args.records,
                      {"runs": {steps[0]["run_id"]: {
                          "draft": args.draft if draft is not None else None,
                          "target": args.target, "compression": args.compression,
                          "policy": spec, "cost": costs.to_json() if costs else None}}})
    if args.json:
        print(json.dumps({"outputs": outputs, "policy": spec, "target": args.target,
                          "draft": args.draft if draft is not None else None,
                          "compression": args.compression, "temperature": args.temperature}))
    return 0
