"""Make the tiny committed controller the runtime tests use (they need no torch).

    .venv/bin/python scripts/make_runtime_fixture.py [--out tests/fixtures]

writes ``controller_tiny.onnx`` (a seeded 10 -> 16 -> 16 -> 8 survival MLP exported by
``speckv.export.graph.export_controller``, a few kilobytes) and ``controller_tiny_expected.npz``
(features, costs and PyTorch's γ, expected tokens and survival for them: the golden outputs
the runtime must reproduce). The weights are scaled up and the last bias raised so that the
untrained MLP is confident enough, and its choices varied enough over the rows, for tests of
γ selection to mean something. Rerun it after a change of the controller format.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

import numpy as np
import torch

from speckv.export.graph import controller_info, export_controller, torch_graph
from speckv.runtime.costs import step_costs
from speckv.runtime.features import COMPRESSIONS, FEATURE_NAMES, GAMMA_MAX, GAMMAS, N_FEATURES
from speckv.train.network import SurvivalMLP

SEED: Final = 0
HIDDEN: Final = (16, 16)
ROWS: Final = 64
ONNX_NAME: Final = "controller_tiny.onnx"
EXPECTED_NAME: Final = "controller_tiny_expected.npz"
DEFAULT_OUT: Final = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def feature_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Plausible decision-time features in ``FEATURE_NAMES`` order (not real data)."""
    top1 = rng.uniform(0.05, 1.0, n)
    cols = {
        "draft_entropy": rng.uniform(0.0, 4.0, n) * (1.1 - top1),
        "draft_top1": top1,
        "draft_margin": top1 * rng.uniform(0.0, 1.0, n),
        "target_top1_prev": rng.uniform(0.2, 1.0, n),
        "agree_ema": rng.uniform(0.0, 1.0, n),
        "agree_run": rng.integers(0, 17, n) / 16,
        "log_position": np.log1p(rng.integers(0, 400, n)),
    }
    onehot = np.eye(len(COMPRESSIONS))[rng.integers(0, len(COMPRESSIONS), n)]
    out = np.column_stack([cols[name] for name in FEATURE_NAMES[:len(cols)]] + [onehot])
    assert out.shape == (n, N_FEATURES)
    return out.astype(np.float32)


def cost_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Step costs per γ from a draft/verify timing that varies between rows (seconds)."""
    rows = []
    for draft, verify0 in zip(rng.uniform(0.004, 0.04, n), rng.uniform(0.05, 0.12, n),
                              strict=True):
        verify = verify0 * (1 + 0.03 * np.arange(GAMMA_MAX + 1))
        rows.append(step_costs(float(draft), verify))
    return np.stack(rows).astype(np.float32)


def make_fixture(out: Path = DEFAULT_OUT) -> tuple[Path, Path]:
    """Write the fixture controller and its golden outputs into ``out``."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    features, costs = feature_rows(rng, ROWS), cost_rows(rng, ROWS)
    mlp = SurvivalMLP(N_FEATURES, GAMMA_MAX, hidden=HIDDEN)
    with torch.no_grad():
        for layer in mlp.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(2.0)
        mlp.net[-1].bias.add_(2.0)
    mlp.set_scaling(torch.from_numpy(features.mean(0)), torch.from_numpy(features.std(0)))
    meta = {
        "feature_names": list(FEATURE_NAMES), "gammas": list(GAMMAS),
        "compressions": list(COMPRESSIONS), "feature_set": "decision",
        "objective": "tokens_per_s", "data_fingerprint": f"fixture:seed={SEED}",
        "parity_features": features, "parity_costs": costs,
    }
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / ONNX_NAME
    export_controller(mlp, meta, onnx_path, latency_calls=0)
    graph = torch_graph(mlp, controller_info(mlp, meta))
    with torch.inference_mode():
        gamma, expected, survival = graph(torch.from_numpy(features), torch.from_numpy(costs))
    if len(np.unique(gamma.numpy())) < 4:
        raise SystemExit("the fixture's choices are not varied enough; change SEED")
    expected_path = out / EXPECTED_NAME
    np.savez_compressed(expected_path, features=features, costs=costs, gamma=gamma.numpy(),
                        expected_tokens=expected.numpy(), survival=survival.numpy())
    return onnx_path, expected_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in make_fixture(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
