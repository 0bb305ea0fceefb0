"""The feature-conditioned draft: its cached forward, its unrolled forward and its files agree.

The decoder drafts with the cached forward (catch-up over verified tokens, then one drafted
token at a time reading its own state); training and the trace profiler use the unrolled
forward. Both must compute the same thing, position by position, or a trace would score
chains the decoder never drafts.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_feature_draft, tiny_llama

from speckv.decode.costs import lm_forward, new_cache
from speckv.llm.feature_draft import (
    FeatureDraftConfig,
    TargetStates,
    build_feature_draft,
    load_feature_draft,
    save_feature_draft,
)


@pytest.fixture(scope="module")
def pair64():
    target = tiny_llama(2, seed=3, dtype=torch.float64)
    draft = tiny_feature_draft(target.float(), steps=60).double()
    target = target.double()
    return draft, target


def _states(target, ids):
    with torch.no_grad():
        return target.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_cached_forward_equals_the_teacher_forced_one(pair64):
    draft, target = pair64
    ids = [1, 9, 44, 17, 3, 80, 21, 5, 66, 12]
    f = _states(target, ids)
    states = TargetStates(draft.cfg.hidden_size, torch.float64)
    states.write(0, f)
    states.valid = len(ids)
    cache = new_cache(draft)
    cache.states = states
    rows = [lm_forward(draft, ids[a:b], cache, keep=b - a) for a, b in ((0, 4), (4, 5), (5, 10))]
    cached = torch.cat(rows)
    inputs = torch.zeros(1, len(ids), draft.cfg.hidden_size, dtype=torch.float64)
    inputs[0, 1:] = f[:-1]
    g, _ = draft.features(torch.tensor([ids]), inputs, torch.arange(len(ids))[None])
    full = draft.lm_head(g)[0]
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-9)


def test_drafting_from_own_states_equals_the_unrolled_chain(pair64):
    draft, target = pair64
    ids = [1, 33, 7, 90, 12, 4, 58]
    f = _states(target, ids)
    inputs = torch.zeros(1, len(ids), draft.cfg.hidden_size, dtype=torch.float64)
    inputs[0, 1:] = f[:-1]
    outs = draft.unroll(torch.tensor([ids]), inputs, torch.arange(len(ids))[None], depth=5)
    for origin in (2, 4, 6):
        states = TargetStates(draft.cfg.hidden_size, torch.float64)
        states.write(0, f[:origin])
        states.valid = origin  # the target has run up to the token at ``origin - 1``
        cache = new_cache(draft)
        cache.states = states
        logits = lm_forward(draft, ids[: origin + 1], cache)[0]
        for d in range(1, 6):
            want = draft.lm_head(outs[d - 1][0, origin])
            torch.testing.assert_close(logits, want, rtol=1e-9, atol=1e-9)
            token = int(logits.argmax())
            logits = lm_forward(draft, [token], cache)[0]  # reads its own last state


def test_a_drafted_token_cannot_read_a_state_nobody_computed(pair64):
    draft, target = pair64
    states = TargetStates(draft.cfg.hidden_size, torch.float64)
    states.write(0, _states(target, [1, 5, 9]))
    states.valid = 3
    cache = new_cache(draft)
    cache.states = states
    with pytest.raises(ValueError, match="no target state"):
        lm_forward(draft, [1, 5, 9, 4, 4, 4], cache)


def test_save_and_load_keep_the_draft_and_store_nothing_of_the_target(tmp_path):
    target = tiny_llama(2, seed=5, dtype=torch.float32)
    cfg = FeatureDraftConfig.from_target("tiny", target.config, draft_vocab=64)
    weights = {k: v.float() for k, v in target.state_dict().items()}
    draft = build_feature_draft(cfg, weights, torch.arange(64) * 2)
    with torch.no_grad():  # trained-looking weights, already bf16-exact (files store bf16)
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
                p.copy_(p.to(torch.bfloat16).float())
    save_feature_draft(draft, tmp_path / "d", {"note": "test"})
    meta = json.loads((tmp_path / "d" / "speckv_draft.json").read_text())
    assert meta["kind"] == "feature" and meta["draft_vocab"] == 64
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "d" / "draft.safetensors"))
    assert not any(k.startswith("embed_tokens") or k == "lm_head.weight" for k in stored)
    loaded = load_feature_draft(tmp_path / "d", weights, dtype=torch.float32)
    ids = torch.tensor([[1, 7, 30, 2, 99]])
    inputs = torch.randn(1, 5, cfg.hidden_size)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        want = draft.lm_head(draft.features(ids, inputs, pos)[0])
        got = loaded.lm_head(loaded.features(ids, inputs, pos)[0])
    torch.testing.assert_close(got, want)
    # a token outside the reduced head is never proposed
    assert set(got.argmax(-1).flatten().tolist()) <= set((torch.arange(64) * 2).tolist())
