"""The exact paired sign-flip test and the paired difference that matches a pooled ratio."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import numpy as np
import pytest

from speckv.evaluate.statistics import (
    MAX_EXACT,
    MIN_DRAWS,
    ratio_of_sums_differences,
    sign_flip_test,
)


def brute_force_p(d: np.ndarray) -> float:
    """Share of all 2^n sign patterns whose sum is at least the observed one (loops)."""
    d = np.asarray(d, float)
    observed = d.sum()
    hits = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(d)):
        hits += float(np.dot(signs, d)) >= observed - 1e-9 * np.abs(d).sum()
    return hits / 2 ** len(d)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_enumeration_matches_brute_force_on_continuous_differences(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        d = rng.normal(0.3, 1.0, n)
        result = sign_flip_test(d)
        assert result.exact
        assert result.p == pytest.approx(brute_force_p(d), abs=1e-15)


def test_enumeration_matches_brute_force_with_ties_and_zeros():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, 10))
        d = rng.integers(-3, 4, n).astype(float)  # small integers: many sums tie exactly
        assert sign_flip_test(d).p == pytest.approx(brute_force_p(d), abs=1e-15), d


def test_ties_count_despite_rounding():
    # 0.1 + 0.2 != 0.3 in floating point: the flipped sum equal to the observed one in exact
    # arithmetic must still count as "as extreme"
    d = np.array([0.1, 0.2, -0.3, 0.3])
    assert sign_flip_test(d).p == pytest.approx(brute_force_p([1, 2, -3, 3]), abs=1e-15)


@pytest.mark.parametrize("n", [1, 4, 10, 16])
def test_all_positive_differences_give_the_smallest_p(n):
    d = np.random.default_rng(n).uniform(0.1, 2.0, n)
    result = sign_flip_test(d)
    assert result.p == pytest.approx(1 / 2**n)
    assert result.resolution == pytest.approx(1 / 2**n)
    assert result.method == f"exact sign-flip, 2^{n} patterns"
    assert result.n_prompts == n
    assert sign_flip_test(-d).p == 1.0  # H1 is one-sided: all worse is no evidence at all


def test_symmetric_differences_give_about_one_half():
    # pairs x, -x: the observed sum is 0, and a flipped sum is 0 only when each pair keeps
    # or flips together (2^k of 2^2k patterns), so p = 1/2 + 2^-(k+1) exactly
    x = np.random.default_rng(3).uniform(0.5, 3.0, 5)
    result = sign_flip_test(np.r_[x, -x])
    assert result.p == pytest.approx(0.5 + 2.0 ** -6)


def test_zero_differences_leave_p_unchanged_and_all_zero_gives_one():
    d = np.array([1.5, 0.7, -0.2, 2.0])
    assert sign_flip_test(np.r_[d, 0.0, 0.0]).p == pytest.approx(sign_flip_test(d).p)
    assert sign_flip_test(np.zeros(6)).p == 1.0


def test_p_ignores_order_and_positive_scale():
    d = np.random.default_rng(5).normal(0.4, 1.0, 12)
    p = sign_flip_test(d).p
    assert sign_flip_test(d[::-1]).p == pytest.approx(p)
    assert sign_flip_test(d * 1e-3).p == pytest.approx(p)
    assert sign_flip_test(d * 7.0).p == pytest.approx(p)


def test_exact_test_is_valid_under_the_null():
    # symmetric differences (H0 true): P(p <= alpha) <= alpha for an exact test
    rng = np.random.default_rng(11)
    ps = np.array([sign_flip_test(rng.normal(0, 1, 10) * rng.uniform(0.5, 2, 10)).p
                   for _ in range(2000)])
    for alpha in (0.01, 0.05, 0.2):
        assert (ps <= alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / len(ps))
    assert 0.45 < ps.mean() < 0.56


def test_exact_test_has_power_against_a_consistent_gain():
    rng = np.random.default_rng(12)
    ps = [sign_flip_test(rng.normal(1.0, 1.0, 12)).p for _ in range(200)]
    assert np.mean(np.array(ps) < 0.05) > 0.8


def test_monte_carlo_above_the_enumeration_limit():
    d = np.random.default_rng(2).normal(0.2, 1.0, MAX_EXACT + 1)
    result = sign_flip_test(d, seed=3)
    assert not result.exact
    assert result.draws == MIN_DRAWS
    assert result.resolution == pytest.approx(1 / (MIN_DRAWS + 1))
    assert "Monte Carlo" in result.method and str(MIN_DRAWS) in result.method
    assert result.p >= result.resolution
    assert sign_flip_test(d, seed=3) == result  # seeded: reproducible
    assert sign_flip_test(d, seed=4).p != result.p
    entry = result.as_dict()
    assert {"p", "method", "resolution", "n_prompts", "draws", "seed",
            "mc_standard_error"} <= set(entry)
    assert set(sign_flip_test(d[:5]).as_dict()).isdisjoint({"draws", "seed"})


def test_monte_carlo_agrees_with_enumeration_within_its_error():
    rng = np.random.default_rng(9)
    for n in (6, 12, 16):
        d = rng.normal(0.35, 1.0, n)
        exact = sign_flip_test(d)
        mc = sign_flip_test(d, max_exact=0, seed=n)  # force Monte Carlo on the same data
        assert not mc.exact
        err = np.sqrt(exact.p * (1 - exact.p) / mc.draws)
        assert abs(mc.p - exact.p) <= 4 * err + 2 / (mc.draws + 1), (n, exact.p, mc.p)
        assert mc.mc_standard_error == pytest.approx(err, rel=0.1, abs=1e-5)


def test_monte_carlo_floor_is_one_over_draws_plus_one():
    d = np.full(40, 0.5)  # all positive: no random pattern reaches the observed sum
    result = sign_flip_test(d, draws=MIN_DRAWS + 17)
    assert result.p == pytest.approx(1 / (MIN_DRAWS + 18))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        sign_flip_test([])
    with pytest.raises(ValueError, match="finite"):
        sign_flip_test([1.0, np.nan])
    with pytest.raises(ValueError, match="draws"):
        sign_flip_test(np.ones(20), draws=1000)


def test_enumerating_two_to_the_sixteen_patterns_is_fast():
    d = np.random.default_rng(0).normal(0.1, 1.0, 16)
    sign_flip_test(d)  # warm up
    started = time.perf_counter()
    for _ in range(10):
        sign_flip_test(d)
    assert (time.perf_counter() - started) / 10 < 0.1  # a few ms when idle


def test_ratio_of_sums_differences_have_the_sign_of_the_pooled_ratio():
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        tokens = rng.integers(10, 200, n).astype(float)
        time_a = tokens / rng.uniform(10, 30, n)
        time_b = tokens / rng.uniform(10, 30, n)
        d = ratio_of_sums_differences(tokens, time_a, tokens, time_b)
        np.testing.assert_allclose(d, time_b - time_a)
        a_better = tokens.sum() / time_a.sum() > tokens.sum() / time_b.sum()
        assert (d.sum() > 0) == a_better
        assert (sign_flip_test(d).statistic > 0) == a_better


def test_ratio_of_sums_differences_need_equal_numerators():
    with pytest.raises(ValueError, match="numerators"):
        ratio_of_sums_differences([10, 20], [1, 2], [10, 21], [1, 2])
    with pytest.raises(ValueError, match="shape"):
        ratio_of_sums_differences([10, 20], [1, 2], [10, 20], [1, 2, 3])


def test_statistics_module_imports_numpy_only():
    code = ("import sys, speckv.evaluate.statistics; bad = {'torch', 'pandas', 'scipy'} & "
            "set(sys.modules); sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
