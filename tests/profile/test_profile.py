"""Trace profiling must reproduce what brute-force drafting at every position would see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speckv.profile.profiler import agreement_runs, parse_shard, trace_prompt, trace_rows
from speckv.records import validate
from speckv.runtime.features import GAMMA_MAX, token_stats


def _brute_force(draft, prefix: list[int], answer: list[int], i: int, cap: int):
    """Draft greedily from the true prefix y[:i], one full forward per token (no cache)."""
    ctx = list(prefix) + answer[:i]
    accepted, still, ent, top1 = 0, True, [], []
    for k in range(cap):
        with torch.no_grad():
            logits = draft(input_ids=torch.tensor([ctx])).logits[0, -1].float().numpy()
        e, t, _ = token_stats(logits)
        ent.append(e)
        top1.append(t)
        tok = int(logits.argmax())
        if still and i + k < len(answer) and tok == answer[i + k]:
            accepted += 1
        else:
            still = False
        ctx.append(tok)
    return accepted, np.array(ent), np.array(top1)


def test_agreement_runs_counts_consecutive_agreements():
    runs = agreement_runs(np.array([1, 1, 0, 1, 1, 1, 0], bool))
    assert runs.tolist() == [2, 1, 0, 3, 2, 1, 0]


@pytest.mark.parametrize("prompt, eos, ends_with_eos", [
    ([1, 5, 17, 33, 8], None, False),  # the answer runs to max_new_tokens
    ([1, 3, 40], 2, True),  # the answer ends with EOS (token 2) after 12 tokens
])
def test_trace_matches_brute_force_drafting(tiny_pair, prompt, eos, ends_with_eos):
    draft, target = tiny_pair
    budget = 24
    tr = trace_prompt(draft, target, prompt, max_new_tokens=budget, eos=eos, pad=0)
    n = len(tr.answer)
    assert (n < budget) == ends_with_eos
    assert 0 < tr.agree.mean() < 1 or n < 5, "the fixture should give a mix of agreements"
    answer = tr.answer.tolist()
    for i in range(n):
        kmax = min(GAMMA_MAX, budget - i - 1)  # what a live step may draft here
        cap = int(tr.accept_cap[i])
        assert cap == min(kmax, n - i)
        acc, ent, top1 = _brute_force(draft, prompt, answer, i, kmax)
        assert tr.accept_len[i] == min(acc, cap), f"position {i}"
        np.testing.assert_allclose(tr.top1_k[i, :kmax], top1, atol=2e-5)
        np.testing.assert_allclose(tr.ent_k[i, :kmax], ent, atol=2e-4)
        assert np.isnan(tr.top1_k[i, kmax:]).all()


def test_trace_rows_validate_against_schema(tiny_pair):
    draft, target = tiny_pair
    tr = trace_prompt(draft, target, [1, 9, 4], max_new_tokens=12, eos=None, pad=0)
    ident = {"run_id": "r", "draft_model": "d", "target_model": "t", "compression": "fp16",
             "compute_dtype": "float32", "task": "chat", "prompt_id": "p0"}
    costs = {"cost_draft_s": 0.01, "cost_verify_s": [0.03 + 0.001 * g for g in range(9)]}
    df = trace_rows(tr, ident, costs)
    validate(df)
    assert len(df) == 12 and (df["position"] == np.arange(12)).all()
    # history features are computed before each position: the first sees the prior
    assert df["agree_run"].iloc[0] == 0 and df["agree_ema"].iloc[0] == pytest.approx(0.5)


def test_parse_shard(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard("auto") == (2, 3)
    with pytest.raises(Exception, match="i/n"):
        parse_shard("x")
    with pytest.raises(Exception, match="0 <= i < n"):
        parse_shard("4/4")
