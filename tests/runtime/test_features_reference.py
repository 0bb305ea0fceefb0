"""An independent check of the feature vector against the README's feature table.

The reference below is written from the table alone, in plain Python and ``math`` (no numpy,
nothing from speckv.runtime.features but the names under test), so a change of the formulas
in speckv.runtime.features (THE feature definition) that the README does not describe fails
here:

| # | name | how to compute it |
|---|---|---|
| 0 | draft_entropy | entropy (nats) of the draft's softmax for the first proposal token |
| 1 | draft_top1 | its largest probability |
| 2 | draft_margin | largest minus second-largest probability |
| 3 | target_top1_prev | the target's probability of the last token it emitted (1.0 at the start) |
| 4 | agree_ema | ema <- 0.75*ema + 0.25*agreed over past positions, from 0.5 |
| 5 | agree_run | consecutive agreements before this position, capped at 16, divided by 16 |
| 6 | log_position | log(1 + tokens generated so far) |
| 7-9 | compression_fp16/int8/nf4 | one-hot of the target's compression |
"""

from __future__ import annotations

import math
import random
from itertools import groupby

import numpy as np
import pytest

from speckv.runtime.features import (
    FEATURE_NAMES,
    History,
    assemble,
    history_arrays,
    step_features,
    token_stats,
)

README_NAMES = ("draft_entropy", "draft_top1", "draft_margin", "target_top1_prev", "agree_ema",
                "agree_run", "log_position", "compression_fp16", "compression_int8",
                "compression_nf4")
LEVELS = ("fp16", "int8", "nf4")


def reference_stats(logits: list[float]) -> tuple[float, float, float]:
    """Entropy in nats, top-1 probability and top-1 minus top-2 probability of softmax."""
    m = max(logits)
    weights = [math.exp(x - m) for x in logits]
    total = math.fsum(weights)
    probs = [w / total for w in weights]
    entropy = -math.fsum(p * math.log(p) for p in probs if p > 0)
    ordered = sorted(probs, reverse=True)
    second = ordered[1] if len(ordered) > 1 else 0.0
    return entropy, ordered[0], ordered[0] - second


class ReferenceHistory:
    """The table's history columns, position by position."""

    def __init__(self) -> None:
        self.ema, self.run, self.prev, self.generated = 0.5, 0, 1.0, 0

    def columns(self) -> list[float]:
        return [self.prev, self.ema, min(self.run, 16) / 16, math.log(1 + self.generated)]

    def settle(self, agreed: bool, target_top1: float) -> None:
        self.ema = 0.75 * self.ema + 0.25 * (1.0 if agreed else 0.0)
        self.run = self.run + 1 if agreed else 0
        self.prev = target_top1
        self.generated += 1


def reference_vector(logits: list[float], history: ReferenceHistory,
                     compression: str) -> list[float]:
    return [*reference_stats(logits), *history.columns(),
            *(1.0 if compression == c else 0.0 for c in LEVELS)]


def random_logits(rng: random.Random, vocab: int) -> list[float]:
    scale = rng.choice((0.05, 1.0, 4.0, 15.0))  # flat to nearly one-hot
    return [rng.gauss(0.0, scale) for _ in range(vocab)]


def close(got, want, what: str) -> None:
    # float32 features against a float64 reference
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-6,
                               err_msg=what)


def test_the_feature_order_is_the_readmes():
    assert tuple(FEATURE_NAMES) == README_NAMES


@pytest.mark.parametrize("compression", LEVELS)
def test_step_features_follow_the_table_along_a_sequence(compression):
    """A walk through 60 positions with a long run of agreements (past the cap of 16)."""
    rng = random.Random(LEVELS.index(compression))
    live, ref = History(), ReferenceHistory()
    agreed_seq = [rng.random() < 0.5 for _ in range(15)] + [True] * 25 + \
        [rng.random() < 0.5 for _ in range(20)]
    for pos, agreed in enumerate(agreed_seq):
        logits = random_logits(rng, rng.choice((2, 3, 50, 1000)))
        got = step_features(np.asarray(logits, np.float32), live, compression)
        assert got.dtype == np.float32 and got.shape == (len(README_NAMES),)
        close(got, reference_vector(logits, ref, compression), f"position {pos}")
        target_top1 = rng.uniform(0.05, 1.0)
        live.settle(agreed, target_top1)
        ref.settle(agreed, target_top1)
    assert max(len(list(g)) for k, g in groupby(agreed_seq) if k) > 16  # the cap was hit


def test_start_of_a_sequence():
    """Before any token: target_top1_prev 1.0, ema 0.5, run 0, log(1 + 0) = 0."""
    got = step_features(np.zeros(7, np.float32), History(), "int8")
    close(got, [math.log(7), 1 / 7, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0], "start")


def test_token_stats_on_random_rows_and_ties():
    rng = random.Random(7)
    rows = [random_logits(rng, 300) for _ in range(40)]
    got = token_stats(np.asarray(rows, np.float32))
    assert got.shape == (40, 3)
    for i, row in enumerate(rows):
        close(got[i], reference_stats(row), f"row {i}")
    tie = [2.0, 2.0, -1.0, 0.5]
    close(token_stats(np.asarray([tie], np.float32))[0], reference_stats(tie), "tie")
    assert reference_stats(tie)[2] == 0.0


def test_batched_assembly_and_history_arrays_follow_the_table():
    """The trace path (history_arrays + assemble) gives the same vectors as the table."""
    rng = random.Random(11)
    n = 50
    agree = [rng.random() < 0.7 for _ in range(n)]
    target_top1 = [rng.uniform(0.1, 1.0) for _ in range(n)]
    logits = [random_logits(rng, 64) for _ in range(n)]
    ema, run, prev = history_arrays(np.asarray(agree), np.asarray(target_top1, np.float32))
    got = assemble(token_stats(np.asarray(logits, np.float32)), prev, ema, run,
                   np.arange(n), "nf4")
    ref = ReferenceHistory()
    for j in range(n):
        close(got[j], reference_vector(logits[j], ref, "nf4"), f"trace position {j}")
        ref.settle(agree[j], float(np.float32(target_top1[j])))


def test_an_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        step_features(np.zeros(3, np.float32), History(), "fp8")
