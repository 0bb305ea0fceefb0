"""A step's candidates: one proposal type for chains, trees and lookup continuations.

Every speculative step verifies a set of candidate continuations in one target forward. The
set is a tree over the *root*, the last emitted token (which the verify forward feeds first):
node ``j`` holds ``tokens[j]`` and hangs under ``parents[j]`` (``-1``: the root). Nodes come
parents first, and siblings in the order verification tries them. A chain of γ tokens is the
tree of width one (``parents = [-1, 0, 1, ...]``); a lookup continuation is a chain whose
``source`` is ``"lookup"``; :meth:`Proposal.with_branch` adds one to a draft's tree (source
``"draft+lookup"``), so a single forward verifies both.

The decoder (:mod:`speckv.decode.decoder`) verifies a proposal with one target forward over
``[root, *tokens]``: a chain with the ordinary causal mask, a tree with :meth:`Proposal.mask`
(each node sees the cache, the root, its ancestors and itself) at positions ``start +
depth``. Greedy acceptance is :meth:`Proposal.walk`: from the root, follow the child whose
token is the target's next token while there is one; the target's token after the last
accepted node is the step's bonus token. The trace profiler (:mod:`speckv.profile`) walks the
same way with the target's answer as the "next token", so a recorded accepted length is
exactly what the live decoder would accept; replay (:mod:`speckv.evaluate.replay`) reads
those lengths. Sampling (multi-candidate rejection sampling) lives with the decoder.

The tree options a controller may choose (:data:`TREES`) are fixed here, with the chains'
γ = 1..``GAMMA_MAX``, so a step's choice is one integer code everywhere (records, replay,
the exported controller): ``0`` a plain step, ``1..GAMMA_MAX`` a chain of that γ, and
``GAMMA_MAX + 1 + i`` the tree ``TREES[i]`` (:func:`option_name`, :func:`tree_index`).

This module imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from speckv.runtime.features import GAMMA_MAX

#: where a proposal's tokens come from
SOURCES: Final = ("draft", "lookup", "draft+lookup")


@dataclass(frozen=True)
class TreeShape:
    """A dynamic tree (EAGLE-2): ``depth`` levels grown from the draft's top ``branch``
    guesses, ``size`` nodes kept.

    Level 1 holds the root's ``branch`` most likely tokens. Each further level expands the
    ``branch`` nodes of the level before with the highest cumulative draft probability (one
    draft forward over them), each into its ``branch`` most likely children. Of every node
    grown, the ``size`` with the highest cumulative probability are kept (a kept node's
    parent is always kept: a child's cumulative probability never exceeds its parent's).
    """

    size: int
    depth: int
    branch: int

    def __post_init__(self) -> None:
        if not (1 <= self.depth <= self.size and self.branch >= 1):
            raise ValueError(f"a tree needs 1 <= depth <= size and branch >= 1, got {self}.")

    @property
    def name(self) -> str:
        return f"tree:{self.size}"

    @property
    def draft_forwards(self) -> int:
        """Draft forwards the tree needs after the step's catch-up forward (one per level
        below the first), each over ``branch`` nodes."""
        return self.depth - 1


#: the trees a step may verify, smallest first: 4 children per expanded node (the shipped
#: draft's top-4 holds the target's token about two times in three), one more level per
#: doubling of the node budget from two levels at 4 nodes. Measured on the demo pair (8
#: suite prompts, 64 tokens, fp16 in bfloat16, AVX-512 without AMX): a level beyond these
#: added at most 0.04 tokens per step (4 nodes in 3 levels: 1.91 against 1.88 in 2) for one
#: more draft forward per step.
TREES: Final = (TreeShape(4, 2, 4), TreeShape(8, 3, 4), TreeShape(16, 4, 4),
                TreeShape(32, 5, 4), TreeShape(64, 6, 4))
TREE_SIZES: Final = tuple(t.size for t in TREES)
#: the deepest tree: a trace grows this one at every position and reads every other from it
TREE_DEPTH_MAX: Final = max(t.depth for t in TREES)
#: the most nodes a tree grows before keeping ``size`` of them
TREE_BRANCH: Final = TREES[0].branch
#: option codes: 0 plain, 1..GAMMA_MAX chains, then the trees (what a policy's ``choose`` may
#: return after the draft's first forward), then the context lookup's continuation alone
#: (decided before the draft runs, :mod:`speckv.runtime.lookup`)
PLAIN_CODE: Final = 0
N_DRAFT_OPTIONS: Final = 1 + GAMMA_MAX + len(TREES)
LOOKUP_CODE: Final = N_DRAFT_OPTIONS
N_OPTIONS: Final = N_DRAFT_OPTIONS + 1


def tree_code(index: int) -> int:
    """The option code of ``TREES[index]``."""
    return GAMMA_MAX + 1 + index


def tree_index(code: int) -> int | None:
    """The index in :data:`TREES` of an option code, ``None`` for any other option."""
    index = code - GAMMA_MAX - 1
    return index if 0 <= index < len(TREES) else None


def option_name(code: int) -> str:
    """``plain``, ``fixed:γ``, ``tree:N`` or ``lookup``."""
    if code == PLAIN_CODE:
        return "plain"
    if code == LOOKUP_CODE:
        return "lookup"
    index = tree_index(code)
    return f"fixed:{code}" if index is None else TREES[index].name


OPTION_NAMES: Final = tuple(option_name(c) for c in range(N_OPTIONS))


def tree_by_size(size: int) -> int:
    """The index in :data:`TREES` of the tree of ``size`` nodes."""
    try:
        return TREE_SIZES.index(size)
    except ValueError:
        raise ValueError(f"no tree of {size} nodes: speckv's trees have "
                         f"{', '.join(map(str, TREE_SIZES))}.") from None


@dataclass(frozen=True)
class Proposal:
    """The candidates of one step (see the module docstring).

    ``scores``: each node's cumulative log-probability under the draft, where the draft grew
    it (``None`` for a lookup continuation); :meth:`top` keeps the best nodes by it.
    """

    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int64; -1: the root
    source: str = "draft"
    scores: np.ndarray | None = None  # [N] float64

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.parents.shape != (n,) or (self.scores is not None and self.scores.shape != (n,)):
            raise ValueError("a proposal needs one parent (and score) per token.")
        if n and not ((self.parents >= -1) & (self.parents < np.arange(n))).all():
            raise ValueError("a proposal lists parents before their children.")
        if self.source not in SOURCES:
            raise ValueError(f"unknown proposal source {self.source!r}: use one of {SOURCES}.")

    @classmethod
    def chain(cls, tokens: Sequence[int], source: str = "draft") -> Proposal:
        """γ tokens, each the child of the one before."""
        n = len(tokens)
        return cls(np.asarray(tokens, np.int64).reshape(n), np.arange(-1, n - 1, dtype=np.int64),
                   source)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return bool((self.parents == np.arange(-1, len(self) - 1)).all())

    @property
    def depths(self) -> np.ndarray:
        """``[N]`` each node's depth (the root's children have depth 1)."""
        out = np.zeros(len(self), np.int64)
        for j, p in enumerate(self.parents.tolist()):
            out[j] = 1 if p < 0 else out[p] + 1
        return out

    def mask(self) -> np.ndarray:
        """``[N + 1, N + 1]`` bool, row/column 0 the root: ``mask[a, b]`` when ``b`` is ``a``
        or one of its ancestors (what ``a`` attends to in the verify forward, besides the
        cache)."""
        n = len(self)
        out = np.zeros((n + 1, n + 1), bool)
        out[:, 0] = True
        for j, p in enumerate(self.parents.tolist()):
            out[j + 1] = out[p + 1]
            out[j + 1, j + 1] = True
        return out

    def children(self, node: int) -> list[int]:
        """The children of ``node`` (-1: the root) in the order verification tries them."""
        return np.flatnonzero(self.parents == node).tolist()

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root's child down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def walk(self, next_token: Callable[[int], int | None]) -> list[int]:
        """Greedy acceptance: the accepted nodes, root side first.

        ``next_token(node)`` is the target's token after ``node`` (-1: the root), ``None``
        where it has none (past a trace's answer). From the root, the walk moves to the child
        holding that token while one does; siblings hold distinct tokens in a greedy tree, so
        the path is unique. The step then emits the path's tokens and ``next_token`` of its
        last node.
        """
        path: list[int] = []
        node = -1
        kids = self._children_by_parent()
        while True:
            token = next_token(node)
            if token is None:
                return path
            nxt = kids.get(node, {}).get(int(token))
            if nxt is None:
                return path
            path.append(nxt)
            node = nxt

    def _children_by_parent(self) -> dict[int, dict[int, int]]:
        kids: dict[int, dict[int, int]] = {}
        for j, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist(),
                                       strict=True)):
            kids.setdefault(p, {}).setdefault(t, j)  # the first of equal siblings
        return kids

    def top(self, size: int, depth: int) -> Proposal:
        """The best ``size`` nodes of depth at most ``depth`` by ``scores``, in this order.

        Nodes must already come best first (as :func:`speckv.decode.tree.grow` orders them),
        so this keeps the first ``size`` nodes of depth ``<= depth``: the tree grown with that
        depth limit and node budget (growth is level by level, so a shallower tree's nodes are
        exactly these).
        """
        keep = np.flatnonzero(self.depths <= depth)[:size]
        return self.subset(keep)

    def with_branch(self, tokens: Sequence[int]) -> tuple[Proposal, int]:
        """This proposal with ``tokens`` (a lookup's continuation) as one more path from the
        root, and how many nodes that added.

        The path shares the nodes this proposal already has (a trie merge: where a node with
        the next token hangs under the current one, the path goes on from it), so every path of
        the result is a path of this proposal or a prefix of ``tokens``, and greedy acceptance
        (:meth:`walk`) accepts exactly the longer of the two walks: what replay prices from the
        recorded outcomes of each. The new nodes come last, without scores.
        """
        kids = self._children_by_parent()
        toks, parents = self.tokens.tolist(), self.parents.tolist()
        node = -1
        for token in tokens:
            nxt = kids.get(node, {}).get(int(token))
            if nxt is None:
                toks.append(int(token))
                parents.append(node)
                nxt = len(toks) - 1
                kids.setdefault(node, {})[int(token)] = nxt
            node = nxt
        added = len(toks) - len(self)
        merged = Proposal(np.asarray(toks, np.int64), np.asarray(parents, np.int64),
                          "draft+lookup" if len(tokens) else self.source)
        return merged, added

    def subset(self, keep: np.ndarray) -> Proposal:
        """The nodes ``keep`` (ascending, closed under parents), renumbered."""
        keep = np.asarray(keep, np.int64)
        new = np.full(len(self) + 1, -2, np.int64)  # old index + 1 -> new index
        new[0] = -1
        new[keep + 1] = np.arange(len(keep))
        parents = new[self.parents[keep] + 1]
        if (parents == -2).any():
            raise ValueError("a subset of a proposal must keep every kept node's parent.")
        scores = None if self.scores is None else self.scores[keep]
        return Proposal(self.tokens[keep], parents, self.source, scores)
