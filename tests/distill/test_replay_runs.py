"""What a draft's agreement allows: replay of static choices and the exact bound."""

from __future__ import annotations

import numpy as np
import pytest

from speckv.distill.evaluate import replay_runs
from speckv.profile.profiler import agreement_runs

VERIFY = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]  # seconds of a target forward of g+1


def test_perfect_agreement_prefers_the_longest_draft():
    runs = [agreement_runs(np.ones(45, bool))]  # 5 steps of 9 tokens at γ=8
    out = replay_runs(runs, budget=64, cost_draft_s=0.05, cost_verify_s=VERIFY)
    assert out["best_static_choice"] == "fixed:8"
    assert out["plain"] == pytest.approx(45 / 45.0)
    assert out["upper_bound"] >= out["best_static"] - 1e-12


def test_no_agreement_makes_plain_decoding_best_and_the_bound_equal_to_it():
    runs = [agreement_runs(np.zeros(30, bool)), agreement_runs(np.zeros(12, bool))]
    out = replay_runs(runs, budget=64, cost_draft_s=0.2, cost_verify_s=VERIFY)
    assert out["best_static_choice"] == "plain"
    assert out["upper_bound"] == pytest.approx(out["plain"])


def test_a_fixed_gamma_is_replayed_as_the_decoder_runs_it():
    # agreements T T F T | 5 tokens, budget 5: fixed:2 -> step at 0 accepts 2 (+1) -> p=3;
    # at 3: max_gamma = min(8, 5-3-1) = 1, accepts 1 (+1) -> p=5
    agree = np.array([True, True, False, True, True])
    out = replay_runs([agreement_runs(agree)], budget=5, cost_draft_s=0.1,
                      cost_verify_s=VERIFY)
    seconds = (2 * 0.1 + VERIFY[2]) + (1 * 0.1 + VERIFY[1])
    assert out["fixed:2"] == pytest.approx(5 / seconds)


def test_the_bound_is_never_below_any_static_choice():
    rng = np.random.default_rng(0)
    runs = [agreement_runs(rng.random(int(rng.integers(5, 50))) < 0.6) for _ in range(8)]
    out = replay_runs(runs, budget=64, cost_draft_s=0.15, cost_verify_s=VERIFY)
    statics = [out["plain"], *(out[f"fixed:{g}"] for g in range(1, 9))]
    assert out["best_static"] == pytest.approx(max(statics))
    assert out["upper_bound"] >= max(statics) - 1e-12
