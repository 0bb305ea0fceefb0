"""Trace mode, one prompt at a time: the definition of a trace and its reference implementation.

Trace mode (greedy) exploits that greedy speculative decoding is lossless: the target's
answer does not depend on γ. So for each prompt the target's own greedy answer ``y`` is
decoded once, and the draft is run *teacher-forced* over it. At answer position ``j`` the
draft's greedy token given the true prefix is ``d(j)``, and ``agree[j] = d(j) == y[j]``.
A step starting at position ``i`` then accepts exactly the run of agreements that starts at
``i`` (while the draft agrees, its context *is* the true prefix), so one forward pass gives
``accept_len`` for every position and every γ at once.

Per-token stopping rules also need the draft's confidence at drafted positions *after* its
first disagreement, where its context has left the target's path. Those "off-track"
continuations depend only on the position ``m`` of the disagreement (context
``y[:m] + d(m)``), so each is decoded once and shared by every step that reaches it. The
result is a record at every answer position from which any up-front-γ or stop-per-token
policy replays exactly.

This module holds what every trace implementation shares (:func:`plan_branches` says which
continuations a trace needs, :func:`assemble` turns the pieces into a :class:`TraceResult`,
:func:`trace_rows` into step records) and :func:`trace_prompt`, the plain one-prompt
implementation: the target's answer by Hugging Face ``generate`` and every continuation
re-encoded from scratch. It is the reference the batched implementation
(:mod:`speckv.profile.batched`, what ``speckv profile`` runs) is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from speckv.runtime.features import GAMMA_MAX, history_arrays, token_stats

#: greedy continuation steps an off-track branch needs: a step at ``i`` whose first
#: disagreement is at ``m = i + r`` drafts its token ``k`` (``r + 2 <= k <= GAMMA_MAX``) as
#: continuation step ``k - r - 2 <= GAMMA_MAX - 2``; the same bound holds past an EOS.
BRANCH_STEPS = GAMMA_MAX - 1


@dataclass
class TraceResult:
    """Arrays describing one greedy answer, position by position (length n)."""

    answer: np.ndarray  # [n] target tokens
    max_new_tokens: int  # the answer budget M (n < M when the answer ended with EOS)
    target_top1: np.ndarray  # [n] target prob of each answer token
    stats: np.ndarray  # [n, 3] draft entropy/top1/margin, teacher-forced
    agree: np.ndarray  # [n] bool
    accept_len: np.ndarray  # [n]
    accept_cap: np.ndarray  # [n]
    ent_k: np.ndarray  # [n, GAMMA_MAX]
    top1_k: np.ndarray  # [n, GAMMA_MAX]
    #: [n, len(TREES)] each tree's accepted length (speckv.profile.tree_trace); None where the
    #: draft cannot grow trees (a model without custom 4-D attention masks)
    tree_accept: np.ndarray | None = None
    #: what the context lookup (speckv.runtime.lookup) offers at each position and how much
    #: of it the answer accepts (:func:`~speckv.runtime.lookup.lookup_trace`'s lists)
    lookup: dict[str, list[int]] | None = None

    def add_lookup(self, prompt_ids) -> TraceResult:
        from speckv.runtime.lookup import lookup_trace

        self.lookup = lookup_trace(list(prompt_ids), self.answer.tolist(), self.max_new_tokens)
        return self


@dataclass(frozen=True)
class BranchPlan:
    """The continuations a trace needs, as ``(prefix_len, first_token)`` branches.

    Branch ``(p, t)`` is the draft's greedy continuation of the first ``p`` answer tokens
    followed by ``t``: an off-track branch at disagreement ``m`` is ``(m, d(m))``; the
    "tail" past an answer that ended with EOS is ``(n - 1, y[n - 1])`` (the whole answer).
    ``branches[r]`` belongs to ``off[r]`` for ``r < len(off)``, the last to the tail when
    ``tail``.
    """

    off: tuple[int, ...]  # disagreement positions m, ascending
    tail: bool
    branches: tuple[tuple[int, int], ...]


def agreement_runs(agree: np.ndarray) -> np.ndarray:
    """``run[i]`` = number of consecutive True values starting at i."""
    run = np.zeros(len(agree) + 1, np.int64)
    for i in range(len(agree) - 1, -1, -1):
        run[i] = run[i + 1] + 1 if agree[i] else 0
    return run[:-1]


def _runs_and_caps(answer: np.ndarray, proposal: np.ndarray, max_new_tokens: int):
    n = len(answer)
    agree = proposal == answer
    run = agreement_runs(agree)
    # a live decoder may draft past the answer's end when it ended with EOS (it cannot know);
    # the run of agreements then stops at the EOS token, which ends the answer when accepted
    left = max_new_tokens - 1 - np.arange(n)
    cap = np.minimum(np.minimum(GAMMA_MAX, left), n - np.arange(n))
    # What a live step starting at i drafts: up to kmax[i] tokens (it cannot know where an
    # EOS-ended answer stops). Drafted token k sees the true prefix while k - 1 <= run[i];
    # past the first disagreement m = i + run[i] it sees y[:m] + d(m) + its own tokens
    # ("off-track", shared by every step reaching m); past an EOS that the draft agreed with,
    # it sees the whole answer + its own tokens (the "tail").
    kmax = np.minimum(GAMMA_MAX, left)
    on_path = run == n - np.arange(n)  # agrees all the way through the answer's end
    return agree, run, cap, kmax, on_path


def plan_branches(answer: np.ndarray, proposal: np.ndarray, max_new_tokens: int) -> BranchPlan:
    """Which continuations the trace of ``answer`` needs (``proposal[j]`` = ``d(j)``)."""
    n = len(answer)
    _, run, _, kmax, on_path = _runs_and_caps(answer, proposal, max_new_tokens)
    off = sorted({int(i + run[i]) for i in range(n) if not on_path[i] and kmax[i] >= run[i] + 2})
    tail = bool(n < max_new_tokens and (on_path & (kmax > n - np.arange(n))).any())
    branches = [(m, int(proposal[m])) for m in off]
    if tail:
        branches.append((n - 1, int(answer[n - 1])))
    return BranchPlan(tuple(off), tail, tuple(branches))


def assemble(answer: np.ndarray, target_top1: np.ndarray, draft_logits_stats: np.ndarray,
             proposal: np.ndarray, max_new_tokens: int, plan: BranchPlan,
             cont: np.ndarray | None) -> TraceResult:
    """A trace from its pieces.

    ``draft_logits_stats``: ``[n, 3]`` teacher-forced draft statistics (``token_stats``);
    ``proposal``: ``[n]`` the draft's teacher-forced argmax; ``cont``: ``[len(branches),
    >= BRANCH_STEPS, 2]`` entropy and top-1 of each branch's greedy continuation (row ``s``
    = the draft's distribution after the branch token and ``s`` greedy tokens).
    """
    n = len(answer)
    agree, run, cap, kmax, on_path = _runs_and_caps(answer, proposal, max_new_tokens)
    accept_len = np.minimum(run, cap)
    off = {m: cont[r] for r, m in enumerate(plan.off)}
    tail = cont[len(plan.off)] if plan.tail else None
    stats = draft_logits_stats
    ent_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    top1_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    for i in range(n):
        r = int(run[i])
        for k in range(1, int(kmax[i]) + 1):
            j = i + k - 1
            if j < n and k - 1 <= r:  # drafted on the true prefix: teacher-forced statistics
                ent_k[i, k - 1], top1_k[i, k - 1] = stats[j, 0], stats[j, 1]
            elif on_path[i]:  # past the answer's EOS
                ent_k[i, k - 1], top1_k[i, k - 1] = tail[j - n]
            else:  # past the first disagreement
                ent_k[i, k - 1], top1_k[i, k - 1] = off[i + r][k - r - 2]
    return TraceResult(np.asarray(answer), max_new_tokens, np.asarray(target_top1, np.float32),
                       stats, agree, accept_len, cap, ent_k, top1_k)


# ------------------------------------------------------------------ the reference, one prompt
def _target_answer(target, prompt_ids: list[int], max_new_tokens: int, eos: int | None):
    import torch

    device = next(target.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=eos, eos_token_id=eos)
    answer = out.sequences[0, len(prompt_ids):].tolist()
    if eos is not None and eos in answer:
        answer = answer[: answer.index(eos) + 1]
    logits = torch.stack(out.logits[: len(answer)], 0)[:, 0].float()
    probs = torch.softmax(logits, -1)
    top1 = probs.gather(-1, torch.tensor(answer, device=device)[:, None])[:, 0]
    return np.array(answer), top1.cpu().numpy().astype(np.float32)


def _off_track(draft, contexts: list[list[int]], steps: int, pad: int, batch_size: int = 32):
    """Greedy draft continuations of each context: ``[len(contexts), steps, 2]`` (ent, top1).

    A plain batched greedy loop (left padding, explicit positions, KV cache), each context
    encoded from scratch. HF ``generate`` is not used: it stops rows at EOS and its min-length
    rule masks EOS, and a live decoder's draft does neither.
    """
    import torch
    from transformers import DynamicCache

    device = next(draft.parameters()).device
    out = np.full((len(contexts), steps, 2), np.nan, np.float32)
    order = np.argsort([len(c) for c in contexts])  # similar lengths batch together
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        rows = [contexts[i] for i in idx]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        with torch.inference_mode():
            for step in range(steps):
                logits = draft(input_ids=ids, attention_mask=mask, position_ids=pos,
                               cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                logits = logits.float()
                out[idx, step] = token_stats(logits.cpu().numpy())[:, :2]
                ids = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(ids)], -1)
                pos = pos[:, -1:] + 1
    return out


def trace_prompt(draft, target, prompt_ids: list[int], max_new_tokens: int,
                 eos: int | None, pad: int) -> TraceResult:
    """Profile one prompt in trace mode (greedy), the plain way (the reference)."""
    import torch

    if getattr(draft, "is_feature_draft", False):
        raise TypeError("A feature-conditioned draft (speckv.llm.feature_draft) is traced by "
                        "speckv.profile.feature_trace: use speckv.profile.profiler.trace_prompt "
                        "or trace_batch, which pick the right implementation.")
    from speckv.decode.costs import lm_forward, new_cache
    from speckv.decode.tree import supports_4d_masks
    from speckv.profile.tree_trace import TreeSeq, tree_accept_lengths

    answer, target_top1 = _target_answer(target, prompt_ids, max_new_tokens, eos)
    n = len(answer)
    cache = new_cache(draft)
    with torch.inference_mode():  # logits only where an answer token is predicted
        rows = lm_forward(draft, list(prompt_ids) + answer.tolist(), cache, keep=n + 1)[:-1]
    logits = rows.float().cpu().numpy()
    stats = token_stats(logits)
    proposal = logits.argmax(-1)
    plan = plan_branches(answer, proposal, max_new_tokens)
    contexts = [list(prompt_ids) + answer[:p].tolist() + [t] for p, t in plan.branches]
    cont = _off_track(draft, contexts, GAMMA_MAX, pad) if contexts else None
    tr = assemble(answer, target_top1, stats, proposal, max_new_tokens, plan, cont)
    if supports_4d_masks(draft):  # trees need them (speckv.decode.tree)
        tr.tree_accept = tree_accept_lengths(draft, cache, [TreeSeq(
            0, len(prompt_ids), answer, max_new_tokens, rows)])[0]
    return tr.add_lookup(prompt_ids)


def trace_rows(tr: TraceResult, ident: dict, costs: dict) -> pd.DataFrame:
    """Step records (one per answer position) of a trace."""
    n = len(tr.answer)
    ema, run, prev = history_arrays(tr.agree, tr.target_top1)
    return pd.DataFrame({
        **{k: [v] * n for k, v in ident.items()},
        "step": np.arange(n, dtype=np.int32),
        "position": np.arange(n, dtype=np.int32),
        "seq_len": np.full(n, n, np.int32),
        "max_new_tokens": np.full(n, tr.max_new_tokens, np.int32),
        "temperature": np.zeros(n, np.float32),
        "mode": "trace",
        "replayable": True,
        "draft_entropy": tr.stats[:, 0], "draft_top1": tr.stats[:, 1],
        "draft_margin": tr.stats[:, 2],
        "target_top1_prev": prev, "agree_ema": ema, "agree_run": run.astype(np.int32),
        "draft_entropy_k": list(tr.ent_k), "draft_top1_k": list(tr.top1_k),
        "accept_len": tr.accept_len.astype(np.int16),
        "accept_cap": tr.accept_cap.astype(np.int16),
        "accept_prob_k": None,
        "tree_accept_len": (list(tr.tree_accept.astype(np.float32))
                            if tr.tree_accept is not None else None),
        **{f"lookup_{key}": (pd.array(tr.lookup[key], dtype="Int16") if tr.lookup
                             else pd.array([None] * n, dtype="Int16"))
           for key in ("accept", "length", "match", "occurrences", "agreeing")},
        "cost_draft_s": np.float32(costs["cost_draft_s"]),
        "cost_verify_s": [np.asarray(costs["cost_verify_s"], np.float32)] * n,
        **{name: ([np.asarray(costs[name], np.float32)] * n if costs.get(name) else None)
           for name in ("cost_catchup_s", "cost_tree_draft_s", "cost_tree_verify_s")},
        "gamma": pd.array([None] * n, dtype="Int16"),
        "drafted": pd.array([None] * n, dtype="Int16"),
        "t_step_s": np.full(n, np.nan, np.float32),
        "paper_mean_entropy": np.nan, "paper_mean_confidence": np.nan,
        "paper_max_entropy": np.nan, "paper_min_confidence": np.nan,
    })
