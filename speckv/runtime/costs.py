"""The cost of a speculative step: the one formula every stage uses.

A step that drafts ``γ`` tokens costs ``γ·t_draft + t_verify[γ]`` seconds, where ``t_draft``
is one draft forward of one token and ``t_verify[g]`` one target forward over ``g + 1``
tokens (``t_verify[0]`` is a plain target step). The decoder measures these numbers
(:mod:`speckv.decode.costs`), records carry them, replay and training score policies with
them, and the exported controller takes them as an input, so one file serves any machine.
"""

from __future__ import annotations

import numpy as np

from speckv.runtime.features import GAMMAS


def step_costs(cost_draft_s, cost_verify_s) -> np.ndarray:
    """Seconds of a step that drafts each candidate γ in ``GAMMAS``: ``g·draft + verify[g]``.

    Scalar draft and ``[GAMMA_MAX + 1]`` verify give ``[len(GAMMAS)]``; a column of rows
    (draft ``[n]``, verify ``[n, GAMMA_MAX + 1]``) gives ``[n, len(GAMMAS)]``.
    """
    verify = np.asarray(cost_verify_s, dtype=np.float64)
    draft = np.asarray(cost_draft_s, dtype=np.float64)[..., None]
    gammas = np.asarray(GAMMAS)
    return (gammas * draft + verify[..., gammas]).astype(np.float32)
