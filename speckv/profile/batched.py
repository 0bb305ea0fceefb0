"""Batched trace profiling: many prompts' traces at once, the same records as one at a time.

A trace (:mod:`speckv.profile.trace`) needs three things per prompt: the target's greedy
answer, the draft teacher-forced over it, and the draft's greedy continuations of every
"branch" (the context after each first disagreement, and past an answer that ended with
EOS). Done one prompt at a time, the first is ``n`` one-row target forwards and the last
re-encodes the whole context of every branch. Here:

1. :func:`greedy_answers` encodes a batch's prompts packed into rows of about
   ``PREFILL_TOKENS`` tokens (:func:`_packed`: one sequence after another, a block-diagonal
   causal 4-D mask, positions restarting at 0: each sequence computed as if alone, no
   padding), then decodes the answers together, one token per row and forward (left
   padding, an attention mask, explicit positions, a preallocated KV cache); a row leaves
   the batch at its own EOS or budget;
2. :func:`draft_side` runs the draft teacher-forced over a group of ``prompt + answer``
   sequences in one packed forward, with logits only where an answer token is predicted;
3. every branch of every sequence then continues *from that forward's cache*: the branch
   token of a branch at ``m`` sits at position ``P + m`` and attends, through a 4-D mask,
   to the first ``P + m`` cached positions of its own sequence and to its own earlier
   tokens. All branches of the group advance together, one forward per continuation step
   (``BRANCH_STEPS`` forwards), nothing re-encoded.

On a CPU few large forwards win twice: each forward pays a fixed price to repack the weights
for the matrix units, and memory traffic, not arithmetic, bounds small ones. Models that
cannot take a custom 4-D mask (sliding-window layers, flash attention) run one sequence per
forward and re-encode branch contexts (:func:`supports_4d_masks`).

Exactness. In exact arithmetic every piece equals its one-prompt counterpart: padding and
other sequences are masked, positions are explicit, a branch sees exactly its context. In
float64 (and, up to near-ties, float32) the batched and one-prompt traces are identical,
records included (``tests/profile/test_batched.py``). In bfloat16 (and with bitsandbytes,
whose LLM.int8 picks outlier columns per forward) no forward is batch-invariant: a row's
logits depend, by a rounding step, on what else shares the forward. What the records then hold:

- the answer is a *valid greedy trace of the target*: every answer token is the argmax of the
  target's logits at that position in the forward that computed it, and ``target_top1`` is
  that forward's probability. That is the same guarantee the live decoder gives
  (:mod:`speckv.decode.invariant`: each emitted token is the argmax of the forward that
  verified it); neither equals one-token decoding at a near-tie, and the live decoder's
  chunked verification parts from one-token decoding at the same kind of places. What
  batching adds is that a near-tie may also resolve differently with another batch
  composition (another ``--target-batch``, another sharding). On the demo pair (12 suite
  prompts, 48 tokens, bfloat16 on a CPU) 7 answers of 12 parted from one-sequence decoding,
  each at a tie or near-tie of the target's logits (gap 0 to 0.25, at most two bfloat16
  steps; bfloat16 logits tie often), and a one-prompt batch gave one-sequence decoding's
  answers exactly;
- the draft statistics are the draft's distribution at each position, to a bfloat16 step
  (live decoding computes them in other chunks too, so they never matched it bit for bit);
- agreement, accept lengths and stop-rule outcomes are exact *with respect to that answer*,
  so replay stays exact for it.

``--target-batch 1 --draft-batch 1`` computes every prompt apart from the others, so the
records do not depend on batching or sharding at all, in any dtype; that costs the batching
speed-up.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from speckv.decode.tree import supports_4d_masks
from speckv.profile.feature_trace import feature_draft_side
from speckv.profile.trace import (
    BRANCH_STEPS,
    TraceResult,
    _off_track,
    assemble,
    plan_branches,
)
from speckv.profile.tree_trace import TreeSeq, tree_accept_lengths
from speckv.runtime.features import token_stats

#: default prompts whose target answers are decoded together, and answered prompts the draft
#: processes together (one packed row: see :func:`_packed`)
TARGET_BATCH = 32
DRAFT_BATCH = 4
#: prompts are encoded packed into rows of about this many tokens (when the model allows)
PREFILL_TOKENS = 1024


def _device(model):
    return next(model.parameters()).device


def _compute_dtype(model):
    """The dtype activations are computed in (quantized models keep float embeddings)."""
    return model.get_input_embeddings().weight.dtype


def _additive(allowed, model):
    """A boolean ``[q, k]`` "may attend" matrix as the additive ``[1, 1, q, k]`` mask."""
    from speckv.decode.tree import additive_mask

    return additive_mask(allowed, model)


#: rows of logits converted and summarised at a time (a few MB: they stay in cache)
STATS_ROWS = 8


def _stats(logits) -> tuple[np.ndarray, np.ndarray]:
    """``token_stats`` and the argmax of every row of ``logits`` (``[rows, vocab]``, any
    float dtype, any device), a few rows at a time: each pass over a large vocabulary then
    runs in cache instead of memory. Row by row the same numbers as one call on all rows."""
    rows = logits.shape[0]
    stats = np.empty((rows, 3), np.float32)
    best = np.empty(rows, np.int64)
    for r in range(0, rows, STATS_ROWS):
        block = logits[r : r + STATS_ROWS].float().cpu().numpy()
        stats[r : r + STATS_ROWS] = token_stats(block)
        best[r : r + STATS_ROWS] = block.argmax(-1)
    return stats, best


def _alone(model, ids: Sequence[int], keep: int):
    """One sequence's forward from an empty cache: its cache and its last ``keep`` logits."""
    import torch

    from speckv.decode.costs import new_cache

    cache = new_cache(model)
    logits = model(input_ids=torch.tensor([list(ids)], device=_device(model)), cache=cache,
                   use_cache=True, logits_to_keep=keep).logits[0]
    return cache, logits


def _packed(model, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]]):
    """One forward over ``rows`` packed one after another into one row.

    A block-diagonal causal 4-D mask keeps every sequence to itself and positions restart
    at 0 for each, so each sequence is computed as if alone, without padding, in one call
    (a CPU pays a fixed price per call to repack the weights, so few large calls win).
    ``keep[b]``: the positions of row ``b`` whose logits are wanted. Returns the cache (one
    row, the sequences one after another), the kept logits in order, and each row's start.
    """
    import torch

    from speckv.decode.costs import new_cache

    device = _device(model)
    lengths = [len(r) for r in rows]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    allowed = (owner[:, None] == owner[None, :]) & (position[:, None] >= position[None, :])
    ids = torch.tensor([[t for r in rows for t in r]], device=device)
    kept = torch.tensor([s + k for s, ks in zip(starts, keep, strict=True) for k in ks],
                        device=device)
    cache = new_cache(model)
    logits = model(input_ids=ids, attention_mask=_additive(allowed, model),
                   position_ids=position[None].to(device), cache=cache, use_cache=True,
                   logits_to_keep=kept).logits[0]
    return cache, logits, starts


def _groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices in groups of about ``budget`` tokens (at least one each)."""
    groups: list[list[int]] = []
    total = budget
    for i, n in enumerate(lengths):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _buffered_layer(keys, values, room: int):
    """A KV cache layer holding ``keys``/``values`` that appends into preallocated room.

    Hugging Face's ``DynamicLayer`` concatenates on every forward, copying the whole cache
    each decoding step; with a batch's cache on a CPU that copy costs as much as the
    attention itself. This layer writes each step's keys in place and hands out views.
    """
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            b, h, n, d = keys.shape
            self.buffers = [x.new_empty((b, h, n + room, d)) for x in (keys, values)]
            self.buffers[0][:, :, :n], self.buffers[1][:, :, :n] = keys, values
            self.length, self.device, self.is_initialized = n, keys.device, True
            self._views()

        def _views(self) -> None:
            self.keys, self.values = (x[:, :, : self.length] for x in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            n, q = self.length, key_states.shape[-2]
            if n + q > self.buffers[0].shape[-2]:  # out of room: grow (never on our paths)
                self.buffers = [x.new_empty((*x.shape[:2], n + q + room, x.shape[-1]))
                                .index_copy_(2, _arange(n, x), x[:, :, :n]) for x in self.buffers]
            self.buffers[0][:, :, n : n + q] = key_states
            self.buffers[1][:, :, n : n + q] = value_states
            self.length = n + q
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices) -> None:
            self.buffers = [x[indices] for x in self.buffers]
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            self.length = max(0, self.length - abs(tokens_to_remove))
            self._views()

    return BufferedLayer()


def _arange(n: int, like):
    import torch

    return torch.arange(n, device=like.device)


def _batch_cache(model, rows_kv, lengths: Sequence[int], room: int = 0):
    """A left-padded batch cache from each row's per-layer ``(keys, values)``
    (``[1, H, n, D]``), with room for ``room`` more positions."""
    import torch
    import torch.nn.functional as F

    from speckv.decode.costs import new_cache

    out = new_cache(model)
    width = max(lengths)
    pads = [(0, 0, width - n, 0) for n in lengths]
    for layer in range(len(rows_kv[0])):
        keys, values = (torch.cat([F.pad(kv[layer][i], p) for kv, p in zip(rows_kv, pads,
                                                                          strict=True)])
                        for i in (0, 1))
        out.layers[layer] = _buffered_layer(keys, values, room)
    return out


def _prefill(target, prompts: Sequence[Sequence[int]], room: int = 0):
    """Each prompt encoded as if alone (packed when the model allows): a left-padded batch
    cache over the prompts, and the logits of each prompt's last position."""
    import torch

    rows_kv, last = [], []
    if supports_4d_masks(target):
        for group in _groups([len(p) for p in prompts], PREFILL_TOKENS):
            rows = [prompts[i] for i in group]
            cache, logits, starts = _packed(target, rows, [[len(r) - 1] for r in rows])
            for r, s in zip(rows, starts, strict=True):
                cut = slice(s, s + len(r))
                rows_kv.append([(layer.keys[:, :, cut], layer.values[:, :, cut])
                                for layer in cache.layers])
            last.extend(logits)
    else:
        for p in prompts:
            cache, logits = _alone(target, p, 1)
            rows_kv.append([(layer.keys, layer.values) for layer in cache.layers])
            last.append(logits[-1])
    return (_batch_cache(target, rows_kv, [len(p) for p in prompts], room),
            torch.stack(last))


def greedy_answers(target, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                   eos: Collection[int] | int | None, pad: int = 0,
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The target's greedy answers to ``prompts``, decoded as one batch.

    Each prompt is encoded as if alone (:func:`_prefill`: no padding to compute); the
    answers are then decoded together, one token per row and forward (left padding, an
    attention mask, explicit positions); a row that reaches its EOS or budget leaves the
    batch. Returns ``(answer, target_top1)`` per prompt: the
    answer includes the EOS that ended it, ``target_top1[j]`` is the probability of token
    ``j`` in the forward that chose it, as the argmax of its row's logits (in float32).
    """
    import torch

    del pad  # padded positions are masked, never fed
    eos_set = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    answers: list[list[int]] = [[] for _ in prompts]
    probs: list[list[float]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    device = _device(target)
    with torch.inference_mode():
        cache, logits = _prefill(target, prompts, room=int(budgets.max()))
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        pos = torch.tensor(lengths, device=device)[:, None] - 1
        active = list(range(len(prompts)))  # prompt index of each row of the batch
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
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                tok, mask, pos = tok[sel], mask[sel], pos[sel]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            pos = pos + 1
            logits = target(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return [(np.array(a, np.int64), np.array(p, np.float32)) for a, p in zip(answers, probs,
                                                                           strict=True)]


def _continue_branches(draft, cache, spans: Sequence[tuple[int, Sequence[tuple[int, int]]]],
                       steps: int) -> np.ndarray:
    """Greedy continuations of every branch, all in one packed row, from ``cache``.

    ``cache`` holds one row: the sequences' teacher-forced caches one after another;
    ``spans`` gives, per sequence, the column where it starts and its branches ``(p, t)``
    (``p`` counts the prompt's tokens too). A branch feeds ``t`` at position ``p`` and
    attends, through a 4-D mask, to its sequence's first ``p`` columns and to its own
    earlier tokens; all branches advance together, one forward per step, appending their
    tokens to the cache. Returns ``[branches, steps, 2]``: entropy and top-1 after ``s``
    greedy tokens.
    """
    import torch

    device = _device(draft)
    width = cache.get_seq_length()
    flat = [(start, start + p, p, t) for start, brs in spans for p, t in brs]
    q = len(flat)
    first = torch.tensor([f[0] for f in flat])
    end = torch.tensor([f[1] for f in flat])
    tokens = torch.tensor([[f[3] for f in flat]], device=device)
    position = torch.tensor([[f[2] for f in flat]], device=device)
    col = torch.arange(width)
    prefix = (col >= first[:, None]) & (col < end[:, None])  # [q, width]
    own = torch.eye(q, dtype=torch.bool)
    out = np.empty((q, steps, 2), np.float32)
    for s in range(steps):
        allowed = torch.cat([prefix, own.repeat(1, s + 1)], -1)
        logits = draft(input_ids=tokens, attention_mask=_additive(allowed, draft),
                       position_ids=position + s, cache=cache, use_cache=True).logits[0]
        stats, best = _stats(logits)
        out[:, s] = stats[:, :2]
        tokens = torch.from_numpy(best)[None].to(device)
    return out


def draft_side(draft, prompts: Sequence[Sequence[int]], answers: Sequence[np.ndarray],
               max_new_tokens: int | Sequence[int], pad: int,
               target_top1: Sequence[np.ndarray], branch_masks: bool | None = None,
               ) -> list[TraceResult]:
    """The draft's part of the traces of a group of answered prompts.

    The draft runs teacher-forced over every ``prompt + answer`` of the group in one packed
    forward (:func:`_packed`; logits only where an answer token is predicted), and the
    continuations of every branch then advance together from that forward's cache
    (:func:`_continue_branches`). Without 4-D masks (``branch_masks=False``, or a model that
    cannot take them) each sequence runs alone and each branch's context is re-encoded.
    """
    import torch

    if branch_masks is None:
        branch_masks = supports_4d_masks(draft)
    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    seqs = [[*p, *a.tolist()] for p, a in zip(prompts, answers, strict=True)]
    ns = [len(a) for a in answers]
    with torch.inference_mode():
        trees = None
        if branch_masks:  # position P - 1 + j predicts answer token j
            cache, logits, starts = _packed(draft, seqs, [range(len(p) - 1, len(p) - 1 + n)
                                                          for p, n in zip(prompts, ns,
                                                                          strict=True)])
            all_stats, all_best = _stats(logits)
            edges = np.cumsum([0, *ns])
            trees = tree_accept_lengths(draft, cache, [
                TreeSeq(starts[b], len(prompts[b]), answers[b], int(budgets[b]),
                        logits[edges[b] : edges[b + 1]]) for b in range(len(prompts))])
            del logits
        else:  # each sequence alone; trees too where the draft takes 4-D masks
            each, trees = [], [] if supports_4d_masks(draft) else None
            for b, (seq, n) in enumerate(zip(seqs, ns, strict=True)):
                cache, logits = _alone(draft, seq, n + 1)
                each.append(_stats(logits[:-1]))
                if trees is not None:
                    trees += tree_accept_lengths(draft, cache, [TreeSeq(
                        0, len(prompts[b]), answers[b], int(budgets[b]), logits[:-1])])
            all_stats = np.concatenate([e[0] for e in each])
            all_best = np.concatenate([e[1] for e in each])
        bounds = np.cumsum([0, *ns])
        stats, proposals, plans = [], [], []
        for b in range(len(prompts)):
            stats.append(all_stats[bounds[b] : bounds[b + 1]])
            proposals.append(all_best[bounds[b] : bounds[b + 1]])
            plans.append(plan_branches(answers[b], proposals[-1], int(budgets[b])))
        branches = [list(plan.branches) for plan in plans]
        conts: list[np.ndarray | None] = [None] * len(prompts)
        rows = [b for b in range(len(prompts)) if branches[b]]
        if rows and branch_masks:
            spans = [(starts[b], [(len(prompts[b]) + p, t) for p, t in branches[b]])
                     for b in rows]
            cont = _continue_branches(draft, cache, spans, BRANCH_STEPS)
            edges = np.cumsum([0, *(len(branches[b]) for b in rows)])
            for r, b in enumerate(rows):
                conts[b] = cont[edges[r] : edges[r + 1]]
        elif rows:  # re-encode each branch's context
            flat = [(b, [*prompts[b], *answers[b][:p].tolist(), t])
                    for b in rows for p, t in branches[b]]
            cont = _off_track(draft, [c for _, c in flat], BRANCH_STEPS, pad)
            owner = np.array([b for b, _ in flat])
            for b in rows:
                conts[b] = cont[owner == b]
    out = [assemble(answers[b], target_top1[b], stats[b], proposals[b], int(budgets[b]),
                    plans[b], conts[b]) for b in range(len(prompts))]
    for b, tr in enumerate(out):
        tr.tree_accept = trees[b] if trees is not None else None
    return out


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
            if getattr(draft, "is_feature_draft", False):  # speckv.llm.feature_draft
                traces = feature_draft_side(draft, target, [prompts[idx[j]] for j in part],
                                            [answered[j][0] for j in part],
                                            budgets[[idx[j] for j in part]],
                                            [answered[j][1] for j in part])
            else:
                traces = draft_side(draft, [prompts[idx[j]] for j in part],
                                    [answered[j][0] for j in part],
                                    budgets[[idx[j] for j in part]], pad,
                                    [answered[j][1] for j in part], branch_masks)
            results.update({idx[j]: tr.add_lookup(prompts[idx[j]])
                            for j, tr in zip(part, traces, strict=True)})
    return [results[i] for i in range(len(prompts))]
