"""Trace mode inside llama.cpp: the step records of :mod:`speckv.profile.trace`, computed by a
GGUF target and a GGUF draft, priced with llama.cpp's own costs (``speckv profile --engine
llamacpp``).

A trace is defined by the target's greedy answer and the draft run teacher-forced over it
(:mod:`speckv.profile.trace`); here each piece is a llama.cpp forward:

- the answer is llama.cpp's plain greedy decoding (the prompt in one forward, then one token
  per forward: what ``llamacpp:plain`` and the speculative loop's plain steps compute), and
  each answer token's probability is read from the row that emitted it;
- the draft reads the prompt and the answer in one forward whose rows ``P - 1 ..`` give its
  statistics and its greedy token at every answer position;
- each off-track continuation (:func:`~speckv.profile.trace.plan_branches`) is the draft's
  greedy decoding after ``prompt + answer[:p] + [t]``: the draft's cache is cut back to the
  branch's prefix (``seq_rm``), the branches taken in the order of their prefixes, so the
  answer between two branches is fed once more, without logits;
- the costs are :func:`speckv.engines.llamacpp.measure_costs` at a context of
  :data:`~speckv.decode.costs.CONTEXT_LEN` tokens, as Hugging Face's profile measures its.

There are no tree columns: llama.cpp's batch takes no tree mask, so its loop verifies chains
and lookup continuations only (a controller trained on these records prices trees as
unavailable). The lookup columns are the same function of the prompt and the answer as in
Hugging Face's traces.

What replay assumes and llama.cpp does not quite give: greedy speculative decoding's output is
the target's plain greedy answer whatever γ. llama.cpp's forward over several rows is not
bit-identical to its one-token forward, so a live decoding may part from this answer at a
near-tie (:mod:`speckv.engines.llamacpp`), after which the live run's steps and the trace's
differ. :func:`live_agreement` measures how often that happens on the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv.engines.llamacpp import GGUFModel, LlamaCppDecoder, argmax_top, measure_costs
from speckv.profile.trace import BRANCH_STEPS, TraceResult, assemble, plan_branches
from speckv.runtime.features import token_stats


def target_answer(target: GGUFModel, prompt_ids: Sequence[int], max_new_tokens: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's greedy answer (ending at its first end-of-generation token, or after
    ``max_new_tokens``) and the target's probability of each answer token."""
    target.reset()
    row = target.forward(list(prompt_ids), "last")[0]
    answer, top1 = [], []
    while True:
        token, prob, _ = argmax_top(row)
        answer.append(token)
        top1.append(prob)
        if len(answer) >= max_new_tokens or target.is_eog(token):
            break
        row = target.forward([token], "last")[0]
    target.reset()
    return np.asarray(answer, np.int64), np.asarray(top1, np.float32)


def _teacher_forced(draft: GGUFModel, prompt_ids: Sequence[int], answer: np.ndarray,
                    ) -> np.ndarray:
    """The draft's logits for every answer token given the true prefix, ``[n, V]``; its
    cache then holds ``prompt + answer[:-1]``."""
    prompt = list(prompt_ids)
    draft.reset()
    draft.forward(prompt[:-1], "none")
    fed = [prompt[-1], *answer[:-1].tolist()]
    out = np.empty((len(fed), draft.n_vocab), np.float32)
    for lo in range(0, len(fed), draft.n_batch):  # rows with logits: one batch at a time
        chunk = fed[lo : lo + draft.n_batch]
        out[lo : lo + len(chunk)] = draft.forward(chunk, "all")
    return out


def _continuations(draft: GGUFModel, prompt_len: int, answer: np.ndarray,
                   branches: Sequence[tuple[int, int]], steps: int = BRANCH_STEPS) -> np.ndarray:
    """``[len(branches), steps, 2]``: entropy and top-1 of the draft's greedy continuation of
    each branch ``(p, t)`` (row ``s``: after ``t`` and ``s`` greedy tokens). The draft's
    cache must hold ``prompt + answer[:p]`` for the smallest ``p`` at least."""
    out = np.full((len(branches), steps, 2), np.nan, np.float32)
    for r in sorted(range(len(branches)), key=lambda r: branches[r][0]):
        p, token = branches[r]
        held = draft.n_past - prompt_len  # answer tokens the cache holds, from before
        draft.truncate(prompt_len + min(p, held))
        if held < p:  # a branch before this one overwrote them: feed them again
            draft.forward(answer[held:p].tolist(), "none")
        for s in range(steps):
            row = draft.forward([int(token)], "last")[0]
            out[r, s] = token_stats(row[None])[0, :2]
            token = int(row.argmax())
        draft.truncate(prompt_len + p)
    return out


def trace_gguf(target: GGUFModel, draft: GGUFModel, prompt_ids: Sequence[int],
               max_new_tokens: int) -> TraceResult:
    """One prompt's trace in llama.cpp (greedy), lookup columns included, no trees."""
    answer, target_top1 = target_answer(target, prompt_ids, max_new_tokens)
    logits = _teacher_forced(draft, prompt_ids, answer)
    stats = token_stats(logits)
    proposal = logits.argmax(-1)
    plan = plan_branches(answer, proposal, max_new_tokens)
    cont = (_continuations(draft, len(prompt_ids), answer, plan.branches)
            if plan.branches else None)
    draft.reset()
    tr = assemble(answer, target_top1, stats, proposal, max_new_tokens, plan, cont)
    return tr.add_lookup(list(prompt_ids))


def cost_context(n_vocab: int, length: int, seed: int = 0) -> list[int]:
    """The ``length`` cached tokens costs are measured at: seeded random ids of the
    vocabulary, the same for every run (a forward's time does not depend on which tokens)."""
    return np.random.default_rng(seed).integers(3, n_vocab, size=length).tolist()


def record_costs(measured: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_costs`'s result as the cost columns of step records (no trees)."""
    return {"cost_draft_s": measured["t_draft"], "cost_verify_s": measured["t_verify"],
            "cost_catchup_s": measured["t_catchup"], "cost_tree_draft_s": None,
            "cost_tree_verify_s": None}


def measure(target: GGUFModel, draft: GGUFModel, context_len: int) -> dict[str, Any]:
    """llama.cpp's costs for the records, at ``context_len`` cached tokens
    (:func:`cost_context`)."""
    return measure_costs(target, draft, cost_context(target.n_vocab, context_len))


def live_agreement(target: GGUFModel, draft: GGUFModel, prompt_ids: Sequence[int],
                   tr: TraceResult, gamma: int) -> dict[str, int]:
    """How far a live fixed-γ decoding in llama.cpp follows the trace of the same prompt:
    the steps before the live answer parts from the trace's (all of them when it does not),
    and of those, how many accepted what the trace says (``accept_len`` at the step's
    position, capped by γ)."""
    live = LlamaCppDecoder(target, draft, "fixed", gamma=gamma).generate(
        list(prompt_ids), tr.max_new_tokens)
    answer = tr.answer.tolist()
    same = next((i for i, (a, b) in enumerate(zip(answer, live.token_ids, strict=False))
                 if a != b), min(len(answer), len(live.token_ids)))
    steps = agreeing = 0
    position = 1  # the prompt's forward emits answer token 0; steps start at position 1
    for step in live.steps:
        if position + step["accepted"] >= same:  # this step emitted a token the trace lacks
            break
        steps += 1
        expected = min(int(tr.accept_len[position]), step["drafted"])
        agreeing += int(step["accepted"] == expected)
        position += step["accepted"] + 1
    return {"steps": steps, "agreeing": agreeing, "parted_at": same, "answer": len(answer)}
