"""Trace replay and the live decoder agree exactly under greedy decoding (tiny fp32 models).

This is the property the whole offline pipeline rests on: a policy scored by replaying trace
records takes the same steps, drafts and accepts the same tokens, and sees the same
decision-time features as the same policy run live.
"""

from __future__ import annotations

import numpy as np
import pytest

from speckv.decode.decoder import SpeculativeDecoder
from speckv.evaluate.replay import prepare, replay
from speckv.policies import ConfidenceStop, FixedGamma, Heuristic
from speckv.profile.profiler import trace_prompt, trace_rows

IDENT = {"run_id": "r", "draft_model": "d", "target_model": "t", "compression": "fp16",
         "compute_dtype": "float32", "task": "chat", "prompt_id": "p"}
COSTS = {"cost_draft_s": 0.01, "cost_verify_s": [0.03 + 0.002 * g for g in range(9)]}
PROMPTS = ([1, 5, 17, 33, 8], [1, 3, 40], [1, 19, 9], [1, 77, 3, 3, 12, 60])


def _replay_steps(rows, policy):
    """Per-step (drafted, accepted) of a replay, for a step-by-step comparison."""
    from speckv.policies import StepContext
    from speckv.records import feature_matrix

    feats = feature_matrix(rows)
    accept = rows["accept_len"].to_numpy()
    top1 = np.stack(rows["draft_top1_k"])
    ent = np.stack(rows["draft_entropy_k"])
    n, budget = len(rows), int(rows["max_new_tokens"].iat[0])
    p, out = 0, []
    policy.reset()
    while p < n:
        left = budget - p - 1
        if left == 0:
            out.append((p, 0, 0))
            break
        g = min(policy.choose(StepContext(feats[p], "fp16", p, min(8, left),
                                          np.ones(8, np.float32))), min(8, left))
        d = next((k for k in range(1, g) if not policy.keep_drafting(k, top1[p, k - 1],
                                                                    ent[p, k - 1])), g)
        a = min(int(accept[p]), d, n - p)  # an accepted EOS ends the answer
        policy.observe(d, a)
        out.append((p, d, a))
        p += min(a + 1, n - p)
    return out


@pytest.mark.parametrize("make_policy", [lambda: FixedGamma(1), lambda: FixedGamma(3),
                                         lambda: FixedGamma(8), Heuristic,
                                         lambda: ConfidenceStop(0.4)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_replay_reproduces_live_greedy_decoding(tiny_pair, make_policy, prompt):
    draft, target = tiny_pair
    tr = trace_prompt(draft, target, prompt, max_new_tokens=30, eos=2, pad=0)
    rows = trace_rows(tr, IDENT, COSTS)
    live = SpeculativeDecoder(draft, target, make_policy(), compression="fp16",
                              eos_token_ids=[2]).generate(prompt, max_new_tokens=30)
    assert live.token_ids == tr.answer.tolist(), "greedy speculative output must be lossless"

    expected = _replay_steps(rows, make_policy())
    got = [(s["position"], s["drafted"] or 0, s["accept_len"]) for s in live.steps]
    assert got == expected

    # the replay engine of `speckv evaluate` agrees on the totals
    totals = replay(prepare(rows), make_policy())
    assert int(totals.steps[0]) == len(live.steps)
    assert int(totals.accepted[0]) == sum(a for _, _, a in got)
    assert int(totals.drafted[0]) == sum(d for _, d, _ in got)

    # live decision-time features equal the trace's at every visited position
    for step in live.steps:
        if not step["drafted"]:
            continue
        row = rows.iloc[step["position"]]
        for col in ("draft_entropy", "draft_top1", "draft_margin", "target_top1_prev",
                    "agree_ema", "agree_run"):
            assert step[col] == pytest.approx(float(row[col]), abs=1e-4), (col, step["position"])
