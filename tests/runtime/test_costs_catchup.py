"""The catch-up table: measured sizes as measured, longer ones extrapolated, never cheaper."""

import numpy as np

from speckv.runtime.costs import (
    CATCHUP_MAX,
    StepCosts,
    catchup_seconds,
    catchup_table,
    catchup_vector,
    drafting_costs,
)
from speckv.runtime.features import GAMMA_MAX


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


def test_replay_and_the_controller_extrapolate_by_one_rule():
    """Past the measured sizes, replay's time accounting (catchup_seconds, catchup_vector)
    prices a catch-up as the controller's costs do (catchup_table): a decreasing last step
    extrapolates flat, not down, for a table of any length."""
    for measured in ([0.0010, 0.0016, 0.0012],                       # short: the table extends it
                     0.001 + 0.0004 * np.arange(CATCHUP_MAX) - 0.003 * (np.arange(CATCHUP_MAX)
                                                                       == CATCHUP_MAX - 1)):
        measured = np.asarray(measured, np.float64)
        table = catchup_table(0.001, measured)             # what replay keeps per row
        wide = catchup_table(0.001, measured, size=40)     # what drafting_costs prices
        assert measured[-1] < measured[-2] and (wide > 0).all()
        np.testing.assert_array_equal(catchup_vector(table, 40), wide)
        assert [catchup_seconds(table.tolist(), n) for n in range(1, 41)] == wide.tolist()
        verify = np.full(GAMMA_MAX + 1, 0.05)
        np.testing.assert_allclose(drafting_costs(0.001, verify, measured, unseen=35)[0],
                                   catchup_seconds(table, 35) + verify[1], rtol=1e-6)
