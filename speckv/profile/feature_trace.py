"""Trace mode for a feature-conditioned draft (:mod:`speckv.llm.feature_draft`).

A plain draft's γ > 1 proposals on the target's path *are* its teacher-forced proposals, so a
trace needs its off-track continuations only. A feature-conditioned draft's are not: live,
its drafted token ``k + 1`` reads its own output state of token ``k``, never the target's
(the target has not run there yet). So from every answer position the trace runs the
draft's own greedy chain of ``GAMMA_MAX`` tokens, exactly as the live decoder drafts it: one
:meth:`~speckv.llm.feature_draft.FeatureDraft.unroll` over the whole sequence computes every
origin's chain at once (each depth attends to the teacher-forced prefix and its own chain).

From the chains: the step features and the agreement history come from depth 1 (the draft
reading the target's states, what the live catch-up forward computes); a step starting at
answer position ``i`` accepts the leading run of its chain that equals the answer; the
stopping rules' per-token statistics are the chain's. Replay then follows the decoder's rule
for this draft: every token a step emits but the first is settled by the next catch-up
(:mod:`speckv.evaluate.replay`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speckv.profile.trace import TraceResult, _runs_and_caps
from speckv.runtime.features import GAMMA_MAX, token_stats
from speckv.runtime.proposal import Proposal


def target_states(target, seqs: Sequence[Sequence[int]]):
    """The target's last hidden state (after its final norm) at every position of each
    sequence, teacher-forced in one right-padded batch: ``[B, max len, hidden]``."""
    import torch

    device = next(target.parameters()).device
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), device=device)
        mask[b, : len(s)] = 1
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    return decoder(input_ids=ids, attention_mask=mask).last_hidden_state


def feature_draft_side(draft, target, prompts: Sequence[Sequence[int]],
                       answers: Sequence[np.ndarray], max_new_tokens: int | Sequence[int],
                       target_top1: Sequence[np.ndarray]) -> list[TraceResult]:
    """Traces of a group of answered prompts for a feature-conditioned draft."""
    import torch

    budgets = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))
    seqs = [[*p, *a.tolist()] for p, a in zip(prompts, answers, strict=True)]
    param = next(draft.parameters())
    with torch.inference_mode():
        states = target_states(target, seqs).to(param.device, param.dtype)
        b, width = states.shape[:2]
        tokens = torch.zeros((b, width), dtype=torch.long, device=param.device)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = torch.tensor(s, device=param.device)
        inputs = torch.zeros_like(states)  # token t reads the state at t - 1 (zeros at 0)
        inputs[:, 1:] = states[:, :-1]
        positions = torch.arange(width, device=param.device)[None].expand(b, -1)
        outs = draft.unroll(tokens, inputs, positions, GAMMA_MAX)
        results = []
        for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            n, start = len(answer), len(prompt) - 1  # origin of answer position i: start + i
            stats = np.empty((GAMMA_MAX, n, 3), np.float32)
            best = np.empty((GAMMA_MAX, n), np.int64)
            for d, g in enumerate(outs):
                small = draft.logits_small(g[r, start : start + n]).float().cpu().numpy()
                stats[d] = token_stats(small)
                best[d] = draft.lm_head.token_ids.cpu().numpy()[small.argmax(-1)]
            results.append(_assemble(np.asarray(answer), target_top1[r], stats, best,
                                     int(budgets[r])))
            results[-1].tree_accept = _tree_accepts(draft, seqs[r], states[r], len(prompt),
                                                    np.asarray(answer), int(budgets[r]))
    return results


def _tree_accepts(draft, seq: Sequence[int], states, prompt_len: int, answer: np.ndarray,
                  budget: int) -> np.ndarray:
    """Each tree's accepted length at each answer position (:mod:`speckv.profile.tree_trace`):
    the draft's cached forward over the sequence reads the target's states (as the live
    catch-up does), and its outputs at the positions before the answer tokens are the roots."""
    import torch

    from speckv.llm.feature_draft import TargetStates
    from speckv.profile.tree_trace import TreeSeq, tree_accept_lengths

    param = next(draft.parameters())
    target = TargetStates(draft.cfg.hidden_size, param.dtype, param.device)
    target.write(0, states[: len(seq)])
    target.valid = len(seq)
    cache = draft.new_cache(target)
    g = draft.encode(torch.tensor([list(seq)], device=param.device), cache)[0]
    n = len(answer)
    roots = g[prompt_len - 1 : prompt_len - 1 + n]
    return tree_accept_lengths(draft, cache, [TreeSeq(0, prompt_len, answer, budget,
                                                      draft.logits_small(roots), roots,
                                                      draft.lm_head.token_ids)])[0]


def _assemble(answer: np.ndarray, target_top1: np.ndarray, stats: np.ndarray, best: np.ndarray,
              max_new_tokens: int) -> TraceResult:
    """``stats[d, i]``/``best[d, i]``: the chain from answer position ``i``, token ``d + 1``."""
    n = len(answer)
    proposal = best[0]
    agree, _, cap, kmax, _ = _runs_and_caps(answer, proposal, max_new_tokens)
    run = np.zeros(n, np.int64)  # leading chain tokens the answer accepts (Proposal.walk)
    for i in range(n):
        run[i] = len(Proposal.chain(best[:, i]).walk(
            lambda node, i=i: int(answer[i + node + 1]) if i + node + 1 < n else None))
    ent_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    top1_k = np.full((n, GAMMA_MAX), np.nan, np.float32)
    for i in range(n):
        k = int(kmax[i])
        ent_k[i, :k] = stats[:k, i, 0]
        top1_k[i, :k] = stats[:k, i, 1]
    return TraceResult(answer, max_new_tokens, np.asarray(target_top1, np.float32), stats[0],
                       agree, np.minimum(run, cap), cap, ent_k, top1_k)
