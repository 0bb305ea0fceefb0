"""The plain ``nn.Module`` networks: the survival MLP and the controller graph that is exported.

The MLP maps a decision-time feature vector to γmax logits ``z_k``. The survival curve is

    s_k = P(accept_len >= k | x) = prod_{j<=k} sigmoid(z_j),

monotone non-increasing in k by construction, written as ``exp(cumsum(logsigmoid(z)))``
(which every ONNX exporter supports, unlike ``cumprod``). Expected tokens of a step that
drafts γ tokens: ``E[γ] = 1 + sum_{k<=γ} s_k``. The controller picks the candidate γ with
the most expected tokens per unit of cost, where ``costs[γ]`` is the machine's measured time
for that step (γ draft forwards plus one target forward over γ+1 tokens).

Feature scaling is a buffer of the network, so the exported graph takes raw features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class SurvivalMLP(nn.Module):
    """Feature vector -> per-depth continuation logits (hazard form of the survival curve)."""

    def __init__(self, n_features: int, gamma_max: int, hidden: Sequence[int] = (32, 32),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, gamma_max))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.gamma_max = gamma_max

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Continuation logits ``[batch, gamma_max]``."""
        return self.net((x - self.mean) / self.std)

    def log_survival(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(F.logsigmoid(self(x)), dim=-1)

    def survival(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_survival(x))


def expected_tokens(survival: torch.Tensor, gammas: Sequence[int]) -> torch.Tensor:
    """``E[tokens | γ] = 1 + sum_{k<=γ} s_k`` for each candidate γ: ``[batch, len(gammas)]``."""
    csum = torch.cumsum(survival, dim=-1)
    idx = torch.as_tensor([g - 1 for g in gammas], dtype=torch.long, device=survival.device)
    return 1.0 + csum.index_select(-1, idx)


class ControllerGraph(nn.Module):
    """What ``speckv export`` writes: (features, costs) -> (γ, expected tokens, survival)."""

    def __init__(self, mlp: SurvivalMLP, gammas: Sequence[int]) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("gammas", torch.as_tensor(list(gammas), dtype=torch.long))
        self.register_buffer("index", torch.as_tensor([g - 1 for g in gammas], dtype=torch.long))

    def forward(self, features: torch.Tensor, costs: torch.Tensor):
        survival = self.mlp.survival(features)
        expected = 1.0 + torch.cumsum(survival, dim=-1).index_select(-1, self.index)
        best = torch.argmax(expected / costs, dim=-1)
        return self.gammas.index_select(0, best), expected, survival


def load_checkpoint(path) -> tuple[SurvivalMLP, dict]:
    """Read a training checkpoint into the plain MLP and speckv's metadata.

    A checkpoint written by :class:`speckv.train.module.SpeckvModule` carries, under the key
    ``"speckv"``: ``mlp_config`` ({n_features, gamma_max, hidden}), ``feature_names``,
    ``gammas``, ``compressions``, ``feature_set``, ``objective``, ``data_fingerprint`` and
    ``parity_features`` / ``parity_costs`` (held-out rows for the export's parity check).
    The MLP's weights are the ``state_dict`` entries prefixed ``mlp.``.
    """
    from pathlib import Path

    from speckv.errors import SpeckvError

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SpeckvError(f"Cannot read checkpoint {path} ({type(exc).__name__}: {exc}).") from None
    meta = ckpt.get("speckv") if isinstance(ckpt, dict) else None
    if not meta:
        raise SpeckvError(f"{path} is not a speckv checkpoint (no 'speckv' entry). Train one "
                          "with `python -m speckv.train fit`.")
    mlp = SurvivalMLP(**meta["mlp_config"])
    state = {k.removeprefix("mlp."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("mlp.")}
    mlp.load_state_dict(state)
    mlp.eval()
    return mlp, meta
