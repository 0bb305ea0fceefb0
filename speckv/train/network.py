"""The plain ``nn.Module`` networks: the survival MLPs and the controller graph that is exported.

A survival MLP maps a feature vector to γmax logits ``z_k``. The survival curve is

    s_k = P(accept_len >= k | x) = prod_{j<=k} sigmoid(z_j),

monotone non-increasing in k by construction, written as ``exp(cumsum(logsigmoid(z)))``
(which every ONNX exporter supports, unlike ``cumprod``). Expected tokens of a step that
drafts γ tokens: ``E[γ] = 1 + sum_{k<=γ} s_k``; a plain step makes exactly one token.

A controller has three. The *lookup* MLP reads the context lookup's proposal (its signals,
then the pre-draft vector: :data:`speckv.runtime.features.LOOKUP_FEATURE_NAMES`) and predicts
how much of that continuation the target accepts; verifying it costs one target forward and
no draft forward, and it is taken when its ``E / cost`` beats both a plain step and every
option the pre-draft MLP prices (:func:`lookup_rule`). The *pre-draft* MLP reads what is
known before the draft runs (:data:`speckv.runtime.features.PRE_FEATURE_NAMES`) and decides
whether to speculate at all (is some γ's ``E[γ] / cost(γ)`` above a plain step's
``1 / plain_cost``?); the *step* MLP reads the step vector after the draft's first proposal
and picks γ >= 1 with the most expected tokens per unit of cost, where ``costs[γ]`` is the
machine's measured time for that step.

Feature scaling is a buffer of each network, so the exported graph takes raw features.

Written for the latency of the exported graph at batch 1, where each ONNX node costs a few
hundred nanoseconds whatever its size: the hidden activation is ReLU, which onnxruntime fuses
into the Gemm before it (GELU stays a node of its own; checkpoints from before
``activation`` existed load as GELU), and the two cumulative sums of the survival head are
products with constant triangular matrices, the second with the ``1 +`` as its bias (one Gemm
instead of CumSum, Gather and Add).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: hidden activations by name (``mlp_config["activation"]``; absent means GELU, the first one)
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class SurvivalMLP(nn.Module):
    """Feature vector -> per-depth continuation logits (hazard form of the survival curve).

    ``gamma_max`` is the number of logits: one per depth of each curve the controller
    predicts (the chains' γmax, then each tree's depth; :func:`option_layout`)."""

    def __init__(self, n_features: int, gamma_max: int, hidden: Sequence[int] = (32, 32),
                 dropout: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
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
    """``E[tokens | γ] = 1 + sum_{k<=γ} s_k`` for each candidate γ: ``[batch, len(gammas)]``
    (the chains' curve, the first ``max γ`` entries of ``survival``)."""
    csum = torch.cumsum(survival[..., : max(gammas)], dim=-1)
    idx = torch.as_tensor([g - 1 for g in gammas], dtype=torch.long, device=survival.device)
    return 1.0 + csum.index_select(-1, idx)


def speculate_rule(expected: torch.Tensor, costs: torch.Tensor,
                   plain_cost: torch.Tensor) -> torch.Tensor:
    """True where some γ beats a plain step: ``max_γ E[γ] / cost(γ) > 1 / plain_cost``.

    ``plain_cost`` is ``[batch, 1]``; a tie goes to the plain step (it is the simpler one).
    """
    best = torch.amax(expected / costs, dim=-1, keepdim=True)
    return (best * plain_cost > 1.0)[:, 0]


def option_layout(gammas: Sequence[int], trees: Sequence[Sequence[int]] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's option layout (:mod:`speckv.runtime.contract`) as tensors: the codes
    ``[n_options]``, ``upto`` ``[W, W]`` (the cumulative sums within each survival curve) and
    the option matrix ``[W, n_options]`` (``E[tokens | option] = 1 + survival @ it``)."""
    from speckv.runtime.contract import option_codes, option_matrix, upto_matrix

    return (torch.as_tensor(option_codes(gammas, trees), dtype=torch.long),
            torch.from_numpy(upto_matrix(gammas, trees)),
            torch.from_numpy(option_matrix(gammas, trees)))


def log_survival(z: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
    """``log s`` of every curve in ``z`` ``[batch, W]`` (cumulative sums within each)."""
    return F.logsigmoid(z) @ upto


class ControllerGraph(nn.Module):
    """The step decision alone: (features, costs) -> (option, expected tokens, survival).

    The options are the chains of ``gammas`` and then ``trees`` (``(size, depth, branch)``
    each); the MLPs predict one survival curve per family (:func:`option_layout`). With
    ``pre_mlp`` it also offers :meth:`pre` (the pre-draft decision).
    """

    def __init__(self, mlp: SurvivalMLP, gammas: Sequence[int],
                 pre_mlp: SurvivalMLP | None = None,
                 trees: Sequence[Sequence[int]] = (),
                 lookup_mlp: SurvivalMLP | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.pre_mlp = pre_mlp
        self.lookup_mlp = lookup_mlp
        if lookup_mlp is not None:
            width = lookup_mlp.gamma_max
            self.register_buffer("lookup_upto", torch.triu(torch.ones(width, width)))
            # k = 1..width, against the continuation's length (lookup_features[:, 0])
            self.register_buffer("lookup_k", torch.arange(1, width + 1, dtype=torch.float32)[None])
        codes, upto, options = option_layout(gammas, trees)
        if upto.shape[0] != mlp.gamma_max:
            raise ValueError(f"the MLP predicts {mlp.gamma_max} survival entries; γs "
                             f"{list(gammas)} and trees {list(trees)} need {upto.shape[0]}.")
        self.register_buffer("gammas", codes)
        # x @ upto is the cumulative sum of x within each survival curve
        self.register_buffer("upto", upto)
        # 1 + survival @ upto_gammas = E[tokens | option]
        self.register_buffer("upto_gammas", options)
        self.register_buffer("one", torch.ones(1, len(codes)))

    def _expected(self, mlp: SurvivalMLP, x: torch.Tensor):
        survival = torch.exp(F.logsigmoid(mlp(x)) @ self.upto)
        return torch.addmm(self.one, survival, self.upto_gammas), survival

    def forward(self, features: torch.Tensor, costs: torch.Tensor):
        expected, survival = self._expected(self.mlp, features)
        best = torch.argmax(expected / costs, dim=-1)
        return self.gammas.index_select(0, best), expected, survival

    def pre(self, pre_features: torch.Tensor, costs: torch.Tensor, plain_cost: torch.Tensor):
        """(speculate as int64, expected tokens, survival) of the pre-draft decision."""
        if self.pre_mlp is None:
            raise ValueError("this controller has no pre-draft network (trained before the "
                             "decision not to speculate existed): retrain it.")
        expected, survival = self._expected(self.pre_mlp, pre_features)
        return speculate_rule(expected, costs, plain_cost).to(torch.long), expected, survival


    def lookup(self, lookup_features: torch.Tensor, lookup_cost: torch.Tensor,
               pre_expected: torch.Tensor, costs: torch.Tensor, plain_cost: torch.Tensor):
        """(verify the lookup's continuation as int64, its expected tokens ``[batch, 1]``, its
        survival curve); ``pre_expected`` is the pre-draft head's expected tokens."""
        if self.lookup_mlp is None:
            raise ValueError("this controller has no lookup network (trained before the "
                             "lookup decision existed): retrain it.")
        survival = torch.exp(F.logsigmoid(self.lookup_mlp(lookup_features)) @ self.lookup_upto)
        expected = lookup_expected(survival, self.lookup_k, lookup_features[:, :1])
        take = lookup_rule(expected, lookup_cost, pre_expected, costs, plain_cost)
        return take.to(torch.long), expected, survival


class ExportGraph(nn.Module):
    """What ``speckv export`` writes (contract format 4, :mod:`speckv.runtime.contract`)::

        (features, pre_features, costs, plain_cost, lookup_features, lookup_cost)
            -> (speculate, gamma, expected_tokens, survival, pre_expected_tokens, pre_survival,
                lookup, lookup_expected_tokens, lookup_survival)
    """

    def __init__(self, graph: ControllerGraph) -> None:
        super().__init__()
        if graph.pre_mlp is None or graph.lookup_mlp is None:
            raise ValueError("the controller lacks the pre-draft or the lookup network; "
                             "retrain it.")
        self.controller = graph

    def forward(self, features: torch.Tensor, pre_features: torch.Tensor, costs: torch.Tensor,
                plain_cost: torch.Tensor, lookup_features: torch.Tensor,
                lookup_cost: torch.Tensor):
        gamma, expected, survival = self.controller(features, costs)
        speculate, pre_expected, pre_survival = self.controller.pre(pre_features, costs,
                                                                    plain_cost)
        lookup, lookup_expected, lookup_survival = self.controller.lookup(
            lookup_features, lookup_cost, pre_expected, costs, plain_cost)
        return (speculate, gamma, expected, survival, pre_expected, pre_survival, lookup,
                lookup_expected, lookup_survival)


def lookup_expected(survival: torch.Tensor, k: torch.Tensor, length: torch.Tensor
                    ) -> torch.Tensor:
    """``[batch, 1]`` E[tokens | verify the lookup's continuation] = 1 + the first ``length``
    entries of its survival curve; ``k`` holds 1..width, ``length`` is ``[batch, 1]``."""
    within = (k <= length).to(survival.dtype)
    return 1.0 + torch.sum(survival * within, dim=-1, keepdim=True)


def lookup_rule(expected: torch.Tensor, lookup_cost: torch.Tensor, pre_expected: torch.Tensor,
                costs: torch.Tensor, plain_cost: torch.Tensor) -> torch.Tensor:
    """True where verifying the lookup's continuation beats the other choices before the
    draft runs: ``E_lookup / lookup_cost > max(1 / plain_cost, max_o E_pre[o] / cost(o))``.

    ``expected``, ``lookup_cost`` and ``plain_cost`` are ``[batch, 1]``; a tie goes to the
    draft's side (the decision ``speculate`` would make).
    """
    best = torch.maximum(torch.amax(pre_expected / costs, dim=-1, keepdim=True), 1.0 / plain_cost)
    return (expected / lookup_cost > best)[:, 0]


def load_checkpoint(path) -> tuple[SurvivalMLP, dict]:
    """Read a training checkpoint into the plain step MLP and speckv's metadata.

    A checkpoint written by :class:`speckv.train.module.SpeckvModule` carries, under the key
    ``"speckv"``: ``mlp_config`` ({n_features, gamma_max, hidden}), ``feature_names``,
    ``gammas``, ``compressions``, ``feature_set``, ``objective``, ``data_fingerprint`` and
    ``parity_features`` / ``parity_costs`` (held-out rows for the export's parity check);
    since format 2 also ``pre_mlp_config``, ``pre_feature_names``, ``max_skip_run`` and
    ``parity_pre_features`` / ``parity_plain_costs``. The step MLP's weights are the
    ``state_dict`` entries prefixed ``mlp.``, the pre-draft MLP's ``pre_mlp.``; the latter is
    returned in the metadata as ``meta["pre_mlp"]`` (absent in older checkpoints). Since
    format 4 also ``lookup_mlp_config``, ``lookup_feature_names`` and
    ``parity_lookup_features`` / ``parity_lookup_costs``; the lookup MLP (prefix
    ``lookup_mlp.``) is returned as ``meta["lookup_mlp"]``.
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
    meta = dict(meta)
    nets = {}
    for prefix, key in (("mlp.", "mlp_config"), ("pre_mlp.", "pre_mlp_config"),
                        ("lookup_mlp.", "lookup_mlp_config")):
        if key not in meta:
            continue
        net = SurvivalMLP(**meta[key])
        net.load_state_dict({k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items()
                             if k.startswith(prefix)})
        nets[prefix] = net.eval()
    if "mlp." not in nets:
        raise SpeckvError(f"{path} has no mlp_config in its speckv entry; retrain it.")
    if "pre_mlp." in nets:
        meta["pre_mlp"] = nets["pre_mlp."]
    if "lookup_mlp." in nets:
        meta["lookup_mlp"] = nets["lookup_mlp."]
    return nets["mlp."], meta
