"""Token trees: growing them from a draft, verifying them, keeping only the accepted path.

One implementation serves the live decoder (:mod:`speckv.decode.decoder`, one tree per step)
and the trace profiler (:mod:`speckv.profile`, a tree at every answer position, all grown
together): :func:`grow` takes any number of *roots*, each a draft distribution over the next
token with the cache columns its nodes may see, and grows every root's tree with one draft
forward per level over all of their frontiers (a 4-D attention mask keeps each node to its
own prefix and its own ancestors). The candidates come out as
:class:`~speckv.runtime.proposal.Proposal` objects, which the decoder verifies and the
profiler scores against the target's answer with the same :meth:`Proposal.walk`.

Growth (EAGLE-2's dynamic tree; :class:`~speckv.runtime.proposal.TreeShape`): level 1 is the
root's ``branch`` best *slots*; each further level feeds the ``branch`` nodes of the level
before with the highest cumulative score to the draft and gives each ``branch`` child slots;
all nodes are returned best first. A slot's score is the parent's score plus the log of the
draft's ``j``-th largest probability at the parent, whatever token fills the slot. Greedy
decoding fills slot ``j`` with that ``j``-th most likely token (so the score is the token's
cumulative log-probability, as in EAGLE-2). Sampling fills the slots with draws *without
replacement* from the draft's distribution, in draw order (Gumbel top-k), so which nodes
exist never depends on the tokens drawn into them; that is what lets
:func:`verify_sampled_tree` keep the target's distribution exactly (below).

Sampled verification (multi-candidate rejection sampling, SpecInfer's and EAGLE's, with the
residual update of recursive rejection sampling for draws without replacement): at a node
with target distribution ``p`` (its row of the verify forward) and draft distribution ``q``
(the one its children were drawn from), try the children in draw order. Child ``x`` is
accepted with probability ``min(1, r(x) / s(x))``, where ``r`` starts as ``p`` and ``s`` as
``q``; on rejection ``r <- norm(max(r - s, 0))`` and ``s <- norm(s without x)``. After an
acceptance the walk continues at ``x``; when every child is rejected (or there is none) the
step's last token is drawn from ``r``. Each try is one step of ordinary speculative sampling
of ``r`` with the draft ``s`` that the next candidate is drawn from, so by induction from the
last try the token at every node is distributed as ``p``; the number of children a node has
depends only on the tokens above it, never on the children drawn, which the induction needs
(``tests/decode/test_tree.py`` checks the joint distribution of two tokens with a χ² test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speckv.runtime.proposal import Proposal, TreeShape


# ------------------------------------------------------------------------ masks and caches
def additive_mask(allowed: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """A boolean ``[q, k]`` "may attend" matrix as the additive ``[1, 1, q, k]`` mask a
    Hugging Face model takes (in the dtype its activations are computed in)."""
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed.cpu(),
                                                                torch.finfo(dtype).min)
    return mask[None, None].to(next(model.parameters()).device)


def supports_4d_masks(model) -> bool:
    """Does ``model`` take a custom 4-D attention mask over a full-attention KV cache?

    Trees need it (a tree's mask), and so do the batched trace profiler's packed rows and
    branch continuations (:mod:`speckv.profile.batched`); sliding-window layers and flash
    attention do not allow it: such models take chains only, and the profiler's
    one-row-per-sequence path.
    """
    config = model.config
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    return not getattr(config, "sliding_window", None) or not getattr(
        config, "use_sliding_window", True)


def verify_mask(proposal: Proposal, past: int) -> torch.Tensor:
    """``[N + 1, past + N + 1]`` bool: what each row of a verify forward over ``[root,
    *proposal.tokens]`` may attend to (the whole cache, then :meth:`Proposal.mask`)."""
    tree = torch.from_numpy(proposal.mask())
    return torch.cat([torch.ones(len(tree), past, dtype=torch.bool), tree], 1)


def keep_rows(cache: Any, start: int, rows: Sequence[int]) -> None:
    """Keep, of the cache positions from ``start`` on, the ``rows`` (ascending) and drop the
    rest: after a tree's verify forward, the root and the accepted path."""
    rows = [int(r) for r in rows]
    total = cache.get_seq_length()
    end = start + len(rows)
    if rows != list(range(len(rows))):
        index = torch.tensor([start + r for r in rows])
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                t[:, :, start:end] = t.index_select(2, index.to(t.device))
    if total > end:
        cache.crop(end - total)


def keep_state_rows(states: Any, start: int, rows: Sequence[int]) -> None:
    """:func:`keep_rows` for a feature-conditioned draft's :class:`TargetStates`."""
    rows = [int(r) for r in rows]
    if rows != list(range(len(rows))):
        index = torch.tensor([start + r for r in rows], device=states.rows.device)
        states.rows[start : start + len(rows)] = states.rows.index_select(0, index)
    states.valid = start + len(rows)


# -------------------------------------------------------------------- where a tree drafts
@dataclass
class Root:
    """One tree to grow: the draft's logits for the next token (``[V]``, or over a reduced
    head's tokens ``vocab``), the cache columns ``[lo, hi)`` its nodes may see, the position
    of its first level, and (a feature-conditioned draft) the draft's output state at the
    root."""

    logits: torch.Tensor
    lo: int
    hi: int
    position: int
    state: torch.Tensor | None = None
    vocab: torch.Tensor | None = None  # the token of each logit (a reduced head), else None


class TreeDraft:
    """A draft and its cache, as the growth of trees needs them.

    :meth:`forward` feeds nodes after everything in the cache: their tokens, positions, the
    boolean mask over the cache's columns (those already there, then the fed nodes), and
    which earlier output each node's input state is (a feature-conditioned draft reads its
    parent's output; a causal LM reads none). :meth:`reset` drops the nodes again.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, roots: Sequence[Root]) -> None:
        self.model = model
        self.cache = cache
        self.base = cache.get_seq_length()
        self.feature = bool(getattr(model, "is_feature_draft", False))
        self._own = getattr(cache, "own", None)
        self._outputs: list[torch.Tensor] = []  # feature draft: outputs of fed nodes, in order
        self._roots = [r.state for r in roots]

    @property
    def vocab(self) -> torch.Tensor | None:
        """The token of each column of :meth:`forward`'s ``reduced`` logits (a draft with a
        reduced head, :class:`speckv.llm.head.ReducedHead`), else None."""
        head = getattr(self.model, "lm_head", None)
        return getattr(head, "token_ids", None) if self.feature else None

    def forward(self, tokens: list[int], positions: list[int], allowed: torch.Tensor,
                sources: list[int], reduced: bool = False) -> torch.Tensor:
        """Logits ``[q, V]`` of the fed nodes (``reduced``: over :attr:`vocab` only, where the
        draft has a reduced head); ``sources[i]``: the fed node whose output node ``i``
        reads, or ``-1 - b`` for root ``b``."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([tokens], device=device)
        pos = torch.tensor([positions], device=device)
        if not self.feature:
            out = self.model(input_ids=ids, attention_mask=additive_mask(allowed, self.model),
                             position_ids=pos, cache=self.cache, use_cache=True,
                             logits_to_keep=0)
            return out.logits[0]
        states = torch.stack([self._roots[-1 - s] if s < 0 else self._outputs[s]
                              for s in sources])
        g = self.model.tree_forward(ids[0], states, pos[0], self.cache, allowed)
        self._outputs.extend(g)
        head = self.model.lm_head
        return head.small(g) if reduced and self.vocab is not None else head(g)

    def reset(self) -> None:
        """The cache as it was before the first :meth:`forward`."""
        fed = self.cache.get_seq_length() - self.base
        if fed:
            self.cache.crop(-fed)
        if self.feature:
            self.cache.own = self._own
        self._outputs.clear()


# ------------------------------------------------------------------------------- growth
@dataclass
class Grown:
    """A root's tree, best node first, and what sampled verification needs of it."""

    proposal: Proposal
    #: the draft's distribution each node's children were drawn from (-1: the root's);
    #: sampling only
    q: dict[int, torch.Tensor] = field(default_factory=dict)

    def top(self, shape: TreeShape) -> Grown:
        """The tree of ``shape`` (its best ``size`` nodes of depth ``<= depth``)."""
        keep = np.flatnonzero(self.proposal.depths <= shape.depth)[: shape.size]
        new = {-1: -1, **{int(old): i for i, old in enumerate(keep)}}
        return Grown(self.proposal.subset(keep),
                     {new[k]: v for k, v in self.q.items() if k in new})


@dataclass
class _Node:
    token: int
    parent: int  # index into the root's node list, -1: the root
    depth: int
    score: float
    fed: int = -1  # feed index (its cache column is base + fed), -1: never fed


class Slots:
    """How the child slots of a node are filled: greedy (the most likely tokens) or sampled
    (draws without replacement, from ``softmax(logits / temperature)``)."""

    def __init__(self, temperature: float = 0.0, generator: torch.Generator | None = None
                 ) -> None:
        self.temperature = temperature
        self.generator = generator

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def fill(self, logits: torch.Tensor, k: int, vocab: torch.Tensor | None = None
             ) -> tuple[list[list[int]], list[list[float]], list[torch.Tensor | None]]:
        """For each row of draft logits ``[q, V]`` (``vocab``: the token of each column, when
        they cover a reduced head's tokens; greedy only): the slot tokens, the
        log-probabilities of the ``k`` most likely tokens (the slots' scores) and
        (sampling) the distribution the tokens were drawn from."""
        x = logits.float()
        if not self.sampling:
            best, tokens = torch.log_softmax(x, -1).topk(k)
            if vocab is not None:
                tokens = vocab[tokens]
            return tokens.tolist(), best.tolist(), [None] * len(x)
        if vocab is not None:
            raise ValueError("sampled slots need full-vocabulary logits (the target's "
                             "distribution is compared token by token).")
        out_t, out_s, out_q = [], [], []
        for row in x:
            q = torch.softmax(row / self.temperature, -1)
            logq = torch.log(q)
            u = torch.rand(q.shape, generator=self.generator, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
            drawn = (logq.double() + gumbel).topk(min(k, int((q > 0).sum()))).indices
            out_t.append(drawn.tolist())
            out_s.append(logq.topk(k).values.tolist())
            out_q.append(q)
        return out_t, out_s, out_q


@torch.inference_mode()
def grow(draft: TreeDraft, roots: Sequence[Root], depth: int, branch: int,
         slots: Slots | None = None) -> list[Grown]:
    """Every root's tree, ``depth`` levels of ``branch`` (see the module docstring), all
    nodes best first. The draft's cache gets the fed nodes: call ``draft.reset()`` after."""
    slots = slots or Slots()
    trees: list[list[_Node]] = [[] for _ in roots]
    qs: list[dict[int, torch.Tensor]] = [{} for _ in roots]
    if roots:
        tokens, logp, q = slots.fill(torch.stack([r.logits for r in roots]), branch,
                                     roots[0].vocab)
        for b in range(len(roots)):
            trees[b] = [_Node(t, -1, 1, s) for t, s in zip(tokens[b], logp[b], strict=False)]
            if q[b] is not None:
                qs[b][-1] = q[b]
    fed_total = 0
    level_start = [0] * len(roots)
    for d in range(2, depth + 1):
        feed: list[tuple[int, int]] = []  # (root, node)
        for b, nodes in enumerate(trees):
            level = range(level_start[b], len(nodes))
            best = sorted(level, key=lambda j, nodes=nodes: -nodes[j].score)[:branch]
            feed.extend((b, j) for j in sorted(best))
            level_start[b] = len(nodes)
        if not feed:
            break
        q_len = len(feed)
        allowed = torch.zeros(q_len, draft.base + fed_total + q_len, dtype=torch.bool)
        tokens, positions, sources = [], [], []
        for i, (b, j) in enumerate(feed):
            node, root = trees[b][j], roots[b]
            allowed[i, root.lo : root.hi] = True
            a = j
            while a >= 0:  # the node and its ancestors, all fed by now (or now)
                col = trees[b][a].fed if a != j else fed_total + i
                allowed[i, draft.base + col] = True
                a = trees[b][a].parent
            node.fed = fed_total + i
            tokens.append(node.token)
            positions.append(root.position + node.depth - 1)
            sources.append(-1 - b if node.parent < 0 else trees[b][node.parent].fed)
        reduced = not slots.sampling and draft.vocab is not None
        logits = draft.forward(tokens, positions, allowed, sources, reduced)
        fed_total += q_len
        filled, logp, q = slots.fill(logits, branch, draft.vocab if reduced else None)
        for i, (b, j) in enumerate(feed):
            parent = trees[b][j]
            trees[b].extend(_Node(t, j, d, parent.score + s)
                            for t, s in zip(filled[i], logp[i], strict=False))
            if q[i] is not None:
                qs[b][j] = q[i]
    return [_ordered(nodes, q) for nodes, q in zip(trees, qs, strict=True)]


def _ordered(nodes: list[_Node], q: dict[int, torch.Tensor]) -> Grown:
    """Best first: score, then depth (a parent before a child of equal score), then the
    order grown (siblings in slot order)."""
    order = sorted(range(len(nodes)), key=lambda j: (-nodes[j].score, nodes[j].depth, j))
    new = {-1: -1, **{old: i for i, old in enumerate(order)}}
    proposal = Proposal(np.array([nodes[j].token for j in order], np.int64),
                        np.array([new[nodes[j].parent] for j in order], np.int64),
                        "draft", np.array([nodes[j].score for j in order], np.float64))
    return Grown(proposal, {new[k]: v for k, v in q.items()})


# ------------------------------------------------------------------------- verification
def verify_sampled_tree(p: torch.Tensor, grown: Grown, generator: torch.Generator | None
                        ) -> tuple[list[int], int]:
    """Multi-candidate rejection sampling down a sampled tree (module docstring).

    ``p``: the target's probabilities ``[N + 1, V]`` at the root and every node (rows of the
    verify forward). Returns the accepted nodes and the token after them; the emitted
    tokens are distributed as the target's.
    """
    prop = grown.proposal
    path: list[int] = []
    node = -1
    while True:
        r = p[node + 1].double()
        kids = prop.children(node)
        s = grown.q[node].double() if kids else None
        accepted = None
        for c in kids:
            x = int(prop.tokens[c])
            u = float(torch.rand(1, generator=generator, dtype=torch.float64))
            if s[x] > 0 and u < min(1.0, float(r[x] / s[x])):
                accepted = c
                break
            residual = torch.clamp(r - s, min=0.0)
            total = float(residual.sum())
            r = residual / total if total > 0 else r
            s = s.clone()
            s[x] = 0.0
            mass = float(s.sum())
            if mass <= 0:
                break
            s /= mass
        if accepted is None:
            return path, int(torch.multinomial(r, 1, generator=generator))
        path.append(accepted)
        node = accepted
