"""The exact test of greedy losslessness: every emitted token is the argmax of the target's
logits in the forward that verified it.

:func:`greedy_invariant` recomputes the decoder's target forwards independently (a fresh
cache, the same chunks, the same crops, the model called directly) and checks each emitted
token. It holds on any machine, whatever the dtype, because it repeats the decoder's own
computation. Where the output differs from one-token decoding, :func:`explain_difference`
shows that the target's own one-token and chunked forwards disagree at that position: the
difference is the target's numerics (bfloat16, LLM.int8 outlier columns), not the decoder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speckv.decode.costs import module_of
from speckv.decode.decoder import DecodeError, DecodeResult, TargetForward
from speckv.decode.tree import additive_mask, keep_rows, verify_mask
from speckv.runtime.proposal import Proposal

if TYPE_CHECKING:
    from speckv.llm.load import LoadedModel


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
             keep: int, parents: tuple[int, ...] | None = None) -> torch.Tensor:
    """One HF forward (not through speckv's lm_forward): float32 logits of the last ``keep``.
    ``parents``: a tree's verify forward (its mask and depth positions, built here from the
    logged parents with :mod:`speckv.decode.tree`'s mask)."""
    kwargs = {}
    device = getattr(module, "device", None)
    if parents is not None:
        tree = Proposal(np.asarray(ids[1:], np.int64), np.asarray(parents, np.int64))
        past = cache.get_seq_length()
        depths = torch.from_numpy(np.concatenate([[0], tree.depths]))
        kwargs = {"attention_mask": additive_mask(verify_mask(tree, past), module),
                  "position_ids": (past + depths)[None].to(device)}
    out = module(input_ids=torch.tensor([list(ids)], device=device), cache=cache,
                 use_cache=True, logits_to_keep=keep, **kwargs)
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
        logits = _forward(module, fwd.ids, cache, fwd.keep, fwd.parents)
        if fwd.parents is not None:  # a tree: the root and the accepted path stay
            keep_rows(cache, fwd.start, [0, *(1 + j for j in fwd.path)][: fwd.emitted])
        context.extend(fwd.kept_ids())
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
    module = module_of(target)
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
        best = logits[fwd.emitting_rows()].argmax(-1).tolist()
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
    module = module_of(target)
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
        for _, fwd, logits, _ in _replay(module_of(target), result.target_forwards):
            lead = len(fwd.ids) - fwd.keep
            r = target_pos - 1 - fwd.start - lead
            if 0 <= r < fwd.emitted:
                chunked = logits[fwd.emitting_rows()[r]]
                break
    return Difference(
        at, ref_tok, out_tok, int(one.argmax()),
        int(chunked.argmax()) if chunked is not None else None,
        float(one[ref_tok] - one[out_tok]),
        float(chunked[out_tok] - chunked[ref_tok]) if chunked is not None else None)


