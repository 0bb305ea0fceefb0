"""The same controller in numpy alone, read from the ONNX file's initializers.

A second, independent implementation of what the exported graph computes: the parity check
of the runtime, and the numpy column of ``speckv bench-controller`` (is onnxruntime worth it
over a few matrix products in numpy?). It understands the graphs ``speckv export`` writes:
for each of the three inputs ``features``, ``pre_features`` and ``lookup_features``, optional
feature scaling (Sub, Div) and dense layers (Gemm, each optionally followed by Relu or Gelu),
then the fixed heads

    s = exp(cumsum(logsigmoid(z))),  E[γ] = 1 + cumsum(s)[γ - 1]
    γ* = argmax_γ E[γ] / cost[γ]                          (from the step vector)
    speculate = max_γ E_pre[γ] / cost[γ] · plain_cost > 1  (from the pre-draft vector)
    lookup = E_lookup / lookup_cost > max(max_γ E_pre[γ] / cost[γ], 1 / plain_cost)
             with E_lookup = 1 + sum_{k <= lookup_length} s_lookup[k]

(the heads' nodes are checked by type; their meaning is
:class:`speckv.train.network.ExportGraph`'s).
"""

from __future__ import annotations

import math
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from speckv.runtime import onnx_proto
from speckv.runtime.contract import (
    COSTS,
    FEATURES,
    LOOKUP_COST,
    LOOKUP_FEATURES,
    PLAIN_COST,
    PRE_FEATURES,
    ControllerInfo,
)
from speckv.runtime.controller import (
    SPECKV_TREES,
    InputRow,
    LookupPrediction,
    Prediction,
    PrePrediction,
    batch_inputs,
    check_expected,
    check_lookup_length,
    option_labels,
    read_controller_bytes,
    read_model,
)
from speckv.runtime.errors import ControllerFormatError
from speckv.runtime.features import (
    FEATURE_NAMES,
    GAMMAS,
    LOOKUP_FEATURE_NAMES,
    PRE_FEATURE_NAMES,
)

#: node types the head may contain (the survival curve, expected tokens and the argmax).
HEAD_OPS: Final = frozenset({"Sigmoid", "Log", "CumSum", "MatMul", "Gemm", "Exp", "Gather",
                             "Add", "Div", "ArgMax", "Reshape", "Identity", "ReduceMax", "Mul",
                             "Greater", "Cast", "Squeeze", "Slice", "Constant", "Neg", "Softplus",
                             "LessOrEqual", "ReduceSum", "Max", "Reciprocal"})
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
    #: None, "relu", "none" (exact GELU) or "tanh" (approximate GELU)
    activation: str | None = None


@dataclass(frozen=True)
class Network:
    """One input's scaling and dense layers, as read from the graph."""

    mean: np.ndarray | None
    std: np.ndarray | None
    layers: tuple[Dense, ...]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The continuation logits ``z`` ``[b, gamma_max]`` for raw features ``[b, n]``."""
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        for layer in self.layers:
            x = x @ layer.weight + layer.bias
            if layer.activation == "relu":
                x = np.maximum(x, np.float32(0.0))
            elif layer.activation is not None:
                x = gelu(x, layer.activation)
        return x


class NumpyController:
    """A speckv controller evaluated with numpy: same interface as the onnxruntime one."""

    def __init__(self, model: onnx_proto.Model, info: ControllerInfo,
                 source: str = "<controller>") -> None:
        self.info = info
        self.source = source
        self.step, self.pre, self.lookup = _read_networks(model, info, source)
        self._upto = info.upto().astype(np.float64)
        self._options = info.option_matrix().astype(np.float64)
        self._gammas = np.asarray(info.codes, np.int64)
        self._names = {FEATURES: info.feature_names, PRE_FEATURES: info.pre_feature_names,
                       COSTS: option_labels(info), PLAIN_COST: ("plain",),
                       LOOKUP_FEATURES: info.lookup_feature_names, LOOKUP_COST: ("lookup",)}
        self._local = threading.local()

    @classmethod
    def load(cls, path: str | os.PathLike[str], *,
             expected_features: Sequence[str] | None = FEATURE_NAMES,
             expected_gammas: Sequence[int] | None = GAMMAS,
             expected_pre_features: Sequence[str] | None = PRE_FEATURE_NAMES,
             expected_trees: Sequence[Sequence[int]] | None = SPECKV_TREES,
             expected_lookup_features: Sequence[str] | None = LOOKUP_FEATURE_NAMES
             ) -> NumpyController:
        """Read an exported controller, with the same checks as ``Controller.load``."""
        path, data = read_controller_bytes(path)
        source = str(path)
        model, info = read_model(data, source)
        check_expected(info, source, expected_features, expected_gammas, expected_pre_features,
                       expected_trees, expected_lookup_features)
        return cls(model, info, source)

    def _expected(self, net: Network, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = net.logits(x)
        # the survival curves: cumulative sums of log sigmoid(z) within each family
        survival = np.exp(-np.logaddexp(np.float32(0.0), -z) @ self._upto)
        return 1.0 + survival @ self._options, survival

    def forward(self, features: np.ndarray, costs: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(γ, expected tokens, survival) for checked float32 ``[b, n]`` and ``[b, g]``."""
        expected, survival = self._expected(self.step, features)
        gamma = self._gammas[np.argmax(expected / costs, axis=-1)]
        return gamma, expected.astype(np.float32), survival.astype(np.float32)

    def forward_pre(self, pre_features: np.ndarray, costs: np.ndarray, plain_cost: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(speculate, expected tokens, survival) for checked ``[b, m]``, ``[b, g]``, ``[b, 1]``."""
        expected, survival = self._expected(self.pre, pre_features)
        best = np.max((expected / costs).astype(np.float32), axis=-1)
        speculate = best * plain_cost[:, 0] > 1.0
        return speculate, expected.astype(np.float32), survival.astype(np.float32)

    def forward_lookup(self, lookup_features: np.ndarray, lookup_cost: np.ndarray,
                       pre_features: np.ndarray, costs: np.ndarray, plain_cost: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lookup, expected tokens, survival) for checked ``[b, k]``, ``[b, 1]``, ``[b, m]``,
        ``[b, g]``, ``[b, 1]``."""
        z = self.lookup.logits(lookup_features)
        survival = np.exp(np.cumsum(-np.logaddexp(np.float32(0.0), -z), axis=-1))
        k = np.arange(1, z.shape[1] + 1)
        within = k[None] <= lookup_features[:, :1]
        expected = 1.0 + np.sum(survival * within, axis=-1, keepdims=True)
        pre_expected, _ = self._expected(self.pre, pre_features)
        best = np.maximum(np.max((pre_expected / costs).astype(np.float32), axis=-1),
                          np.float32(1.0) / plain_cost[:, 0])
        lookup = (expected[:, 0] / lookup_cost[:, 0]).astype(np.float32) > best
        return lookup, expected.astype(np.float32), survival.astype(np.float32)

    def _lookup_inputs(self, lookup_features, lookup_cost, pre_features, costs, plain_cost
                       ) -> list[np.ndarray]:
        info = self.info
        lf, p, lc, c, q = batch_inputs(
            ((LOOKUP_FEATURES, len(info.lookup_feature_names), lookup_features),
             (PRE_FEATURES, len(info.pre_feature_names), pre_features),
             (LOOKUP_COST, 1, lookup_cost), (COSTS, info.n_options, costs),
             (PLAIN_COST, 1, plain_cost)), self._names)
        check_lookup_length(lf[:, 0], info.lookup_max_tokens)
        return [lf, lc, p, c, q]

    def use_lookup(self, lookup_features, lookup_cost: float, pre_features, costs,
                   plain_cost: float) -> bool:
        """The lookup decision for one step (same inputs as ``Controller.use_lookup``)."""
        return bool(self.forward_lookup(*self._lookup_inputs(
            lookup_features, lookup_cost, pre_features, costs, plain_cost))[0][0])

    def predict_lookup(self, lookup_features, lookup_cost, pre_features, costs, plain_cost
                       ) -> LookupPrediction:
        """Like ``Controller.predict_lookup``."""
        return LookupPrediction(*self.forward_lookup(*self._lookup_inputs(
            lookup_features, lookup_cost, pre_features, costs, plain_cost)))

    def _step_inputs(self, features, costs) -> list[np.ndarray]:
        info = self.info
        return batch_inputs(((FEATURES, len(info.feature_names), features),
                             (COSTS, info.n_options, costs)), self._names)

    def _pre_inputs(self, pre_features, costs, plain_cost) -> list[np.ndarray]:
        info = self.info
        return batch_inputs(((PRE_FEATURES, len(info.pre_feature_names), pre_features),
                             (COSTS, info.n_options, costs), (PLAIN_COST, 1, plain_cost)),
                            self._names)

    def _row(self, kind: str) -> InputRow:
        """This thread's preallocated row for one decision of ``kind`` ("step" or "pre")."""
        rows = getattr(self._local, "rows", None)
        if rows is None:
            info = self.info
            g = info.n_options
            rows = self._local.rows = {
                "step": InputRow(((FEATURES, len(info.feature_names)), (COSTS, g)), COSTS,
                                 self._names),
                "pre": InputRow(((PRE_FEATURES, len(info.pre_feature_names)), (COSTS, g),
                                 (PLAIN_COST, 1)), COSTS, self._names)}
        return rows[kind]

    def choose(self, features: np.ndarray | Sequence[float],
               costs: np.ndarray | Sequence[float]) -> int:
        """γ for one decision (same checks as ``Controller.choose``)."""
        row = self._row("step")
        row.fill(features, costs)
        return int(self.forward(row.view(FEATURES)[None], row.view(COSTS)[None])[0][0])

    def speculate(self, pre_features: np.ndarray | Sequence[float],
                  costs: np.ndarray | Sequence[float], plain_cost: float) -> bool:
        """The pre-draft decision for one step (same checks as ``Controller.speculate``)."""
        row = self._row("pre")
        row.fill(pre_features, costs, plain_cost)
        return bool(self.forward_pre(row.view(PRE_FEATURES)[None], row.view(COSTS)[None],
                                     row.view(PLAIN_COST)[None])[0][0])

    def choose_batch(self, features: np.ndarray | Sequence[Sequence[float]],
                     costs: np.ndarray | Sequence[float]) -> np.ndarray:
        """γ for each row: ``[b, n]`` and ``[b, g]`` or ``[g]`` -> int64 ``[b]``."""
        return self.forward(*self._step_inputs(features, costs))[0]

    def speculate_batch(self, pre_features, costs, plain_cost) -> np.ndarray:
        """The pre-draft decision for each row -> bool ``[b]``."""
        return self.forward_pre(*self._pre_inputs(pre_features, costs, plain_cost))[0]

    def predict(self, features: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
                costs: np.ndarray | Sequence[float]) -> Prediction:
        """γ, expected tokens and survival, with a batch axis (like ``Controller.predict``)."""
        return Prediction(*self.forward(*self._step_inputs(features, costs)))

    def predict_pre(self, pre_features, costs, plain_cost) -> PrePrediction:
        """Like ``Controller.predict_pre``."""
        return PrePrediction(*self.forward_pre(*self._pre_inputs(pre_features, costs,
                                                                 plain_cost)))


def _read_networks(model: onnx_proto.Model, info: ControllerInfo, source: str
                   ) -> tuple[Network, Network, Network]:
    """The step, pre-draft and lookup networks; every node outside them must be a head
    operator."""
    walked: set[int] = set()
    step = _read_layers(model, info, source, FEATURES, walked)
    pre = _read_layers(model, info, source, PRE_FEATURES, walked)
    lookup = _read_layers(model, info, source, LOOKUP_FEATURES, walked,
                          width=info.lookup_max_tokens)
    head = {node.op_type for node in model.nodes if id(node) not in walked}
    if not head <= HEAD_OPS:
        raise ControllerFormatError(
            f"{source}: the numpy reference cannot read this graph (unknown operators "
            f"{sorted(head - HEAD_OPS)} in the head); it reads graphs written by "
            "`speckv export`.")
    return step, pre, lookup


#: the layers' node types (an input's other readers, e.g. the slice of lookup_length, are
#: part of the head)
_LAYER_OPS: Final = frozenset({"Sub", "Div", "Gemm", "Gelu", "Relu"})


def _read_layers(model: onnx_proto.Model, info: ControllerInfo, source: str, start: str,
                 walked: set[int], width: int | None = None) -> Network:
    """Walk the graph from input ``start`` through scaling and dense layers to the logits."""
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
    current = start
    while True:
        readers = users[current]
        if current == start:  # the raw input may also feed the head
            readers = [n for n in readers if n.op_type in _LAYER_OPS]
        if len(readers) != 1:
            break
        node = readers[0]
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
        elif node.op_type == "Relu" and layers and layers[-1].activation is None:
            layers[-1] = Dense(layers[-1].weight, layers[-1].bias, "relu")
        else:
            break
        walked.add(id(node))
        current = node.outputs[0]
    if not layers:
        raise fail(f"no dense layer after {start}")
    width = info.survival_width if width is None else width
    if layers[-1].weight.shape[1] != width or layers[-1].activation is not None:
        raise fail(f"the last dense layer after {start} has {layers[-1].weight.shape[1]} "
                   f"outputs and activation {layers[-1].activation}, not {width} logits")
    return Network(mean, std, tuple(layers))
