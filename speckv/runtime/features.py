"""THE feature definition: draft logits + history -> decision-time feature vector.

The profiler, the training data, the replay evaluator and the runtime controller all build
features here, so training and serving cannot drift apart. numpy only: the torch-free
runtime imports this module.

Decision time is the moment after the draft's first forward of a step (which every step
runs anyway: it catches the draft up on the tokens the target just emitted and yields the
first proposal) and before any further drafting. Everything here is known then:

- the draft's distribution for the first proposal token: entropy, top-1 probability and the
  top-1/top-2 margin;
- the target's confidence in the last token it emitted (from the previous verification);
- how well the draft has tracked the target so far: an exponential moving average of
  draft/target agreement over past positions, and the current run of consecutive agreements.
  Agreement at a position is "the draft's greedy token given the true prefix equals the
  target's token". The decoder learns it for every position as it goes (accepted tokens
  agreed, the rejected one did not, and the draft's catch-up forward scores the bonus token),
  so this history does not depend on which γ earlier steps chose. That makes it exact under
  offline replay of any policy and lets every trace position be a training example;
- the position in the answer, and the target's compression level (one-hot).

Nothing computed from the tokens drafted at this step enters the vector: those would only
exist after γ is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

COMPRESSIONS: Final = ("fp16", "int8", "nf4")
GAMMA_MAX: Final = 8
GAMMAS: Final = tuple(range(1, GAMMA_MAX + 1))
EMA_ALPHA: Final = 0.25
EMA_PRIOR: Final = 0.5
RUN_CAP: Final = 16

#: names and order of the feature vector (the ONNX metadata repeats them).
FEATURE_NAMES: Final = (
    "draft_entropy",       # entropy (nats) of the draft's first-proposal distribution
    "draft_top1",          # its top-1 probability
    "draft_margin",        # top-1 minus top-2 probability
    "target_top1_prev",    # target's probability of the last token it emitted
    "agree_ema",           # EMA of draft/target agreement over past positions
    "agree_run",           # consecutive agreements just before this position / RUN_CAP
    "log_position",        # log(1 + tokens generated so far)
    "compression_fp16",
    "compression_int8",
    "compression_nf4",
)
N_FEATURES: Final = len(FEATURE_NAMES)


def token_stats(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Entropy, top-1 probability and top-1/top-2 margin of each row of logits.

    ``logits``: ``[..., vocab]``; returns ``[..., 3]`` float32. Rows may also be
    log-probabilities (the softmax is shift-invariant).
    """
    x = np.asarray(logits, dtype=np.float32)
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
    return np.stack([entropy, top2[..., 1], top2[..., 1] - top2[..., 0]], -1).astype(np.float32)


def compression_onehot(compression: str) -> np.ndarray:
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"Unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}."
        )
    out = np.zeros(len(COMPRESSIONS), dtype=np.float32)
    out[COMPRESSIONS.index(compression)] = 1.0
    return out


@dataclass
class History:
    """Per-sequence agreement history; update it with every target token as it is settled."""

    ema: float = EMA_PRIOR
    run: int = 0
    position: int = 0
    target_top1_prev: float = 1.0

    def settle(self, agreed: bool, target_top1: float) -> None:
        """One more target token is final: did the draft's greedy token equal it?"""
        self.ema = (1 - EMA_ALPHA) * self.ema + EMA_ALPHA * float(agreed)
        self.run = self.run + 1 if agreed else 0
        self.position += 1
        self.target_top1_prev = float(target_top1)


def history_arrays(agree: np.ndarray, target_top1: np.ndarray, prior_top1: float = 1.0):
    """History features for every position of a trace at once (vectorised ``History``).

    ``agree[j]``: did the draft's greedy token at answer position j equal the target's;
    ``target_top1[j]``: the target's probability of its token j. Returns ``ema, run,
    target_top1_prev`` as seen *before* position j, each ``[n]``.
    """
    n = len(agree)
    ema = np.empty(n, np.float32)
    run = np.empty(n, np.float32)
    prev = np.empty(n, np.float32)
    h = History(target_top1_prev=prior_top1)
    for j in range(n):
        ema[j], run[j], prev[j] = h.ema, h.run, h.target_top1_prev
        h.settle(bool(agree[j]), float(target_top1[j]))
    return ema, run, prev


def assemble(stats: np.ndarray, target_top1_prev, agree_ema, agree_run, position,
             compression: str) -> np.ndarray:
    """Stack the parts into ``[n, N_FEATURES]`` float32 in ``FEATURE_NAMES`` order."""
    stats = np.atleast_2d(np.asarray(stats, np.float32))
    n = stats.shape[0]
    cols = [
        stats[:, 0], stats[:, 1], stats[:, 2],
        np.broadcast_to(np.asarray(target_top1_prev, np.float32), (n,)),
        np.broadcast_to(np.asarray(agree_ema, np.float32), (n,)),
        np.minimum(np.broadcast_to(np.asarray(agree_run, np.float32), (n,)), RUN_CAP) / RUN_CAP,
        np.log1p(np.broadcast_to(np.asarray(position, np.float32), (n,))),
    ]
    onehot = np.broadcast_to(compression_onehot(compression), (n, len(COMPRESSIONS)))
    return np.concatenate([np.stack(cols, -1), onehot], -1).astype(np.float32)


def step_features(first_logits: np.ndarray, history: History, compression: str) -> np.ndarray:
    """The feature vector ``[N_FEATURES]`` for one live decision."""
    stats = token_stats(np.asarray(first_logits).reshape(1, -1))
    return assemble(stats, history.target_top1_prev, history.ema, history.run,
                    history.position, compression)[0]
