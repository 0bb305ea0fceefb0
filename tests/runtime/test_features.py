"""The one feature definition and the cost formula (numpy only, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speckv.runtime.costs import (
    CATCHUP_MAX,
    StepCosts,
    catchup_seconds,
    catchup_table,
    catchup_vector,
    drafting_costs,
    step_costs,
)
from speckv.runtime.features import (
    GAMMA_MAX,
    MAX_UNSETTLED,
    PRE_FEATURE_NAMES,
    UNSETTLED_CAP,
    History,
    RowStats,
    assemble,
    history_arrays,
    pre_features,
    pre_from_step_features,
    step_features,
    token_stats,
)


def _reference_stats(x: np.ndarray) -> np.ndarray:
    """Softmax, sort and sum in float64: what the statistics mean."""
    x = np.asarray(x, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, -1)[..., ::-1]
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    second = top[..., 1] if x.shape[-1] > 1 else np.zeros(x.shape[:-1])
    return np.stack([entropy, top[..., 0], top[..., 0] - second], -1)


@pytest.mark.parametrize("vocab", [1, 2, 7, 1000, 49_152])
@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 60.0])
def test_token_stats_and_row_stats_compute_the_same_statistics(vocab, scale):
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((4, vocab)) * scale + rng.uniform(-50, 50, (4, 1))).astype(np.float32)
    want = _reference_stats(x)
    got = token_stats(x)
    assert got.dtype == np.float32 and got.shape == (4, 3)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    row = RowStats()
    for i in range(4):
        argmax, *stats = row.with_argmax(x[i])
        assert argmax == int(x[i].argmax())
        np.testing.assert_allclose(stats, got[i], atol=1e-5, rtol=1e-5)


def test_ties_at_the_top_give_a_zero_margin_and_log_two_entropy():
    x = np.array([5.0, 5.0, -1e4], np.float32)
    entropy, top1, margin = RowStats()(x)
    assert top1 == pytest.approx(0.5) and margin == pytest.approx(0.0, abs=1e-7)
    assert entropy == pytest.approx(math.log(2), abs=1e-6)


def test_nan_logits_give_nan_statistics():
    x = np.ones(10, np.float32)
    x[4] = np.nan
    assert all(math.isnan(v) for v in RowStats()(x))
    assert np.isnan(token_stats(x[None])).all()


def test_history_defers_tokens_until_the_draft_has_scored_them():
    h = History()
    h.settle(True, 0.9)
    h.defer(0.7)
    h.defer(0.6)
    assert (h.unsettled, h.produced, h.position, h.last_top1) == (2, 3, 1, 0.6)
    with pytest.raises(ValueError, match="deferred"):
        h.settle(False, 0.5)
    with pytest.raises(ValueError, match="2 token"):
        h.settle_deferred([True])
    h.settle_deferred([False, True])
    assert (h.unsettled, h.position, h.run, h.target_top1_prev) == (0, 3, 1, 0.6)
    # the same as settling them in order at once
    ref = History()
    for agreed, top1 in ((True, 0.9), (False, 0.7), (True, 0.6)):
        ref.settle(agreed, top1)
    assert (h.ema, h.run, h.position, h.target_top1_prev) == (ref.ema, ref.run, ref.position,
                                                             ref.target_top1_prev)


def test_step_features_refuse_a_history_with_deferred_tokens():
    h = History()
    h.defer(0.5)
    with pytest.raises(ValueError, match="deferred"):
        step_features(np.zeros(5), h, "fp16")


def test_pre_features_from_a_trace_equal_a_live_history_in_any_state():
    """The pre-draft vector replay builds from trace rows equals the decoder's, whatever the
    policy skipped: the settled part is the trace's history u positions back."""
    rng = np.random.default_rng(0)
    n = 120
    agree = rng.random(n) < 0.55
    top1 = rng.uniform(0.1, 1.0, n).astype(np.float32)
    ema, run, prev = history_arrays(agree, top1)
    stats = np.zeros((n, 3), np.float32)
    for compression in ("fp16", "nf4"):
        steps = assemble(stats, prev, ema, run, np.arange(n), compression)
        live = History()
        p = 0
        checked = set()
        while p < n:
            u = live.unsettled
            got = pre_features(live, compression)
            want = pre_from_step_features(steps[p], steps[p - u], u)[0]
            np.testing.assert_array_equal(got, want)
            checked.add(min(u, 3))
            if rng.random() < 0.5 and u < MAX_UNSETTLED:  # a plain step: defer the token
                live.defer(float(top1[p]))
                p += 1
                continue
            live.settle_deferred(agree[p - u:p].tolist())  # the catch-up forward's verdicts
            np.testing.assert_array_equal(live.ema, np.float64(live.ema))
            assert np.float32(live.ema) == ema[p] and live.run == run[p]
            k = int(rng.integers(1, 4))  # a step settling k tokens, maybe deferring a bonus
            for j in range(p, min(p + k, n)):
                live.settle(bool(agree[j]), float(top1[j]))
            p = min(p + k, n)
            if p < n and rng.random() < 0.3:
                live.defer(float(top1[p]))
                p += 1
        assert checked == {0, 1, 2, 3}
    assert PRE_FEATURE_NAMES[3] == "unsettled" and UNSETTLED_CAP >= MAX_UNSETTLED - 1


def test_drafting_costs_are_the_v1_formula_without_a_catchup_measurement():
    verify = 0.05 + 0.004 * np.arange(GAMMA_MAX + 1)
    np.testing.assert_allclose(drafting_costs(0.01, verify), step_costs(0.01, verify))
    np.testing.assert_allclose(drafting_costs(0.01, verify, unseen=7), step_costs(0.01, verify))
    rows = drafting_costs(np.array([0.01, 0.02]), np.stack([verify, verify]), None,
                          np.array([1, 5]))
    np.testing.assert_allclose(rows, step_costs(np.array([0.01, 0.02]), np.stack([verify] * 2)))


def test_a_measured_catchup_prices_the_first_forward_and_extrapolates():
    verify = np.full(GAMMA_MAX + 1, 0.1)
    catchup = [0.010, 0.012, 0.015]
    table = catchup_table(0.01, catchup)
    assert table.shape == (CATCHUP_MAX,)
    np.testing.assert_allclose(table[:5], [0.010, 0.012, 0.015, 0.018, 0.021])
    assert catchup_seconds(table.tolist(), 40) == pytest.approx(
        table[-1] + (40 - CATCHUP_MAX) * 0.003)
    np.testing.assert_allclose(catchup_vector(table, 40), [catchup_seconds(table.tolist(), n)
                                                           for n in range(1, 41)])
    costs = drafting_costs(0.01, verify, catchup, unseen=3)
    np.testing.assert_allclose(costs, 0.015 + 0.01 * np.arange(GAMMA_MAX) + 0.1, rtol=1e-6)
    # a missing or broken measurement falls back to one draft token
    np.testing.assert_allclose(catchup_table(0.01, [np.nan, 0.2]), np.full(CATCHUP_MAX, 0.01))


def test_step_costs_object():
    costs = StepCosts(0.01, np.full(GAMMA_MAX + 1, 0.1), [0.010, 0.011])
    assert costs.plain == pytest.approx(0.1)
    np.testing.assert_allclose(costs.drafting(2), drafting_costs(0.01, np.full(9, 0.1),
                                                                 [0.010, 0.011], 2))
    np.testing.assert_allclose(costs.drafting(CATCHUP_MAX + 5),
                               drafting_costs(0.01, np.full(9, 0.1), [0.010, 0.011],
                                              CATCHUP_MAX + 5))
    with pytest.raises(ValueError, match="9 values"):
        StepCosts(0.01, [0.1] * 3)
    with pytest.raises(ValueError, match="finite seconds"):
        StepCosts(0.0, [0.1] * 9)


@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan"), 3.2])
def test_a_target_top1_that_is_not_a_probability_is_refused(bad):
    """A logit or log-probability passed by mistake would silently skew both vectors."""
    history = History()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        history.settle(True, bad)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        history.defer(bad)
    assert history.position == 0 and history.unsettled == 0  # nothing half-recorded
    history.settle(True, 1.0)
    history.defer(0.0)
    assert (history.target_top1_prev, history.last_top1) == (1.0, 0.0)
