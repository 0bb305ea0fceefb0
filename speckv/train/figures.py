"""The figures the LightningModule logs to TensorBoard: calibration and the controller's choices.

Each function takes plain numpy arrays and returns a matplotlib ``Figure`` (made without
pyplot, so no backend or global figure list is involved); the module logs it with
``SummaryWriter.add_figure`` at the global step, the x-axis of every other curve.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from speckv.runtime.proposal import OPTION_NAMES

#: equal-width bins of predicted probability in a reliability diagram
CALIBRATION_BINS = 10


def reliability(predicted: np.ndarray, hit: np.ndarray,
                bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin of ``predicted``: its mean prediction, the observed frequency of
    ``hit`` and the number of rows (a reliability diagram's points)."""
    predicted = np.asarray(predicted, np.float64)
    hit = np.asarray(hit, np.float64)
    idx = np.clip((predicted * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    full = count > 0
    mean_pred = np.bincount(idx, predicted, bins)[full] / count[full]
    observed = np.bincount(idx, hit, bins)[full] / count[full]
    return mean_pred, observed, count[full]


def calibration_figure(panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                       title: str) -> Figure:
    """Reliability diagrams side by side: one panel per network, one line per compression.

    ``panels[network][compression] = (predicted P(first draft token accepted), accepted)``.
    """
    fig = Figure(figsize=(4.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (network, lines) in zip(axes, panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        for compression, (predicted, hit) in lines.items():
            x, y, _ = reliability(predicted, hit)
            ax.plot(x, y, marker="o", label=f"{compression} ({len(predicted)} rows)")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=network,
               xlabel="predicted P(first draft token accepted)", ylabel="observed frequency")
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig


def choices_figure(choices: Mapping[str, np.ndarray], gamma_max: int, title: str) -> Figure:
    """The share of steps given each choice, per compression: 0 is a plain step (no
    speculation), then the option codes up to ``gamma_max`` (γ of a chain, then the trees,
    :mod:`speckv.runtime.proposal`)."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    options = np.arange(gamma_max + 1)
    width = 0.8 / max(1, len(choices))
    for i, (compression, chosen) in enumerate(choices.items()):
        share = np.bincount(np.asarray(chosen, np.int64), minlength=gamma_max + 1) / len(chosen)
        ax.bar(options + (i - (len(choices) - 1) / 2) * width, share, width,
               label=f"{compression} ({len(chosen)} steps)")
    ax.set_xticks(options, [OPTION_NAMES[c].removeprefix("fixed:") if c < len(OPTION_NAMES)
                            else str(c) for c in options], rotation=45, fontsize="small")
    ax.set(xlabel="choice (γ of a chain, or a tree; plain = no speculation)",
           ylabel="share of steps", ylim=(0, 1))
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig
