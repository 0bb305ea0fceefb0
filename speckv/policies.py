"""Speculation-length policies: one interface for offline replay and the live decoder.

A step of speculative decoding, as both :mod:`speckv.evaluate` (replay) and
:mod:`speckv.decode` (live) run it:

1. the draft's first forward of the step (catch-up on the new tokens + first proposal)
   yields the decision-time features (:mod:`speckv.features`);
2. ``gamma = min(policy.choose(ctx), ctx.max_gamma)`` is decided, before any more drafting;
3. the draft proposes tokens k = 1..gamma; after token k, ``policy.keep_drafting(k, top1,
   entropy)`` may end drafting early (per-token stopping rules); ``drafted`` <= gamma;
4. the target verifies the drafted tokens in one forward; ``accepted`` of them survive;
5. ``policy.observe(drafted, accepted)`` updates whatever state the policy keeps.

When ``ctx.max_gamma == 0`` (one token left to produce) there is no decision: the step is a
plain target forward and no policy method is called.

Cost of a step that drafts g tokens: ``g * cost_draft_s + cost_verify_s[g]``
(``cost_verify_s[g]`` is one target forward over g+1 tokens; ``cost_verify_s[0]`` is a plain
autoregressive step). The same formula is used by replay and by the learned controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from speckv.features import GAMMA_MAX, GAMMAS


@dataclass
class StepContext:
    """What a policy may look at when it chooses γ (all known before drafting)."""

    features: np.ndarray  # [N_FEATURES], speckv.features.FEATURE_NAMES order
    compression: str
    position: int  # tokens generated before this step
    max_gamma: int  # most tokens this step may draft (γmax, or fewer near the end)
    costs: np.ndarray  # [len(GAMMAS)] seconds of a step drafting each candidate γ


def step_costs(cost_draft_s: float, cost_verify_s) -> np.ndarray:
    """Seconds of a step that drafts each candidate γ in ``GAMMAS``."""
    verify = np.asarray(cost_verify_s, dtype=np.float64)
    return np.array([g * cost_draft_s + verify[g] for g in GAMMAS], dtype=np.float32)


class Policy(Protocol):
    name: str

    def reset(self) -> None:
        """Start of a new sequence."""

    def choose(self, ctx: StepContext) -> int:
        """How many tokens to draft at most (1..GAMMA_MAX), decided before drafting."""

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        """After drafting token k (1-based) with these draft statistics: draft token k+1?"""

    def observe(self, drafted: int, accepted: int) -> None:
        """Outcome of the step just verified."""


class FixedGamma:
    """Always draft the same number of tokens."""

    def __init__(self, gamma: int) -> None:
        if not 1 <= gamma <= GAMMA_MAX:
            raise ValueError(f"fixed γ must lie in 1..{GAMMA_MAX}, got {gamma}.")
        self.gamma = gamma
        self.name = f"fixed:{gamma}"

    def reset(self) -> None:
        pass

    def choose(self, ctx: StepContext) -> int:
        return self.gamma

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        pass
