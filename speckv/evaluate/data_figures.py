"""Figures and a summary of profiled trace records (``speckv records figures``).

- acceptance vs the draft's confidence and vs its entropy (first proposal token), with the
  Pearson correlations, per compression level;
- the tokens/s-optimal fixed γ per task x compression, replayed with the measured costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from speckv.prompts import TASKS
from speckv.runtime.features import COMPRESSIONS, GAMMAS


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else 0.0


def acceptance_summary(df: pd.DataFrame) -> dict:
    """Row counts and correlations of draft confidence / entropy with acceptance."""
    out: dict = {"rows": len(df), "per_compression_task": {}, "correlation": {}}
    counts = df.groupby(["compression", "task"]).size()
    for (comp, task), n in counts.items():
        out["per_compression_task"].setdefault(comp, {})[task] = int(n)
    for comp, sub in df.groupby("compression"):
        hit = (sub["accept_len"] >= 1).to_numpy(float)
        # the paper's per-step acceptance rate, here for γ = 4 steps
        rate = np.minimum(sub["accept_len"], 4).to_numpy(float) / np.maximum(
            np.minimum(sub["accept_cap"], 4).to_numpy(float), 1)
        out["correlation"][comp] = {
            "confidence_vs_first_accept": _corr(sub["draft_top1"].to_numpy(), hit),
            "entropy_vs_first_accept": _corr(sub["draft_entropy"].to_numpy(), hit),
            "confidence_vs_rate_g4": _corr(sub["draft_top1"].to_numpy(), rate),
            "entropy_vs_rate_g4": _corr(sub["draft_entropy"].to_numpy(), rate),
            "agreement": float(hit.mean()),
        }
    return out


def best_fixed_gamma(df: pd.DataFrame) -> dict:
    """Tokens/s of every fixed γ per task x compression (exact replay), and the best γ."""
    from speckv.evaluate.baselines import fixed_scores
    from speckv.evaluate.replay import prepare

    table: dict = {}
    for (comp, task), sub in df.groupby(["compression", "task"]):
        scores = fixed_scores(prepare(sub.reset_index(drop=True)), "tokens_per_s")[comp]
        tps = {g: float(v) for g, v in zip(GAMMAS, scores, strict=True)}
        best = max(tps, key=tps.get)
        table.setdefault(comp, {})[task] = {"best_gamma": best, "tokens_per_s": tps}
    return table


def write_figures(df: pd.DataFrame, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df[df["mode"] == "trace"].reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = acceptance_summary(df)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for comp in COMPRESSIONS:
        sub = df[df["compression"] == comp]
        if sub.empty:
            continue
        hit = (sub["accept_len"] >= 1).to_numpy(float)
        for ax, col, bins in ((axes[0], "draft_top1", np.linspace(0, 1, 11)),
                              (axes[1], "draft_entropy", np.linspace(0, 6, 13))):
            x = sub[col].to_numpy()
            idx = np.clip(np.digitize(x, bins) - 1, 0, len(bins) - 2)
            xs = [x[idx == i].mean() for i in range(len(bins) - 1) if (idx == i).sum() >= 20]
            ys = [hit[idx == i].mean() for i in range(len(bins) - 1) if (idx == i).sum() >= 20]
            r = summary["correlation"][comp][
                "confidence_vs_first_accept" if col == "draft_top1" else "entropy_vs_first_accept"]
            ax.plot(xs, ys, marker="o", label=f"{comp} (r = {r:.2f})")
    axes[0].set_xlabel("draft top-1 probability of the first proposal")
    axes[1].set_xlabel("draft entropy of the first proposal (nats)")
    for ax in axes:
        ax.set_ylabel("P(first drafted token accepted)")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.suptitle(f"Acceptance vs draft signals ({len(df)} trace steps)")
    fig.tight_layout()
    fig.savefig(out / "acceptance_vs_signals.png", dpi=120)
    plt.close(fig)

    best = best_fixed_gamma(df)
    summary["best_fixed_gamma"] = best
    comps = [c for c in COMPRESSIONS if c in best]
    grid = np.array([[best[c].get(t, {}).get("best_gamma", np.nan) for t in TASKS] for c in comps],
                    float)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    im = ax.imshow(grid, cmap="viridis", vmin=min(GAMMAS), vmax=max(GAMMAS), aspect="auto")
    ax.set_xticks(range(len(TASKS)), TASKS, rotation=15)
    ax.set_yticks(range(len(comps)), comps)
    for i in range(len(comps)):
        for j in range(len(TASKS)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", color="white")
    fig.colorbar(im, ax=ax, label="best fixed γ (tokens/s)")
    ax.set_title("Tokens/s-optimal fixed γ by task x compression")
    fig.tight_layout()
    fig.savefig(out / "best_fixed_gamma.png", dpi=120)
    plt.close(fig)
    return summary
