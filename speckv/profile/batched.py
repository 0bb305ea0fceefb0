"""Batched trace profiling: many prompts' traces at once, the same records as one at a time.

A trace (:mod:`speckv.profile.trace`) needs three things per prompt: the target's greedy
answer, the draft teacher-forced over it, and the draft's greedy continuations of every
"branch" (the context after each first disagreement, and past an answer that ended with
EOS). Done one prompt at a time, the first is ``n`` one-row target forwards and the last
re-encodes the whole context of every branch. Here:

1. :func:`greedy_answers` decodes the target's answers for a batch of prompts together
   (left padding, attention masks, explicit positions, a KV cache; each row stops at its own
   EOS or budget and leaves the batch, so finished rows cost nothing);
2. :func:`draft_side` runs the draft teacher-forced over a batch of ``prompt + answer`` rows
   in one forward, and keeps that forward's KV cache;
3. every branch of every row then continues *from that cache*: the branch token of a branch
   at ``m`` sits at position ``P + m`` and attends, through a 4-D attention mask, to the
   first ``P + m`` cached positions of its own row and to its own earlier tokens only. All
   branches of all rows of a batch advance together, one forward per continuation step
   (``BRANCH_STEPS`` forwards), with nothing re-encoded. Models whose attention cannot take
   a custom 4-D mask (sliding-window layers, flash attention) fall back to re-encoding.

Exactness. In exact arithmetic every piece equals its one-prompt counterpart: padding is
masked, positions are explicit, a branch sees exactly its context. In float64 (and, up to
near-ties, float32) the batched and one-prompt traces are identical, records included
(``tests/profile/test_batched.py``). In bfloat16 (and with bitsandbytes, whose LLM.int8 picks
outlier columns per forward) no forward is batch-invariant: a row's logits depend, by a
rounding step, on what else shares the forward. What the records then hold:

- the answer is a *valid greedy trace of the target*: every answer token is the argmax of the
  target's logits at that position in the forward that computed it, and ``target_top1`` is
  that forward's probability. That is the same guarantee the live decoder gives
  (:mod:`speckv.decode.invariant`: each emitted token is the argmax of the forward that
  verified it); neither equals one-token decoding at a near-tie, and the live decoder's
  chunked verification parts from one-token decoding at the same kind of places. What
  batching adds is that a near-tie may also resolve differently with another batch
  composition (another ``--target-batch``, another sharding);
- the draft statistics are the draft's distribution at each position, to a bfloat16 step
  (live decoding computes them in other chunks too, so they never matched it bit for bit);
- agreement, accept lengths and stop-rule outcomes are exact *with respect to that answer*,
  so replay stays exact for it.

``--target-batch 1 --draft-batch 1`` computes every prompt alone, so the records do not depend
on batching or sharding at all, in any dtype; that costs the batching speed-up.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from speckv.profile.trace import (
    BRANCH_STEPS,
    TraceResult,
    _off_track,
    assemble,
    plan_branches,
)
from speckv.runtime.features import token_stats

#: default rows per batched target forward, and per batched draft forward
TARGET_BATCH = 32
DRAFT_BATCH = 8


def _device(model):
    return next(model.parameters()).device


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device):
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def greedy_answers(target, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   eos: Collection[int] | int | None, pad: int,
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The target's greedy answers to ``prompts``, decoded as one batch.

    Returns ``(answer, target_top1)`` per prompt: the answer runs to the row's budget or to
    its first EOS (included), ``target_top1[j]`` is the target's probability of token ``j``
    in the forward that chose it. Each token is the argmax of its row's logits (float32).
    """
    import torch
    from transformers import DynamicCache

    eos_set = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    answers: list[list[int]] = [[] for _ in prompts]
    probs: list[list[float]] = [[] for _ in prompts]
    ids, mask, pos = _left_pad(prompts, pad, _device(target))
    cache = DynamicCache(config=target.config)
    active = list(range(len(prompts)))  # prompt index of each row of the batch
    with torch.inference_mode():
        logits = target(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True, logits_to_keep=1).logits[:, -1]
        while True:
            logits = logits.float()
            tok = logits.argmax(-1)
            top1 = torch.softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
            keep = []
            for r, (t, p) in enumerate(zip(tok.tolist(), top1.tolist(), strict=True)):
                b = active[r]
                answers[b].append(t)
                probs[b].append(p)
                if t not in eos_set and len(answers[b]) < budgets[b]:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch
                sel = torch.tensor(keep, device=tok.device)
                cache.batch_select_indices(sel)
                tok, mask, pos = tok[sel], mask[sel], pos[sel]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            pos = pos[:, -1:] + 1
            logits = target(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return [(np.array(a, np.int64), np.array(p, np.float32)) for a, p in zip(answers, probs,
                                                                           strict=True)]


def supports_branch_masks(model) -> bool:
    """Can ``model`` continue branches from a shared cache through a custom 4-D mask?"""
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    return not getattr(config, "sliding_window", None) or not getattr(
        config, "use_sliding_window", True)


def _continue_branches(draft, cache, width: int, offsets: Sequence[int],
                       branches: Sequence[Sequence[tuple[int, int]]], steps: int,
                       ) -> list[np.ndarray]:
    """Greedy continuations of every branch from the teacher-forced ``cache``.

    ``cache`` holds ``width`` left-padded columns per row; row ``b``'s token at position ``a``
    is column ``offsets[b] + a``. Branch ``(p, t)`` of row ``b`` (``p`` counts the prompt's
    tokens too) feeds ``t`` at position ``p``
    and attends to columns ``offsets[b] .. offsets[b] + p - 1`` and to its own tokens. Returns
    per row ``[len(branches[b]), steps, 2]`` (entropy, top-1 after ``s`` greedy tokens).
    """
    import torch

    device = _device(draft)
    dtype = next(draft.parameters()).dtype
    rows, k = len(branches), max(map(len, branches))
    start = torch.full((rows, k), width - 1, dtype=torch.long)  # padding branches: see the
    end = torch.full((rows, k), width, dtype=torch.long)  # last column (always a real token)
    tokens = torch.zeros((rows, k), dtype=torch.long)
    position = torch.zeros((rows, k), dtype=torch.long)
    real = torch.zeros((rows, k), dtype=torch.bool)
    for b, brs in enumerate(branches):
        for j, (p, t) in enumerate(brs):
            start[b, j], end[b, j] = offsets[b], offsets[b] + p
            tokens[b, j], position[b, j], real[b, j] = t, p, True
    col = torch.arange(width)
    prefix = (col >= start[..., None]) & (col < end[..., None])  # [rows, k, width]
    own = torch.eye(k, dtype=torch.bool)
    lowest = torch.finfo(dtype).min
    out = np.full((rows, k, steps, 2), np.nan, np.float32)
    real_np = real.numpy()
    tokens, position = tokens.to(device), position.to(device)
    with torch.inference_mode():
        for s in range(steps):
            allowed = torch.cat([prefix, own.repeat(1, s + 1).expand(rows, k, -1)], -1)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, lowest)
            logits = draft(input_ids=tokens, attention_mask=mask[:, None].to(device),
                           position_ids=position + s, cache=cache, use_cache=True).logits
            logits = logits.float()
            out[real_np, s] = token_stats(logits[real.to(device)].cpu().numpy())[:, :2]
            tokens = logits.argmax(-1)
    return [out[b, : len(brs)] for b, brs in enumerate(branches)]


def draft_side(draft, prompts: Sequence[Sequence[int]], answers: Sequence[np.ndarray],
               max_new_tokens: int | Sequence[int], pad: int,
               target_top1: Sequence[np.ndarray], branch_masks: bool | None = None,
               ) -> list[TraceResult]:
    """The draft's part of the traces of one batch of answered prompts."""
    import torch
    from transformers import DynamicCache

    if branch_masks is None:
        branch_masks = supports_branch_masks(draft)
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    seqs = [list(p) + a.tolist() for p, a in zip(prompts, answers, strict=True)]
    ns = [len(a) for a in answers]
    keep = max(ns) + 1
    ids, mask, pos = _left_pad(seqs, pad, _device(draft))
    width = ids.shape[1]
    cache = DynamicCache(config=draft.config)
    with torch.inference_mode():  # logits only where an answer token is predicted
        logits = draft(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=keep).logits
    stats, proposals, plans = [], [], []
    for b, n in enumerate(ns):
        rows = logits[b, keep - 1 - n : keep - 1].float().cpu().numpy()
        stats.append(token_stats(rows))
        proposals.append(rows.argmax(-1))
        plans.append(plan_branches(answers[b], proposals[-1], int(budgets[b])))
    del logits
    branches = [list(plan.branches) for plan in plans]
    if not any(branches):
        conts = [None] * len(prompts)
    elif branch_masks:
        offsets = [width - len(s) for s in seqs]
        absolute = [[(len(prompts[b]) + p, t) for p, t in brs] for b, brs in enumerate(branches)]
        conts = _continue_branches(draft, cache, width, offsets, absolute, BRANCH_STEPS)
    else:  # re-encode each branch's context
        flat = [(b, list(prompts[b]) + answers[b][:p].tolist() + [t])
                for b, brs in enumerate(branches) for p, t in brs]
        cont = _off_track(draft, [c for _, c in flat], BRANCH_STEPS, pad)
        owner = np.array([b for b, _ in flat])
        conts = [cont[owner == b] for b in range(len(prompts))]
    return [assemble(answers[b], target_top1[b], stats[b], proposals[b], int(budgets[b]),
                     plans[b], conts[b] if branches[b] else None) for b in range(len(prompts))]


def trace_batch(draft, target, prompts: Sequence[Sequence[int]],
                max_new_tokens: int | Sequence[int], eos: Collection[int] | int | None,
                pad: int, *, target_batch: int = TARGET_BATCH, draft_batch: int = DRAFT_BATCH,
                branch_masks: bool | None = None) -> list[TraceResult]:
    """Traces of ``prompts`` (in their order), the target and the draft each in batches.

    Prompts of similar length share a target batch (less padding); ``target_batch=1`` decodes
    each answer alone (see the module's note on bfloat16).
    """
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, TraceResult] = {}
    for b in range(0, len(order), max(1, target_batch)):
        idx = order[b : b + max(1, target_batch)]
        answered = greedy_answers(target, [prompts[i] for i in idx], budgets[idx], eos, pad)
        for d in range(0, len(idx), max(1, draft_batch)):
            part = list(range(d, min(d + max(1, draft_batch), len(idx))))
            traces = draft_side(draft, [prompts[idx[j]] for j in part],
                                [answered[j][0] for j in part], budgets[[idx[j] for j in part]],
                                pad, [answered[j][1] for j in part], branch_masks)
            results.update({idx[j]: tr for j, tr in zip(part, traces, strict=True)})
    return [results[i] for i in range(len(prompts))]
