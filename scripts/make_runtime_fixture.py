"""Make the tiny committed controller the runtime tests use (they need no torch).

    .venv/bin/python scripts/make_runtime_fixture.py [--out tests/fixtures]

writes ``controller_tiny.onnx`` (seeded 10 -> 16 -> 16 -> 28 step and 8 -> 16 -> 16 -> 28
pre-draft survival MLPs, the chains' curve and each tree's, and a 12 -> 16 -> 16 -> 8 lookup
MLP, exported by ``speckv.export.graph.export_controller``: controller format 4, a few
kilobytes) and ``controller_tiny_expected.npz`` (inputs of the three decisions and PyTorch's
outputs for them: the golden outputs the runtime must reproduce). The weights are scaled up and
the last biases set so that the untrained MLPs are confident enough, and their choices varied
enough over the rows (several γs and trees; both speculate and plain steps; the lookup taken
and not), for tests of the decisions to mean something. Rerun it after a change of the controller format.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

import numpy as np
import torch

from speckv.export.graph import controller_info, export_controller, torch_graph
from speckv.runtime.contract import survival_width
from speckv.runtime.costs import drafting_costs, tree_step_costs
from speckv.runtime.features import (
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMA_MAX,
    LOOKUP_FEATURE_NAMES,
    GAMMAS,
    MAX_SKIP_RUN,
    LOOKUP_MAX_TOKENS,
    N_FEATURES,
    N_LOOKUP_FEATURES,
    N_PRE_FEATURES,
    PRE_FEATURE_NAMES,
    UNSETTLED_CAP,
    lookup_features,
)
from speckv.runtime.proposal import GAMMA_MAX as CHAIN_MAX
from speckv.runtime.proposal import TREES
from speckv.train.network import SurvivalMLP

SEED: Final = 0
HIDDEN: Final = (16, 16)
ROWS: Final = 64
#: last-layer bias of the pre-draft MLP: low enough that a plain step wins on some rows
PRE_BIAS: Final = -0.5
#: the same for the lookup MLP: the lookup wins on some rows, not all
LOOKUP_BIAS: Final = -1.0
ONNX_NAME: Final = "controller_tiny.onnx"
EXPECTED_NAME: Final = "controller_tiny_expected.npz"
DEFAULT_OUT: Final = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def feature_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Plausible step features in ``FEATURE_NAMES`` order (not real data)."""
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


def pre_rows(rng: np.random.Generator, features: np.ndarray) -> np.ndarray:
    """Pre-draft features in ``PRE_FEATURE_NAMES`` order, consistent with ``features``."""
    by_name = dict(zip(FEATURE_NAMES, features.T, strict=True))
    unsettled = rng.integers(0, MAX_SKIP_RUN + 2, len(features))
    by_name["unsettled"] = np.minimum(unsettled, UNSETTLED_CAP) / UNSETTLED_CAP
    out = np.column_stack([by_name[name] for name in PRE_FEATURE_NAMES])
    assert out.shape == (len(features), N_PRE_FEATURES)
    return out.astype(np.float32)


def cost_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Step costs per γ, then per tree (catch-up of 1..3 tokens included), and plain-step
    costs (seconds)."""
    rows, plain = [], []
    for draft, verify0, unseen in zip(rng.uniform(0.004, 0.04, n), rng.uniform(0.05, 0.12, n),
                                      rng.integers(1, 4, n), strict=True):
        verify = verify0 * (1 + 0.03 * np.arange(GAMMA_MAX + 1))
        catchup = draft * (1 + 0.1 * np.arange(4))
        grow = [1.2 * draft * t.draft_forwards + 0.002 for t in TREES]
        tree_verify = [verify0 * (1 + 0.02 * t.size) for t in TREES]
        rows.append(np.concatenate([
            drafting_costs(float(draft), verify, catchup, int(unseen)),
            tree_step_costs(float(draft), grow, tree_verify, catchup, int(unseen))]))
        plain.append(verify[0])
    return np.stack(rows).astype(np.float32), np.asarray(plain, np.float32)[:, None]


def lookup_rows(rng: np.random.Generator, pre: np.ndarray, plain: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Lookup vectors (a proposal of 1..8 tokens with its signals, then ``pre``) and the cost
    of verifying each continuation (a forward over it: a little over a plain step)."""
    n = len(pre)
    length = rng.integers(1, LOOKUP_MAX_TOKENS + 1, n)
    occurrences = rng.integers(1, 6, n)
    agreeing = rng.integers(0, occurrences + 1)
    x = lookup_features(pre, length, rng.integers(1, 5, n), occurrences, agreeing)
    cost = plain[:, 0] * (1.0 + 0.03 * length) * rng.uniform(0.9, 1.6, n)
    return x, cost.astype(np.float32)[:, None]


def _confident(mlp: SurvivalMLP, bias: float) -> None:
    with torch.no_grad():
        for layer in mlp.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(2.0)
        mlp.net[-1].bias.add_(bias)


def make_fixture(out: Path = DEFAULT_OUT) -> tuple[Path, Path]:
    """Write the fixture controller and its golden outputs into ``out``."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    features = feature_rows(rng, ROWS)
    pre = pre_rows(rng, features)
    costs, plain = cost_rows(rng, ROWS)
    look, look_cost = lookup_rows(rng, pre, plain)
    trees = [[t.size, t.depth, t.branch] for t in TREES]
    width = survival_width(GAMMAS, trees)
    mlp = SurvivalMLP(N_FEATURES, width, hidden=HIDDEN)
    pre_mlp = SurvivalMLP(N_PRE_FEATURES, width, hidden=HIDDEN)
    lookup_mlp = SurvivalMLP(N_LOOKUP_FEATURES, LOOKUP_MAX_TOKENS, hidden=HIDDEN)
    _confident(mlp, 2.0)
    _confident(pre_mlp, PRE_BIAS)
    _confident(lookup_mlp, LOOKUP_BIAS)
    mlp.set_scaling(torch.from_numpy(features.mean(0)), torch.from_numpy(features.std(0)))
    pre_mlp.set_scaling(torch.from_numpy(pre.mean(0)), torch.from_numpy(pre.std(0)))
    lookup_mlp.set_scaling(torch.from_numpy(look.mean(0)), torch.from_numpy(look.std(0)))
    meta = {
        "feature_names": list(FEATURE_NAMES), "pre_feature_names": list(PRE_FEATURE_NAMES),
        "gammas": list(GAMMAS), "compressions": list(COMPRESSIONS), "feature_set": "decision",
        "objective": "tokens_per_s", "data_fingerprint": f"fixture:seed={SEED}",
        "max_skip_run": MAX_SKIP_RUN, "pre_mlp": pre_mlp, "trees": trees,
        "lookup_mlp": lookup_mlp, "lookup_feature_names": list(LOOKUP_FEATURE_NAMES),
        "parity_features": features, "parity_pre_features": pre, "parity_costs": costs,
        "parity_plain_costs": plain, "parity_lookup_features": look,
        "parity_lookup_costs": look_cost,
    }
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / ONNX_NAME
    export_controller(mlp, meta, onnx_path, latency_calls=0)
    graph = torch_graph(mlp, controller_info(mlp, meta), pre_mlp, lookup_mlp)
    with torch.inference_mode():
        outputs = [t.numpy() for t in graph(*(
            torch.from_numpy(a) for a in (features, pre, costs, plain, look, look_cost)))]
    (speculate, gamma, expected, survival, pre_expected, pre_survival, lookup, lookup_expected,
     lookup_survival) = outputs
    if len(np.unique(gamma)) < 4 or not 0.2 < speculate.mean() < 0.8 \
            or not (gamma > CHAIN_MAX).any() or not (gamma <= CHAIN_MAX).any() \
            or not 0.2 < lookup.mean() < 0.8:
        raise SystemExit("the fixture's choices are not varied enough; change SEED, PRE_BIAS "
                         "or LOOKUP_BIAS")
    expected_path = out / EXPECTED_NAME
    np.savez_compressed(expected_path, features=features, pre_features=pre, costs=costs,
                        plain_cost=plain, speculate=speculate, gamma=gamma,
                        expected_tokens=expected, survival=survival,
                        pre_expected_tokens=pre_expected, pre_survival=pre_survival,
                        lookup_features=look, lookup_cost=look_cost, lookup=lookup,
                        lookup_expected_tokens=lookup_expected, lookup_survival=lookup_survival)
    return onnx_path, expected_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in make_fixture(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
