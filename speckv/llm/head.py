"""The reduced draft vocabulary: an LM head over the tokens a draft may propose."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReducedHead(torch.nn.Module):
    """An LM head over the ``N`` tokens a draft may propose (FR-Spec's frequency-ranked head,
    EAGLE-3's ``draft_vocab_size`` with its d2t map).

    ``small(hidden)`` gives the ``[.., N]`` logits; calling the head gives full-vocabulary
    logits with every other token at a very low finite value, so every consumer of a
    causal LM's logits (the decoder, the trace profiler, Hugging Face's assisted generation)
    works unchanged: the argmax is always one of the ``N`` tokens, and softmax statistics
    (entropy, top-1, margin) equal those of the ``N`` logits exactly, since the others get
    probability 0. Verification stays over the target's full vocabulary, so a token outside
    the head costs a rejection and never changes the output.
    """

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())
        self.vocab_size = int(vocab_size)

    def small(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.small(hidden)
        # a large finite value that stays finite in float32 and after subtracting the row's
        # maximum (float64's lowest would become -inf in float32, and 0 * -inf is NaN)
        low = -0.5 * min(torch.finfo(small.dtype).max, torch.finfo(torch.float32).max)
        full = small.new_full((*small.shape[:-1], self.vocab_size), low)
        return full.index_copy_(-1, self.token_ids, small)

    def to_reduced(self) -> torch.Tensor:
        """``t2d``: index of every vocabulary token in the head, -1 where it has none."""
        t2d = torch.full((self.vocab_size,), -1, dtype=torch.long)
        t2d[self.token_ids] = torch.arange(len(self.token_ids))
        return t2d
