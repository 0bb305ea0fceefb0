"""The same controller in numpy alone, read from the ONNX file's initializers.

A second, independent implementation of what the exported graph computes: the parity check
of the runtime, and the numpy column of ``speckv bench-controller`` (is onnxruntime worth it
over a few matrix products in numpy?). It understands the graphs ``speckv export`` writes:
optional feature scaling (Sub, Div), dense layers (Gemm, each optionally followed by Gelu),
then the fixed head

    s = exp(cumsum(logsigmoid(z))),  E[γ] = 1 + cumsum(s)[γ - 1],  γ* = argmax_γ E[γ] / cost[γ]

(the head's nodes are checked by type; its meaning is
:class:`speckv.train.network.ControllerGraph`'s).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from speckv.runtime import onnx_proto
from speckv.runtime.contract import FEATURES, ControllerInfo
from speckv.runtime.controller import (
    InputRow,
    Prediction,
    batch_inputs,
    check_expected,
    read_controller_bytes,
)
from speckv.runtime.errors import ControllerFormatError
from speckv.runtime.features import FEATURE_NAMES, GAMMAS

#: node types the head may contain (the survival curve, expected tokens and the argmax).
HEAD_OPS: Final = frozenset({"Sigmoid", "Log", "CumSum", "Exp", "Gather", "Add", "Div",
                             "ArgMax", "Reshape", "Identity"})
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - poly(t) exp(-x^2), t = 1/(1 + p x), x >= 0; its
# absolute error is below 1.5e-7, under float32's resolution of the GELU it feeds.
_ERF_P: Final = 0.3275911
_ERF_A: Final = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
_SQRT_HALF: Final = math.sqrt(0.5)
_TANH_C: Final = math.sqrt(2.0 / math.pi)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise error function in numpy (no scipy), to within 1.5e-7."""
    a = np.abs(x)
    t = 1.0 / (1.0 + _ERF_P * a)
    poly = np.zeros_like(t)
    for coef in _ERF_A:
        poly = (poly + coef) * t
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU as ONNX defines it: exact (erf) or the tanh approximation."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(_TANH_C * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


@dataclass(frozen=True)
class Dense:
    """``y = act(x @ weight + bias)``; ``weight`` is ``[in, out]``."""

    weight: np.ndarray
    bias: np.ndarray
    activation: str | None = None  # None, "none" (exact GELU) or "tanh" (approximate GELU)


class NumpyController:
    """A speckv controller evaluated with numpy: same interface as the onnxruntime one."""

    def __init__(self, model: onnx_proto.Model, info: ControllerInfo,
                 source: str = "<controller>") -> None:
        self.info = info
        self.source = source
        self.mean, self.std, self.layers = _read_layers(model, info, source)
        self._index = np.asarray([g - 1 for g in info.gammas], np.intp)
        self._gammas = np.asarray(info.gammas, np.int64)
        self._row = InputRow(info.feature_names, info.gammas)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *,
             expected_features: Sequence[str] | None = FEATURE_NAMES,
             expected_gammas: Sequence[int] | None = GAMMAS) -> NumpyController:
        """Read an exported controller, with the same checks as ``Controller.load``."""
        path, data = read_controller_bytes(path)
        source = str(path)
        try:
            model = onnx_proto.parse_model(data)
        except onnx_proto.ProtoError as exc:
            raise ControllerFormatError(
                f"{source} is not an ONNX model ({exc}). Pass a controller written by "
                "`python -m speckv export`.") from None
        info = ControllerInfo.from_metadata(model.metadata, source=source)
        check_expected(info, source, expected_features, expected_gammas)
        return cls(model, info, source)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The MLP's continuation logits ``z`` ``[b, gamma_max]`` for raw features ``[b, n]``."""
        x = features
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        for layer in self.layers:
            x = x @ layer.weight + layer.bias
            if layer.activation is not None:
                x = gelu(x, layer.activation)
        return x

    def forward(self, features: np.ndarray, costs: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(γ, expected tokens, survival) for checked float32 ``[b, n]`` and ``[b, g]``."""
        z = self.logits(features)
        survival = np.exp(np.cumsum(-np.logaddexp(np.float32(0.0), -z), axis=-1))
        expected = 1.0 + np.cumsum(survival, axis=-1)[:, self._index]
        gamma = self._gammas[np.argmax(expected / costs, axis=-1)]
        return gamma, expected.astype(np.float32), survival.astype(np.float32)

    def choose(self, features: np.ndarray | Sequence[float],
               costs: np.ndarray | Sequence[float]) -> int:
        """γ for one decision (same checks as ``Controller.choose``)."""
        row = self._row
        row.fill(features, costs)
        return int(self.forward(row.features[None], row.costs[None])[0][0])

    def choose_batch(self, features: np.ndarray | Sequence[Sequence[float]],
                     costs: np.ndarray | Sequence[float]) -> np.ndarray:
        """γ for each row: ``[b, n]`` and ``[b, g]`` or ``[g]`` -> int64 ``[b]``."""
        f, c = batch_inputs(features, costs, self.info.feature_names, self.info.gammas)
        return self.forward(f, c)[0]

    def predict(self, features: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
                costs: np.ndarray | Sequence[float]) -> Prediction:
        """γ, expected tokens and survival, with a batch axis (like ``Controller.predict``)."""
        f, c = batch_inputs(features, costs, self.info.feature_names, self.info.gammas)
        return Prediction(*self.forward(f, c))


def _read_layers(model: onnx_proto.Model, info: ControllerInfo, source: str
                 ) -> tuple[np.ndarray | None, np.ndarray | None, list[Dense]]:
    """Walk the graph from ``features`` through scaling and dense layers to the logits."""
    inits = model.initializers
    users: dict[str, list[onnx_proto.Node]] = defaultdict(list)
    for node in model.nodes:
        for name in node.inputs:
            users[name].append(node)

    def fail(why: str) -> ControllerFormatError:
        return ControllerFormatError(f"{source}: the numpy reference cannot read this graph "
                                     f"({why}); it reads graphs written by `speckv export`.")

    def const(node: onnx_proto.Node, i: int) -> np.ndarray:
        if len(node.inputs) <= i or node.inputs[i] not in inits:
            raise fail(f"{node.op_type} input {i} is not a constant")
        return inits[node.inputs[i]].astype(np.float32)

    mean = std = None
    layers: list[Dense] = []
    walked: set[int] = set()
    current = FEATURES
    while len(users[current]) == 1:
        node = users[current][0]
        if node.op_type == "Sub" and not layers and mean is None and std is None:
            mean = const(node, 1)
        elif node.op_type == "Div" and not layers and std is None:
            std = const(node, 1)
        elif node.op_type == "Gemm":
            if node.attrs.get("transA", 0) or node.inputs[0] != current:
                raise fail("a Gemm with transA or the activation as second operand")
            weight = const(node, 1)
            weight = weight.T if node.attrs.get("transB", 0) else weight
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            bias = const(node, 2) if len(node.inputs) > 2 else np.zeros(weight.shape[1])
            layers.append(Dense(np.ascontiguousarray(alpha * weight, np.float32),
                                (beta * bias).astype(np.float32)))
        elif node.op_type == "Gelu" and layers and layers[-1].activation is None:
            approx = node.attrs.get("approximate", b"none")
            approx = approx.decode() if isinstance(approx, bytes) else str(approx)
            layers[-1] = Dense(layers[-1].weight, layers[-1].bias, approx)
        else:
            break
        walked.add(id(node))
        current = node.outputs[0]
    if not layers:
        raise fail("no dense layer after the features")
    if layers[-1].weight.shape[1] != info.gamma_max or layers[-1].activation is not None:
        raise fail(f"the last dense layer has {layers[-1].weight.shape[1]} outputs and "
                   f"activation {layers[-1].activation}, not {info.gamma_max} logits")
    head = {node.op_type for node in model.nodes if id(node) not in walked}
    if not head <= HEAD_OPS:
        raise fail(f"unknown operators {sorted(head - HEAD_OPS)} in the head")
    return mean, std, layers
