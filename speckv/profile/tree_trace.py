"""Trees in a trace: at every answer position, how many tokens each tree would accept.

Greedy speculative decoding is lossless, so the target's answer ``y`` does not depend on what
a step verifies, and a tree's outcome at answer position ``i`` is fixed by the tree the draft
grows there: the live decoder accepts the nodes that :meth:`Proposal.walk` follows with the
target's tokens, and on the target's path the target's token after a node of depth ``d`` *is*
``y[i + d]``. So the profiler grows, from every position, the deepest tree of
:data:`~speckv.runtime.proposal.TREES` with the same :func:`speckv.decode.tree.grow` the
decoder runs (all positions of a group of answers in one draft forward per level, each root
seeing its own teacher-forced prefix through the 4-D mask), reads every other tree from it
(:meth:`Grown.top`: growth is level by level, so a shallower tree's nodes are the deepest
tree's first ones), and walks each with the answer.

Near the budget's end the decoder grows a tree no deeper than the tokens left (``M - i -
1``); the walk here applies the same cut, and stops where the answer ends (an accepted EOS
ends it), so a recorded length never exceeds ``min(depth, M - i - 1, n - i)``. With a
feature-conditioned draft a root's state is the draft's output at the position before, read
from the target's state there, as the live catch-up computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from speckv.runtime.proposal import TREE_BRANCH, TREE_DEPTH_MAX, TREES

#: roots grown together (each level's forward feeds ``TREE_BRANCH`` nodes per root)
ROOTS_PER_FORWARD = 256


@dataclass
class TreeSeq:
    """One answered prompt as the draft's cache holds it.

    ``start``: the cache column of its first token; ``root_logits`` ``[n, V]``: the draft's
    logits for answer token ``i`` (teacher-forced, from position ``P - 1 + i``);
    ``root_states`` ``[n, H]``: a feature-conditioned draft's outputs there (else None).
    """

    start: int
    prompt_len: int
    answer: np.ndarray
    budget: int
    root_logits: object
    root_states: object | None = None
    vocab: object | None = None  # the token of each logit column (a reduced head)


def tree_accept_lengths(draft, cache, seqs: Sequence[TreeSeq]) -> list[np.ndarray]:
    """``[n, len(TREES)]`` int16 per sequence: the accepted length of each tree at each
    answer position (0 where the budget leaves no room to draft). ``cache`` holds every
    sequence's teacher-forced tokens; it is left as it was."""
    import torch

    from speckv.decode.tree import Root, TreeDraft, grow

    jobs = [(s, i) for s, seq in enumerate(seqs) for i in range(len(seq.answer))
            if seq.budget - i - 1 >= 1]
    out = [np.zeros((len(seq.answer), len(TREES)), np.int16) for seq in seqs]
    with torch.inference_mode():
        for lo in range(0, len(jobs), ROOTS_PER_FORWARD):
            part = jobs[lo : lo + ROOTS_PER_FORWARD]
            roots = []
            for s, i in part:
                seq = seqs[s]
                at = seq.prompt_len + i  # the position of the token the root predicts
                roots.append(Root(seq.root_logits[i], seq.start, seq.start + at, at,
                                  None if seq.root_states is None else seq.root_states[i],
                                  seq.vocab))
            tree_draft = TreeDraft(draft, cache, roots)
            try:
                grown = grow(tree_draft, roots, TREE_DEPTH_MAX, TREE_BRANCH)
            finally:
                tree_draft.reset()
            for (s, i), g in zip(part, grown, strict=True):
                out[s][i] = _walk_all(g, seqs[s].answer, i, seqs[s].budget)
    return out


def _walk_all(grown, answer: np.ndarray, i: int, budget: int) -> np.ndarray:
    """Each tree's accepted length at answer position ``i``."""
    from speckv.runtime.proposal import TreeShape

    n = len(answer)
    row = np.zeros(len(TREES), np.int16)
    for t, shape in enumerate(TREES):
        depth = min(shape.depth, budget - i - 1)
        tree = grown.top(TreeShape(shape.size, depth, shape.branch)).proposal
        depths = tree.depths

        def next_token(node: int, depths=depths) -> int | None:
            at = i + (0 if node < 0 else int(depths[node]))
            return int(answer[at]) if at < n else None

        row[t] = len(tree.walk(next_token))
    return row
