"""The cost of a step: the one formula every stage uses.

A step that drafts ``γ`` tokens runs one draft forward that catches the draft up on the
``n`` tokens it has not seen (and yields the first proposal), ``γ - 1`` one-token draft
forwards, and one target forward over ``γ + 1`` tokens::

    cost(γ | n) = t_catchup[n] + (γ - 1)·t_draft + t_verify[γ]

A plain step (no speculation) is one target forward over one token: ``t_verify[0]``.

``n`` is one after a step whose draft was rejected, two after a fully accepted step (the last
drafted token and the bonus token), and grows by one with every plain step in between: the
draft catches up on all of them in one batched forward. ``t_catchup[n]`` is measured
(:func:`speckv.decode.decoder.measure_catchup`); without a measurement it is taken as
``t_draft`` for every ``n``, which gives the v1 formula ``γ·t_draft + t_verify[γ]``
(:func:`step_costs`) and under-prices long catch-ups. Beyond the measured sizes it is
extrapolated linearly from the last two, never downwards (one rule, :func:`_slope`, for the
controller's costs and replay's time accounting).

The decoder measures these numbers (:mod:`speckv.decode.costs`), records carry them, replay
and training score policies with them, and the exported controller takes them as inputs, so
one file serves any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from speckv.runtime.features import GAMMA_MAX, GAMMAS, MAX_UNSETTLED

#: catch-up sizes a speckv policy can meet with a causal-LM draft (a bonus token, then
#: MAX_SKIP_RUN plain steps, then the last token); the measured table covers them. A draft
#: that reads the target's states can meet MAX_UNSETTLED_READING_TARGET + 1: extrapolated.
CATCHUP_MAX: Final = MAX_UNSETTLED + 1


def step_costs(cost_draft_s, cost_verify_s) -> np.ndarray:
    """Seconds of a step that drafts each candidate γ in ``GAMMAS``: ``g·draft + verify[g]``.

    The formula with a catch-up that costs one draft token. Scalar draft and ``[GAMMA_MAX +
    1]`` verify give ``[len(GAMMAS)]``; a column of rows (draft ``[n]``, verify ``[n, GAMMA_MAX
    + 1]``) gives ``[n, len(GAMMAS)]``.
    """
    verify = np.asarray(cost_verify_s, dtype=np.float64)
    draft = np.asarray(cost_draft_s, dtype=np.float64)[..., None]
    gammas = np.asarray(GAMMAS)
    return (gammas * draft + verify[..., gammas]).astype(np.float32)


def catchup_table(cost_draft_s, cost_catchup_s=None, size: int = CATCHUP_MAX) -> np.ndarray:
    """Seconds of a draft forward over ``n = 1..size`` tokens: ``[..., size]`` float64.

    ``cost_catchup_s``: measured ``[..., m]`` for ``n = 1..m`` (any ``m >= 1``); rows or
    entries that are None or NaN fall back to ``cost_draft_s`` for every ``n``.
    """
    draft = np.asarray(cost_draft_s, dtype=np.float64)
    out = np.broadcast_to(draft[..., None], (*draft.shape, size)).copy()
    if cost_catchup_s is None:
        return out
    measured = np.asarray(cost_catchup_s, dtype=np.float64)
    if measured.ndim == 0 or measured.shape[-1] == 0:
        return out
    m = measured.shape[-1]
    n = np.arange(1, size + 1)
    if m == 1:
        filled = np.broadcast_to(measured[..., :1], out.shape)
    else:
        # _slope's rule, per row: a negative slope would extrapolate to negative seconds
        slope = np.maximum(measured[..., -1:] - measured[..., -2:-1], 0.0)
        extra = measured[..., -1:] + slope * np.maximum(n - m, 0)
        filled = np.where(n <= m, measured[..., np.minimum(n, m) - 1], extra)
    ok = np.isfinite(filled).all(-1, keepdims=True)
    return np.where(ok, filled, out)


def _slope(table: Sequence[float]) -> float:
    """Seconds per token beyond a table's last size: its last step, never negative (a longer
    forward never costs less; timing noise can make the last two sizes decrease)."""
    return max(float(table[-1]) - float(table[-2]), 0.0) if len(table) > 1 else 0.0


def catchup_seconds(table: Sequence[float], n: int) -> float:
    """``t_catchup[n]`` from a table for ``1..len(table)``, extrapolated as :func:`_slope` says."""
    size = len(table)
    if n <= size:
        return table[n - 1]
    return table[-1] + _slope(table) * (n - size)


def catchup_vector(table: np.ndarray, count: int) -> np.ndarray:
    """``[count]``: :func:`catchup_seconds` of ``table`` for ``n = 1..count``, vectorised."""
    table = np.asarray(table, dtype=np.float64)
    size = len(table)
    n = np.arange(1, count + 1)
    return np.where(n <= size, table[np.minimum(n, size) - 1],
                    table[-1] + _slope(table) * (n - size))


def drafting_costs(cost_draft_s, cost_verify_s, cost_catchup_s=None, unseen=1) -> np.ndarray:
    """``cost(γ | n)`` for every candidate γ: ``[..., len(GAMMAS)]`` float32.

    ``unseen`` (``n``, scalar or one per row): tokens the step's first draft forward catches
    up on. ``cost_catchup_s``: measured catch-up seconds for ``n = 1..m``, or None.
    """
    verify = np.asarray(cost_verify_s, dtype=np.float64)
    draft, unseen = np.broadcast_arrays(np.asarray(cost_draft_s, dtype=np.float64),
                                        np.asarray(unseen, dtype=np.int64))
    if (unseen < 1).any():
        raise ValueError("a catch-up covers at least one token (the last emitted one).")
    size = max(CATCHUP_MAX, int(unseen.max(initial=1)))
    table = np.broadcast_to(catchup_table(draft, cost_catchup_s, size), (*draft.shape, size))
    catch = np.take_along_axis(table, (unseen - 1)[..., None], -1)
    gammas = np.asarray(GAMMAS)
    return (catch + (gammas - 1) * draft[..., None] + verify[..., gammas]).astype(np.float32)


def tree_step_costs(cost_draft_s, cost_tree_draft_s, cost_tree_verify_s, cost_catchup_s=None,
                    unseen=1) -> np.ndarray:
    """``cost(tree | n)`` for every tree of :data:`speckv.runtime.proposal.TREES`:
    ``t_catchup[n] + t_tree_draft[i] + t_tree_verify[i]``, ``[..., len(TREES)]`` float32.

    ``t_tree_draft[i]`` is the tree's growth after the catch-up (its draft forwards over the
    frontier and their bookkeeping), ``t_tree_verify[i]`` the target's forward over its nodes
    and the root with the tree's mask; both measured
    (:func:`speckv.decode.costs.measure_tree_costs`).
    """
    draft, unseen = np.broadcast_arrays(np.asarray(cost_draft_s, dtype=np.float64),
                                        np.asarray(unseen, dtype=np.int64))
    size = max(CATCHUP_MAX, int(unseen.max(initial=1)))
    table = np.broadcast_to(catchup_table(draft, cost_catchup_s, size), (*draft.shape, size))
    catch = np.take_along_axis(table, (unseen - 1)[..., None], -1)
    grow = np.asarray(cost_tree_draft_s, dtype=np.float64)
    verify = np.asarray(cost_tree_verify_s, dtype=np.float64)
    return (catch + grow + verify).astype(np.float32)


class StepCosts:
    """One machine's step costs, ready for the controller at any catch-up size.

    ``StepCosts(t_draft, t_verify, t_catchup)``: ``t_verify[g]`` is a target forward over
    ``g + 1`` tokens (g = 0..GAMMA_MAX), ``t_catchup[n - 1]`` a draft forward over ``n``
    tokens (optional, see the module docstring). :attr:`plain` is the cost of a plain step,
    :meth:`drafting` the ``[len(GAMMAS)]`` costs of a step after ``unseen`` unseen tokens
    (precomputed: the hot path only indexes). Only ratios matter: any positive unit works.
    """

    def __init__(self, t_draft: float, t_verify: Sequence[float],
                 t_catchup: Sequence[float] | None = None,
                 t_tree_draft: Sequence[float] | None = None,
                 t_tree_verify: Sequence[float] | None = None) -> None:
        verify = np.asarray(t_verify, dtype=np.float64)
        if verify.shape != (GAMMA_MAX + 1,):
            raise ValueError(f"t_verify needs {GAMMA_MAX + 1} values (a target forward over "
                             f"1..{GAMMA_MAX + 1} tokens), got shape {verify.shape}.")
        catchup = [] if t_catchup is None else np.asarray(t_catchup, np.float64).ravel().tolist()
        values = [float(t_draft), *verify.tolist(), *catchup]
        if not all(_positive(v) for v in values):
            raise ValueError(f"costs must be finite seconds > 0; got draft {t_draft}, verify "
                             f"{verify.tolist()}, catch-up {catchup}.")
        self.t_draft = float(t_draft)
        self.t_verify = tuple(verify.tolist())
        self.t_catchup = tuple(catchup) or None
        self.plain = float(verify[0])
        self._rows = drafting_costs(self.t_draft, verify, self.t_catchup,
                                    np.arange(1, CATCHUP_MAX + 1))
        self._rows.setflags(write=False)
        self._plain = np.full(1, self.plain, np.float32)
        self.t_tree_draft = self.t_tree_verify = None
        self._tree_rows = None
        if t_tree_draft is not None and t_tree_verify is not None:
            grow = np.asarray(t_tree_draft, np.float64).ravel()
            verify = np.asarray(t_tree_verify, np.float64).ravel()
            if grow.shape != verify.shape or not all(map(_positive, [*grow, *verify])):
                raise ValueError(f"tree costs need one positive draft and verify time per "
                                 f"tree; got {grow.tolist()} and {verify.tolist()}.")
            self.t_tree_draft, self.t_tree_verify = tuple(grow), tuple(verify)
            self._tree_rows = tree_step_costs(self.t_draft, grow, verify, self.t_catchup,
                                              np.arange(1, CATCHUP_MAX + 1))
            self._tree_rows.setflags(write=False)

    def drafting(self, unseen: int = 1) -> np.ndarray:
        """``[len(GAMMAS)]`` float32 costs of a step whose catch-up covers ``unseen`` tokens."""
        if 1 <= unseen <= CATCHUP_MAX:
            return self._rows[unseen - 1]
        return drafting_costs(self.t_draft, self.t_verify, self.t_catchup, max(unseen, 1))

    def trees(self, unseen: int = 1) -> np.ndarray | None:
        """``[len(TREES)]`` float32 costs of a step verifying each tree after a catch-up over
        ``unseen`` tokens; None without tree costs."""
        if self._tree_rows is None:
            return None
        if 1 <= unseen <= CATCHUP_MAX:
            return self._tree_rows[unseen - 1]
        return tree_step_costs(self.t_draft, self.t_tree_draft, self.t_tree_verify,
                               self.t_catchup, max(unseen, 1))

    def __repr__(self) -> str:
        return (f"StepCosts(t_draft={self.t_draft:.4g}, t_verify[0]={self.plain:.4g}, "
                f"catch-up {'measured' if self.t_catchup else 'as one draft token'})")


def _positive(value: float) -> bool:
    return bool(np.isfinite(value)) and value > 0
