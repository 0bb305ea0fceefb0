"""The catch-up table: measured sizes as measured, longer ones extrapolated, never cheaper."""

import numpy as np

from speckv.runtime.costs import StepCosts, catchup_table


def test_noisy_measurements_never_extrapolate_to_negative_seconds():
    # the last two sizes came out decreasing (timing noise): extrapolation stays flat
    table = catchup_table(0.001, [0.0010, 0.0016, 0.0012], size=40)
    assert table[:3].tolist() == [0.0010, 0.0016, 0.0012]
    assert (table > 0).all() and (table[3:] == 0.0012).all()
    costs = StepCosts(0.001, [0.01 * (1 + g / 10) for g in range(9)], [0.0010, 0.0016, 0.0012])
    assert (costs.drafting(40) > 0).all() and (costs.drafting(200) > 0).all()


def test_a_rising_measurement_extrapolates_linearly():
    table = catchup_table(0.001, [0.001, 0.002], size=5)
    np.testing.assert_allclose(table, [0.001, 0.002, 0.003, 0.004, 0.005])
