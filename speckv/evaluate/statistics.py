"""Exact paired sign-flip tests over prompts (numpy only).

The question "is policy A faster than policy B on these prompts?" is answered by a paired
permutation test whose unit is the prompt. Each prompt contributes one paired difference
``d_i`` (A better when positive). Under H0 the two policies are exchangeable within a prompt,
so each ``d_i`` is as likely to have the opposite sign: the null distribution of
``T = sum_i d_i`` is that of ``sum_i s_i d_i`` over sign patterns ``s in {-1, +1}^n``, and the
one-sided p-value of H1 "A better" is the share of patterns with ``T* >= T``, the observed
pattern included (so ``p >= 1/2^n``).

- ``n <= max_exact`` (16 by default): every one of the ``2^n`` patterns is enumerated; ``p``
  is exact and a multiple of ``resolution = 1/2^n``.
- larger ``n``: ``B`` random patterns (seeded; at least 100,000), ``p = (k + 1) / (B + 1)``
  with ``k`` the draws with ``T* >= T``: a valid p-value whose resolution is ``1/(B + 1)``
  and whose Monte Carlo standard error is about ``sqrt(p (1 - p) / B)``.

A difference of exactly zero changes no pattern's statistic; it is kept (it counts in ``n``
and in the resolution), which leaves ``p`` unchanged.

Which difference to pass is the caller's choice and should match the figure that is
reported: :func:`ratio_of_sums_differences` gives the one for a ratio-of-sums metric such as
pooled tokens per second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

#: enumerate every sign pattern up to this many prompts (2^16 = 65,536 patterns).
MAX_EXACT: Final = 16
#: the fewest Monte Carlo draws a reported p-value may rest on.
MIN_DRAWS: Final = 100_000
#: rows of sign patterns drawn at once (bounds memory at CHUNK x n values).
CHUNK: Final = 1 << 16
#: relative tolerance for "T* >= T": the same sum added in another order may differ in the
#: last bits, and a pattern equal to the observed one must count as "as extreme".
RTOL: Final = 1e-9


@dataclass(frozen=True)
class SignFlipResult:
    """One-sided sign-flip test of H1 "mean paired difference > 0"."""

    p: float
    method: str  # e.g. "exact sign-flip, 2^16 patterns"
    resolution: float  # the step between attainable p-values (the smallest one for exact)
    n_prompts: int
    statistic: float  # the observed sum of differences
    exact: bool
    draws: int | None = None  # Monte Carlo draws (None when enumerated)
    seed: int | None = None
    mc_standard_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; Monte Carlo-only fields are left out of an exact result."""
        out = asdict(self)
        if self.exact:
            for key in ("draws", "seed", "mc_standard_error"):
                out.pop(key)
        return out


def _subset_sums(d: np.ndarray) -> np.ndarray:
    """``[2^n]`` sums of every subset of ``d``: entry m sums the d_j whose bit j is set in m.

    Built by doubling (``sums <- [sums, sums + d_j]``), 2^n additions in all: for n = 16 a
    64k-value array, far cheaper than the ``[2^n, n]`` sign matrix.
    """
    sums = np.zeros(1, np.float64)
    for value in d:
        sums = np.concatenate([sums, sums + value])
    return sums


def sign_flip_test(differences: Any, *, max_exact: int = MAX_EXACT, draws: int = MIN_DRAWS,
                   seed: int = 0) -> SignFlipResult:
    """One-sided paired sign-flip test of H1 "the differences are positive on the whole".

    ``differences`` ``[n]``: one per unit (prompt), positive where the first policy is
    better. Enumerates all ``2^n`` sign patterns when ``n <= max_exact``, else draws
    ``draws`` (>= 100,000) random patterns with ``numpy.random.default_rng(seed)``.
    """
    d = np.asarray(differences, np.float64).reshape(-1)
    n = len(d)
    if n == 0:
        raise ValueError("sign_flip_test needs at least one paired difference.")
    if not np.isfinite(d).all():
        raise ValueError("sign_flip_test: every paired difference must be finite.")
    if draws < MIN_DRAWS:
        raise ValueError(f"sign_flip_test: Monte Carlo needs at least {MIN_DRAWS} draws, "
                         f"got {draws}.")
    observed = float(d.sum())
    tol = RTOL * float(np.abs(d).sum())
    if n <= max_exact:
        # flipping the signs of the subset m turns T into T - 2 * sum(d[m])
        flipped = observed - 2.0 * _subset_sums(d)
        count = int(np.count_nonzero(flipped >= observed - tol))
        total = 1 << n
        return SignFlipResult(p=count / total, method=f"exact sign-flip, 2^{n} patterns",
                              resolution=1.0 / total, n_prompts=n, statistic=observed,
                              exact=True)
    rng = np.random.default_rng(seed)
    rows = max(1, min(CHUNK, (1 << 22) // n))  # at most ~4M signs per chunk
    k = 0
    left = draws
    while left:
        m = min(rows, left)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(m, n), dtype=np.int8)
        k += int(np.count_nonzero(signs @ d >= observed - tol))
        left -= m
    p = (k + 1) / (draws + 1)
    return SignFlipResult(
        p=p, method=f"Monte Carlo sign-flip, {draws} random patterns (seed {seed})",
        resolution=1.0 / (draws + 1), n_prompts=n, statistic=observed, exact=False,
        draws=draws, seed=seed, mc_standard_error=float(np.sqrt(p * (1 - p) / draws)))


def ratio_of_sums_differences(num_a: Any, den_a: Any, num_b: Any, den_b: Any,
                              rtol: float = 1e-9) -> np.ndarray:
    """Per-unit differences whose sign-flip test matches the pooled ratio ``Σnum / Σden``.

    For a metric such as tokens per second pooled over prompts (``Σ tokens / Σ seconds``)
    where both policies produce the same numerator on every prompt (replay: every policy
    emits the same answer), "A's pooled ratio > B's" is exactly ``Σ_i (den_b_i - den_a_i) >
    0``: the seconds (or steps) A saves, summed over prompts. So ``d_i = den_b_i - den_a_i``,
    which weights each prompt as the pooled ratio does (by its time), and its sign-flip
    test's observed statistic is positive exactly when the reported ratio is above 1. A
    difference of per-prompt ratios would test the unweighted mean of per-prompt rates
    instead, a figure that is not reported and can disagree with the pooled one.

    Raises ``ValueError`` when the numerators differ, where no such per-unit form exists.
    """
    num_a, num_b = np.asarray(num_a, np.float64), np.asarray(num_b, np.float64)
    den_a, den_b = np.asarray(den_a, np.float64), np.asarray(den_b, np.float64)
    if num_a.shape != num_b.shape or den_a.shape != num_a.shape or den_b.shape != num_a.shape:
        raise ValueError("ratio_of_sums_differences: all four arrays need the same shape.")
    if not np.allclose(num_a, num_b, rtol=rtol, atol=0.0):
        raise ValueError("ratio_of_sums_differences: the numerators (tokens) differ between "
                         "the two policies on some unit; the paired difference of the "
                         "denominators only matches the pooled ratio when they are equal.")
    return den_b - den_a
