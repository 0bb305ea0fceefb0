"""Batched trace profiling gives the traces of one-prompt profiling (tiny float64/float32 models).

The reference is :func:`speckv.profile.trace.trace_prompt`: the target's answer by Hugging
Face ``generate`` one sequence at a time, every continuation re-encoded from scratch. It is
itself checked against brute-force drafting (``test_profile.py``) and against the live
decoder step by step (``test_replay_live.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import noisy_copy, tiny_llama

from speckv.profile import batched
from speckv.profile.batched import greedy_answers, supports_4d_masks, trace_batch
from speckv.profile.trace import _target_answer, trace_prompt, trace_rows

FIELDS = ("answer", "target_top1", "stats", "agree", "accept_len", "accept_cap", "ent_k",
          "top1_k")
IDENT = {"run_id": "r", "draft_model": "d", "target_model": "t", "compression": "fp16",
         "compute_dtype": "float64", "task": "chat", "prompt_id": "p"}
COSTS = {"cost_draft_s": 0.01, "cost_verify_s": [0.03] * 9}


def _pair(dtype):
    target = tiny_llama(2, seed=0, dtype=dtype)
    return noisy_copy(target, 0.05, seed=1), target


@pytest.fixture(scope="module")
def pair64():
    return _pair(torch.float64)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 1 to 14 tokens (lengths differ, so batches are left-padded)."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, 128, int(rng.integers(0, 14))).tolist()] for _ in range(n)]


def _eos_for(target, prompts, budget):
    """A token that ends some answers early and not others (so rows leave the batch)."""
    answers = [_target_answer(target, p, budget, None)[0] for p in prompts]
    counts = np.bincount(np.concatenate([a[2:] for a in answers]), minlength=128)
    for tok in np.argsort(-counts):
        ended = sum(int(tok) in a.tolist() for a in answers)
        if 0 < ended < len(prompts):
            return int(tok)
    raise AssertionError("no token ends some answers but not all")


def _same(a, b, where=""):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape, (where, f)
        np.testing.assert_array_equal(x, y, err_msg=f"{where} {f}")
    assert a.max_new_tokens == b.max_new_tokens


@pytest.mark.parametrize(("dtype", "prefill_tokens"), [(torch.float64, 1024),
                                                       (torch.float64, 20), (torch.float32, 20)])
def test_batched_greedy_answers_equal_one_sequence_decoding(dtype, prefill_tokens, monkeypatch):
    """Prompts are encoded packed (several per row, ``prefill_tokens`` a row), answers decoded
    as a batch; each equals Hugging Face ``generate`` on the prompt alone."""
    monkeypatch.setattr(batched, "PREFILL_TOKENS", prefill_tokens)
    _, target = _pair(dtype)
    prompts = _prompts(10, seed=3)
    eos = _eos_for(target, prompts, 24)
    budgets = [24, 5, 24, 17, 1, 24, 24, 9, 24, 24]
    got = greedy_answers(target, prompts, budgets, {eos}, pad=0)
    ends = 0
    for p, m, (answer, top1) in zip(prompts, budgets, got, strict=True):
        ref_answer, ref_top1 = _target_answer(target, p, m, eos)  # HF generate, one sequence
        np.testing.assert_array_equal(answer, ref_answer)
        alone_answer, alone_top1 = greedy_answers(target, [p], m, eos, pad=0)[0]
        np.testing.assert_array_equal(answer, alone_answer)
        if dtype == torch.float64:
            np.testing.assert_array_equal(top1, ref_top1)
            np.testing.assert_array_equal(top1, alone_top1)
        else:  # float32: a row's logits move by a few ulps with the batch's shape, and the
            # top-1 probability by up to ~2e-5 relative on some CPUs' kernels (a CI machine)
            np.testing.assert_allclose(top1, ref_top1, rtol=1e-4)
        assert len(answer) == m or answer[-1] == eos
        ends += len(answer) < m
    assert ends >= 2, "some answers should end with EOS before their budget"


@pytest.mark.parametrize(("target_batch", "draft_batch", "branch_masks"),
                         [(16, 16, True), (4, 3, True), (5, 2, False), (1, 1, True)])
def test_batched_traces_equal_one_prompt_traces_in_float64(pair64, target_batch, draft_batch,
                                                           branch_masks):
    draft, target = pair64
    prompts = _prompts(11, seed=1)
    eos = _eos_for(target, prompts, 30)
    ref = [trace_prompt(draft, target, p, 30, eos, pad=0) for p in prompts]
    got = trace_batch(draft, target, prompts, 30, eos, pad=0, target_batch=target_batch,
                      draft_batch=draft_batch, branch_masks=branch_masks)
    assert any(len(r.answer) < 30 for r in ref) and any(len(r.answer) == 30 for r in ref)
    assert any(np.isfinite(r.top1_k[:, 1:]).any() for r in ref), "continuations are compared"
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        _same(r, g, f"prompt {i}")
        pd.testing.assert_frame_equal(trace_rows(r, IDENT, COSTS), trace_rows(g, IDENT, COSTS))


def test_batched_traces_in_float32_differ_from_one_prompt_traces_by_ulps_only(tiny_pair):
    draft, target = tiny_pair
    prompts = _prompts(8, seed=2)
    ref = [trace_prompt(draft, target, p, 20, None, pad=0) for p in prompts]
    got = trace_batch(draft, target, prompts, 20, None, pad=0, target_batch=8, draft_batch=4)
    for r, g in zip(ref, got, strict=True):
        for f in ("answer", "agree", "accept_len", "accept_cap"):
            np.testing.assert_array_equal(getattr(r, f), getattr(g, f))
        for f in ("target_top1", "stats", "ent_k", "top1_k"):
            np.testing.assert_allclose(getattr(g, f), getattr(r, f), rtol=1e-5, atol=1e-5)


def test_per_prompt_budgets_and_the_tail_past_eos(pair64):
    """A row's own budget caps its answer and its accept caps; an answer that the draft
    follows to its EOS needs the continuation past the answer (the tail)."""
    draft, target = pair64
    prompts = _prompts(6, seed=4)
    eos = _eos_for(target, prompts, 30)
    budgets = [30, 7, 30, 2, 12, 30]
    got = trace_batch(draft, target, prompts, budgets, eos, pad=0, target_batch=6)
    for p, m, g in zip(prompts, budgets, got, strict=True):
        _same(trace_prompt(draft, target, p, m, eos, pad=0), g)
        assert g.max_new_tokens == m and len(g.answer) <= m
    # a draft equal to the target agrees everywhere, so every EOS-ended answer needs a tail
    same = trace_batch(target, target, prompts, 30, eos, pad=0, target_batch=6)
    for p, g in zip(prompts, same, strict=True):
        assert g.agree.all()
        _same(trace_prompt(target, target, p, 30, eos, pad=0), g)


def test_llama_packs_through_4d_masks_and_sliding_windows_do_not(pair64):
    draft, _ = pair64
    assert supports_4d_masks(draft)
    sliding = tiny_llama(1, seed=0)
    sliding.config.layer_types = ["sliding_attention"]
    assert not supports_4d_masks(sliding)


def test_models_without_4d_masks_take_the_one_row_path(pair64, monkeypatch):
    """A target and draft that cannot pack still give the one-prompt traces."""
    draft, target = pair64
    monkeypatch.setattr(batched, "supports_4d_masks", lambda model: False)
    prompts = _prompts(5, seed=5)
    got = trace_batch(draft, target, prompts, 16, None, pad=0, target_batch=5, draft_batch=2)
    for p, g in zip(prompts, got, strict=True):
        _same(trace_prompt(draft, target, p, 16, None, pad=0), g)
