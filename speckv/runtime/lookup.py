"""Drafts from the context: what followed the current suffix the last time it occurred.

The cheapest draft of all costs no forward: where an answer repeats its context (a summary
quoting its passage, code reusing its own names), the tokens that followed the longest
earlier occurrence of the sequence's last ``n`` tokens are a good guess for what comes next
(prompt lookup decoding; Hugging Face's ``prompt_lookup_num_tokens``, llama.cpp's n-gram
lookup, vLLM's ``ngram``). :class:`ContextLookup` keeps an index of every n-gram of the
sequence so far (``min_n <= n <= max_n``), so a proposal costs a few dictionary look-ups
however long the context, and comes with its own signals: the match length ``n`` (longer is
more specific), how many earlier occurrences the n-gram has, and how many of them were
followed by the same next token.

A proposal is a chain (:meth:`speckv.runtime.proposal.Proposal.chain` with source
``"lookup"``): a deterministic draft, so greedy verification accepts its leading tokens that
equal the target's, exactly as for the draft model's chain. The trace profiler records, at
every answer position, what this proposer offers there and how much of it the target's
answer accepts (``lookup_*`` columns of :mod:`speckv.records`), so policies over it replay.

This module imports nothing outside the standard library, numpy and speckv.runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from speckv.runtime.proposal import Proposal

#: n-gram lengths searched, longest first
MIN_N: Final = 1
MAX_N: Final = 4
#: the most tokens a lookup proposes (a chain's γmax)
MAX_TOKENS: Final = 8


@dataclass(frozen=True)
class LookupProposal:
    """What the context proposes next: ``tokens`` (empty: no match), the length of the
    matched suffix, the earlier occurrences of that suffix and how many of them the first
    proposed token followed."""

    tokens: tuple[int, ...]
    match: int = 0
    occurrences: int = 0
    agreeing: int = 0


NO_PROPOSAL: Final = LookupProposal(())


@dataclass
class ContextLookup:
    """An n-gram index over one growing sequence (prompt, then the answer as it is emitted).

    :meth:`extend` appends tokens; :meth:`propose` looks up the longest suffix of length
    ``max_n`` down to ``min_n`` that occurred before (ending before the last token), and
    proposes up to ``max_tokens`` tokens that followed its most recent occurrence.
    """

    min_n: int = MIN_N
    max_n: int = MAX_N
    max_tokens: int = MAX_TOKENS
    tokens: list[int] = field(default_factory=list)
    #: n-gram -> the end positions (exclusive) of its occurrences, in order
    _index: dict[tuple[int, ...], list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n or self.max_tokens < 1:
            raise ValueError("a context lookup needs 1 <= min_n <= max_n and max_tokens >= 1.")
        initial, self.tokens = list(self.tokens), []
        self.extend(initial)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._index.setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def propose(self, limit: int | None = None) -> LookupProposal:
        """The continuation of the longest earlier occurrence of the current suffix, at most
        ``limit`` (default ``max_tokens``) tokens; :data:`NO_PROPOSAL` when none occurred."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        end = len(self.tokens)
        if limit < 1:
            return NO_PROPOSAL
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            ends = self._index.get(tuple(self.tokens[end - n :]))
            if not ends or len(ends) < 2:  # the suffix itself is its last occurrence
                continue
            earlier = ends[:-1]
            last = earlier[-1]
            cont = tuple(self.tokens[last : min(last + limit, end)])
            if not cont:
                continue
            agreeing = sum(1 for e in earlier if e < end and self.tokens[e] == cont[0])
            return LookupProposal(cont, n, len(earlier), agreeing)
        return NO_PROPOSAL


def lookup_trace(prompt: Sequence[int], answer: Sequence[int], budget: int,
                 lookup: ContextLookup | None = None) -> dict[str, list[int]]:
    """At every answer position ``i``: what :class:`ContextLookup` proposes after ``prompt
    + answer[:i]`` (at most ``min(max_tokens, budget - i - 1)`` tokens, what a step there may
    verify) and how many of its leading tokens the answer accepts (an accepted EOS ends the
    answer, so at most ``n - i``). Keys: ``accept``, ``length``, ``match``, ``occurrences``,
    ``agreeing``, one list entry per position."""
    index = lookup or ContextLookup()
    index.extend(prompt)
    out: dict[str, list[int]] = {k: [] for k in ("accept", "length", "match", "occurrences",
                                                 "agreeing")}
    n = len(answer)
    for i in range(n):
        prop = index.propose(budget - i - 1)
        accepted = len(Proposal.chain(prop.tokens, "lookup").walk(  # the decoder's acceptance
            lambda node, i=i: answer[i + node + 1] if i + node + 1 < n else None))
        out["accept"].append(accepted)
        out["length"].append(len(prop.tokens))
        out["match"].append(prop.match)
        out["occurrences"].append(prop.occurrences)
        out["agreeing"].append(prop.agreeing)
        index.extend([answer[i]])
    return out
