"""``speckv export``: a training checkpoint -> the ONNX controller the runtime runs.

The exported graph is :class:`speckv.train.network.ExportGraph` (contract format 4, see
:mod:`speckv.runtime.contract`): the step, pre-draft and lookup feature vectors, the cost of
each option, of a plain step and of verifying the lookup's continuation in; the decision to
verify the lookup's continuation, the decision to speculate, the chosen option (argmax of
expected tokens per unit cost, inside the graph), the expected tokens and the survival curves
of the three networks out. Feature scaling is baked in, the batch axis is dynamic, and the file
carries speckv's metadata.

How it is made:

1. ``torch.onnx.export(..., dynamo=True)`` at opset 20. The network is written for few nodes
   at batch 1 (:mod:`speckv.train.network`): ReLU layers, which onnxruntime fuses into their
   Gemm (GELU, still read for older checkpoints, is one ``Gelu`` node at this opset), and
   the survival head's cumulative sums as products with triangular constants. torch 2.13's
   TorchScript exporter (``dynamo=False``) also handles this graph but is deprecated.
2. Hand simplification for latency (a few hundred nanoseconds per node at batch 1): each
   input's feature scaling is folded into its first Gemm, an index Gather that selects every column
   and a Reshape to [-1] of a vector are removed, unused initializers dropped, the exporter's
   annotations stripped. The mean is folded into the Gemm's bias only where that is
   numerically harmless (|mean| / std small; a feature constant in training is not).
3. Checks: ``onnx.checker`` (full), opset, no float64 anywhere, speckv's signature.
4. The file is written to a temporary name beside ``--out``, loaded by the runtime
   :class:`speckv.runtime.Controller`, compared with PyTorch on the checkpoint's held-out
   parity rows (every decision, batch calls and the one-decision hot path), timed, and only
   then renamed over
   ``--out``. A failed export leaves no partial file and keeps the previous one.
5. Its metadata is written beside it as JSON (``NAME.json``, :mod:`speckv.runtime.sidecar`),
   with the file's SHA-256, for clients whose onnxruntime has no metadata API.

torch and onnx are imported when an export runs, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

import speckv
from speckv import paths
from speckv.atomic import atomic_write
from speckv.errors import SpeckvError
from speckv.runtime.contract import (
    COSTS,
    EXPECTED_TOKENS,
    FEATURES,
    FORMAT_VERSION,
    GAMMA,
    INPUT_NAMES,
    LOOKUP,
    LOOKUP_COST,
    LOOKUP_EXPECTED_TOKENS,
    LOOKUP_FEATURES,
    LOOKUP_SURVIVAL,
    OUTPUT_NAMES,
    PLAIN_COST,
    PRE_EXPECTED_TOKENS,
    PRE_FEATURES,
    PRE_SURVIVAL,
    RETRAIN,
    SPECULATE,
    SURVIVAL,
    ControllerInfo,
    survival_width,
)
from speckv.runtime.features import (
    COMPRESSIONS,
    LOOKUP_FEATURE_NAMES,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
)
from speckv.runtime.sidecar import write_sidecar

if TYPE_CHECKING:
    import onnx

    from speckv.train.network import SurvivalMLP

log = logging.getLogger(__name__)

OPSET: Final = 20
MIN_OPSET: Final = 17
DEFAULT_OUT: Final = Path(paths.DEFAULT_CONTROLLER)
DEFAULT_LOG_DIR: Final = Path(paths.LOG_DIR)
#: largest |expected tokens| and |survival| difference to PyTorch the export accepts.
PARITY_ATOL: Final = 1e-4
#: a γ that differs from PyTorch's is a tie, not an error, when the two candidates' expected
#: tokens per cost differ by less than this (relative) in PyTorch's own numbers.
TIE_RTOL: Final = 1e-5
#: fold the feature mean into the first Gemm's bias only when max |mean| / std is below this:
#: the folded bias then loses at most ~1e-5 (relative) to float32 rounding.
FOLD_MAX_OFFSET: Final = 100.0
SYNTHETIC_PARITY_ROWS: Final = 256
LATENCY_CALLS: Final = 5000
LATENCY_WARMUP: Final = 500
_DOUBLE: Final = 11  # onnx.TensorProto.DOUBLE


class ExportError(SpeckvError):
    """The checkpoint cannot be exported, or the exported graph fails a check."""


# ----------------------------------------------------------------------------- checkpoint
def find_checkpoint(path: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint to export: ``path`` itself, else the newest readable ``*.ckpt`` under it
    (a damaged newer one, e.g. from a run killed while saving, is skipped with a warning).

    ``None`` searches ``lightning_logs/`` (Lightning's default run folder) in the current
    directory.
    """
    from speckv.train.checkpoint import newest_readable

    root = DEFAULT_LOG_DIR if path is None else Path(path)
    if root.is_file():
        return root
    if not root.exists():
        if path is None:
            raise ExportError(f"No checkpoint given and no {DEFAULT_LOG_DIR}/ here. Train one "
                              "with `python -m speckv.train fit`, or pass --ckpt CHECKPOINT.")
        raise ExportError(f"Checkpoint {root} does not exist. Pass a .ckpt file or a training "
                          "run's folder with --ckpt.")
    found = list(root.rglob("*.ckpt"))
    if not found:
        raise ExportError(f"{root}/ holds no *.ckpt file. Train with `python -m speckv.train "
                          "fit`, or pass the checkpoint file with --ckpt.")
    newest, skipped = newest_readable(found, weights_only=False)
    if newest is None:
        listed = "; ".join(f"{p} ({why})" for p, why in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise ExportError(f"No checkpoint under {root}/ can be read: {listed}{more}. Train "
                          "again with `python -m speckv.train fit`.")
    return newest


def controller_info(mlp: SurvivalMLP, meta: Mapping[str, Any]) -> ControllerInfo:
    """The file's metadata from a checkpoint's ``speckv`` entry, checked against the MLPs.

    Required: ``feature_names``, ``gammas``, the pre-draft network ``pre_mlp`` and the lookup
    network ``lookup_mlp`` (what :func:`speckv.train.network.load_checkpoint` returns in the
    metadata). ``lookup_feature_names`` defaults to speckv's.
    ``pre_feature_names`` defaults to speckv's, ``max_skip_run`` to
    :data:`speckv.runtime.features.MAX_SKIP_RUN`, ``compressions`` to speckv's,
    ``feature_set``, ``objective`` and ``data_fingerprint`` to ``"unknown"``.
    """
    pre_mlp = meta.get("pre_mlp")
    if pre_mlp is None:
        raise ExportError(
            "The checkpoint has no pre-draft network (the decision not to speculate, "
            f"controller format {FORMAT_VERSION}): it was trained before that existed. "
            + RETRAIN.format(path="export/speckv.onnx", version=1).replace(
                "retrain and re-export it", "Retrain and export it", 1) + ".")
    lookup_mlp = meta.get("lookup_mlp")
    if lookup_mlp is None:
        raise ExportError(
            "The checkpoint has no lookup network (the choice of the context lookup's "
            f"continuation, controller format {FORMAT_VERSION}): it was trained before that "
            "existed. " + RETRAIN.format(path="export/speckv.onnx", version=3).replace(
                "retrain and re-export it", "Retrain and export it", 1) + ".")
    lookup_names = tuple(str(n) for n in meta.get("lookup_feature_names")
                         or LOOKUP_FEATURE_NAMES)
    if len(lookup_names) != int(lookup_mlp.mean.numel()) or not lookup_names \
            or lookup_names[0] != LOOKUP_FEATURE_NAMES[0]:
        raise ExportError(f"The checkpoint lists lookup features {list(lookup_names)}, but its "
                          f"lookup MLP takes {int(lookup_mlp.mean.numel())} (the first must be "
                          f"{LOOKUP_FEATURE_NAMES[0]!r}). The checkpoint is inconsistent; "
                          "retrain.")
    names = tuple(str(n) for n in meta.get("feature_names") or ())
    pre_names = tuple(str(n) for n in meta.get("pre_feature_names") or PRE_FEATURE_NAMES)
    gammas = tuple(int(g) for g in meta.get("gammas") or ())
    trees = tuple(tuple(int(v) for v in t) for t in meta.get("trees") or ())
    n_features, gamma_max = int(mlp.mean.numel()), int(mlp.gamma_max)
    if len(names) != n_features:
        raise ExportError(f"The checkpoint lists {len(names)} feature names, but its MLP takes "
                          f"{n_features} features. The checkpoint's metadata is inconsistent; "
                          "retrain.")
    if len(pre_names) != int(pre_mlp.mean.numel()) or int(pre_mlp.gamma_max) != gamma_max:
        raise ExportError(f"The checkpoint lists {len(pre_names)} pre-draft feature names, but "
                          f"its pre-draft MLP takes {int(pre_mlp.mean.numel())} features (and "
                          f"predicts {int(pre_mlp.gamma_max)} depths, the step MLP "
                          f"{gamma_max}). The checkpoint is inconsistent; retrain.")
    for listed in (names, pre_names, lookup_names):
        if len(set(listed)) != len(listed):
            raise ExportError(f"The checkpoint repeats a feature name: {list(listed)}.")
    if not gammas or list(gammas) != sorted(set(gammas)) or gammas[0] < 1:
        raise ExportError(f"The checkpoint's candidate γs {list(gammas)} must be increasing "
                          "positive integers.")
    if survival_width(gammas, trees) != gamma_max:
        raise ExportError(f"The checkpoint's MLP predicts {gamma_max} survival entries, but "
                          f"its γs {list(gammas)} and trees {list(trees)} need "
                          f"{survival_width(gammas, trees)}. The checkpoint is inconsistent; "
                          "retrain.")
    return ControllerInfo(
        feature_names=names,
        pre_feature_names=pre_names,
        gammas=gammas,
        compressions=tuple(str(c) for c in meta.get("compressions") or COMPRESSIONS),
        feature_set=str(meta.get("feature_set", "unknown")),
        objective=str(meta.get("objective", "unknown")),
        data_fingerprint=str(meta.get("data_fingerprint", "unknown")),
        speckv_version=speckv.__version__,
        max_skip_run=int(meta.get("max_skip_run", MAX_SKIP_RUN)),
        trees=trees,
        lookup_feature_names=lookup_names,
        lookup_max_tokens=int(lookup_mlp.gamma_max),
        format_version=FORMAT_VERSION,
    )


@dataclass(frozen=True)
class ParityRows:
    """Inputs on which the written graph is compared with PyTorch (float32, one row each)."""

    features: np.ndarray  # [rows, n_features]
    pre_features: np.ndarray  # [rows, n_pre_features]
    costs: np.ndarray  # [rows, n_options]
    plain_cost: np.ndarray  # [rows, 1]
    lookup_features: np.ndarray  # [rows, n_lookup_features]
    lookup_cost: np.ndarray  # [rows, 1]
    source: str  # "checkpoint" or "synthetic"

    @property
    def inputs(self) -> tuple[np.ndarray, ...]:
        """In the graph's input order (:data:`speckv.runtime.contract.INPUT_NAMES`)."""
        return (self.features, self.pre_features, self.costs, self.plain_cost,
                self.lookup_features, self.lookup_cost)

    def __len__(self) -> int:
        return len(self.features)


def parity_rows(mlp: SurvivalMLP, meta: Mapping[str, Any], info: ControllerInfo) -> ParityRows:
    """The checkpoint's held-out ``parity_*`` rows, float32.

    Without them (a checkpoint from elsewhere), seeded synthetic rows around each MLP's
    feature scaling stand in, and the report says so.
    """
    n, m, g = len(info.feature_names), len(info.pre_feature_names), info.n_options
    k = len(info.lookup_feature_names)
    found = [meta.get(k) for k in ("parity_features", "parity_pre_features", "parity_costs",
                                   "parity_plain_costs", "parity_lookup_features",
                                   "parity_lookup_costs")]
    if all(v is not None for v in found):
        f, p, c, q, lf, lc = (np.asarray(v, dtype=np.float32) for v in found)
        q, lc = q.reshape(-1, 1), lc.reshape(-1, 1)
        rows = f.shape[0] if f.ndim == 2 else 0
        shapes = [a.shape for a in (f, p, c, q, lf, lc)]
        want = [(rows, w) for w in (n, m, g, 1, k, 1)]
        if not rows or shapes != want:
            raise ExportError(f"The checkpoint's parity rows have shapes {shapes}; expected "
                              f"{want}.")
        if not all(np.isfinite(a).all() for a in (f, p, c, q, lf, lc)) or (c <= 0).any() \
                or (q <= 0).any() or (lc <= 0).any():
            raise ExportError("The checkpoint's parity rows hold non-finite features or "
                              "costs <= 0; retrain with the current datamodule.")
        return ParityRows(f, p, c, q, lf, lc, "checkpoint")
    log.warning("the checkpoint carries no parity rows; checking parity on %d synthetic rows",
                SYNTHETIC_PARITY_ROWS)
    rng = np.random.default_rng(0)

    def around(net: Any, width: int) -> np.ndarray:
        mean = net.mean.detach().cpu().numpy().astype(np.float64)
        std = net.std.detach().cpu().numpy().astype(np.float64)
        return (mean + std * rng.standard_normal((SYNTHETIC_PARITY_ROWS, width))
                ).astype(np.float32)

    f, p = around(mlp, n), around(meta["pre_mlp"], m)
    c = np.sort(rng.uniform(0.01, 1.0, (SYNTHETIC_PARITY_ROWS, g)), axis=1).astype(np.float32)
    q = rng.uniform(0.005, 0.2, (SYNTHETIC_PARITY_ROWS, 1)).astype(np.float32)
    lf = around(meta["lookup_mlp"], k)
    lf[:, 0] = rng.integers(1, info.lookup_max_tokens + 1, SYNTHETIC_PARITY_ROWS)  # a length
    lc = rng.uniform(0.005, 0.3, (SYNTHETIC_PARITY_ROWS, 1)).astype(np.float32)
    return ParityRows(f, p, c, q, lf, lc, "synthetic")


# --------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's progress lines and warnings go nowhere near stdout."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def torch_graph(mlp: SurvivalMLP, info: ControllerInfo, pre_mlp: SurvivalMLP,
                lookup_mlp: SurvivalMLP) -> Any:
    """:class:`ExportGraph` over float32, eval-mode copies of the MLPs (they stay untouched)."""
    import torch

    from speckv.train.network import ControllerGraph, ExportGraph

    mlp, pre_mlp, lookup_mlp = (copy.deepcopy(net).to("cpu", torch.float32).eval()
                                for net in (mlp, pre_mlp, lookup_mlp))
    return ExportGraph(ControllerGraph(mlp, info.gammas, pre_mlp, info.trees,
                                       lookup_mlp)).eval()


def to_onnx(graph: Any, info: ControllerInfo, opset: int = OPSET) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of the controller graph with a dynamic batch axis."""
    import torch

    n, m, g = len(info.feature_names), len(info.pre_feature_names), info.n_options
    k = len(info.lookup_feature_names)
    example = (torch.zeros(2, n), torch.zeros(2, m), torch.ones(2, g), torch.ones(2, 1),
               torch.ones(2, k), torch.ones(2, 1))
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph, example, None, dynamo=True, opset_version=opset, verbose=False,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
                external_data=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return program.model_proto


# ------------------------------------------------------------------------ simplification
def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            del model.graph.initializer[i]
            break
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _users(model: onnx.ModelProto) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _bypass(model: onnx.ModelProto, node: Any, source: str) -> bool:
    """Remove ``node`` and feed its consumers ``source`` instead (not if it is an output)."""
    out = node.output[0]
    if out in {o.name for o in model.graph.output}:
        return False
    for other in model.graph.node:
        for i, name in enumerate(other.input):
            if name == out:
                other.input[i] = source
    model.graph.node.remove(node)
    return True


def _only_user(users: Mapping[str, list[Any]], name: str, op_type: str,
               others: frozenset[str] = frozenset()) -> Any | None:
    """The one node of ``op_type`` reading ``name`` (as its first input), where every other
    reader of ``name`` is of a type in ``others``."""
    nodes = users.get(name, [])
    found = [n for n in nodes if n.op_type == op_type and n.input[0] == name]
    if len(found) == 1 and all(n is found[0] or n.op_type in others for n in nodes):
        return found[0]
    return None


#: what may read a feature input beside its scaling: the lookup's length column (a slice)
_LENGTH_READERS: Final = frozenset({"Slice", "Gather"})


def fold_scaling(model: onnx.ModelProto, source: str = FEATURES) -> str:
    """Fold ``(source - mean) / std`` into the first Gemm after it; say what was done.

    ``W (x - m) / s + b == (W / s) x + (b - (W / s) m)``. Dividing by ``s`` is always safe;
    moving ``m`` into the bias is not when ``|m| / s`` is large (a feature constant in
    training has ``s`` ~ 1e-6): the bias would then cancel huge products in float32. In that
    case the Sub stays and only the Div goes.
    """
    users = _users(model)
    inits = _initializers(model)
    sub = _only_user(users, source, "Sub", _LENGTH_READERS)
    div = sub and _only_user(users, sub.output[0], "Div")
    gemm = div and _only_user(users, div.output[0], "Gemm")
    if not (sub and div and gemm) or sub.input[1] not in inits or div.input[1] not in inits \
            or len(gemm.input) < 3 or gemm.input[1] not in inits or gemm.input[2] not in inits \
            or _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1.0 \
            or _attr(gemm, "beta", 1.0) != 1.0:
        return f"not applied (no Sub -> Div -> Gemm on {source})"
    mean = inits[sub.input[1]].astype(np.float64)
    std = inits[div.input[1]].astype(np.float64)
    trans_b = bool(_attr(gemm, "transB", 0))
    weight = inits[gemm.input[1]].astype(np.float64)  # [out, in] if transB else [in, out]
    bias = inits[gemm.input[2]].astype(np.float64)
    if mean.shape != std.shape or mean.ndim != 1 or bias.ndim != 1:
        return "not applied (scaling is not per feature)"
    w = weight if trans_b else weight.T  # [out, in]
    w_scaled = w / std[None, :]
    offset = float(np.max(np.abs(mean) / std))
    if offset <= FOLD_MAX_OFFSET:
        bias = bias - w_scaled @ mean
        gemm.input[0] = source
        model.graph.node.remove(div)
        model.graph.node.remove(sub)
        done = "folded into the first Gemm"
    else:
        gemm.input[0] = sub.output[0]
        model.graph.node.remove(div)
        done = (f"std folded into the first Gemm; the mean stays a Sub (max |mean|/std "
                f"{offset:.3g} > {FOLD_MAX_OFFSET:g})")
    stored = w_scaled if trans_b else w_scaled.T
    gemm.input[1] = _set_initializer(model, "scaled_" + gemm.input[1], stored.astype(np.float32))
    gemm.input[2] = _set_initializer(model, "scaled_" + gemm.input[2], bias.astype(np.float32))
    return done


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    graph = inferred.graph
    for vi in (*graph.input, *graph.output, *graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_param or d.dim_value for d in dims]
    return shapes


def drop_identity_ops(model: onnx.ModelProto) -> list[str]:
    """Remove Gathers that select every index in order and Reshapes of a vector to [-1]."""
    removed = []
    shapes = _shapes(model)
    inits = _initializers(model)
    for node in list(model.graph.node):
        data = node.input[0] if node.input else ""
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inits \
                and data in shapes:
            index = inits[node.input[1]]
            shape = shapes[data]
            axis = int(_attr(node, "axis", 0)) % max(len(shape), 1)
            if index.ndim == 1 and isinstance(shape[axis], int) and shape[axis] == index.size \
                    and np.array_equal(index, np.arange(index.size)) \
                    and _bypass(model, node, data):
                removed.append("Gather (all indices in order)")
        elif node.op_type == "Reshape" and node.input[1] in inits and data in shapes:
            target = inits[node.input[1]]
            if len(shapes[data]) == 1 and target.tolist() == [-1] \
                    and _bypass(model, node, data):
                removed.append("Reshape (vector to [-1])")
    return removed


def _prune(model: onnx.ModelProto) -> None:
    """Drop unused initializers and the exporter's annotations (stack traces, value_info)."""
    used = {name for node in model.graph.node for name in node.input}
    for tensor in list(model.graph.initializer):
        if tensor.name not in used:
            model.graph.initializer.remove(tensor)
        else:
            del tensor.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.graph.metadata_props[:]


def simplify(model: onnx.ModelProto) -> dict[str, Any]:
    """Apply the latency rewrites in place; return what each did."""
    before = [n.op_type for n in model.graph.node]
    scaling = {name: fold_scaling(model, name)
               for name in (FEATURES, PRE_FEATURES, LOOKUP_FEATURES)}
    removed = drop_identity_ops(model)
    _prune(model)
    return {"scaling": scaling, "removed": removed, "nodes_before": len(before),
            "nodes_after": len(model.graph.node)}


def annotate(model: onnx.ModelProto, info: ControllerInfo) -> None:
    """speckv's metadata, names and documentation on the model."""
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "speckv"
    model.producer_version = speckv.__version__
    model.graph.name = "speckv_controller"
    model.doc_string = (
        f"speckv controller (format {FORMAT_VERSION}), three decisions per step. Where the "
        "context lookup proposes a continuation: lookup_features + lookup_cost + the "
        "pre-draft inputs -> lookup (1: verify the continuation, no draft forward). Before the "
        "draft runs: pre_features + costs + plain_cost -> speculate (1) or take a plain "
        "target step (0). After the draft's first proposal: features + costs -> γ. Each "
        "decision reads only its own inputs; metadata speckv.* names the features (in "
        "order), the candidate γs and trees, and the plain steps in a row after which to "
        "draft anyway (max_skip_run).")
    docs = {
        FEATURES: "raw step features after the draft's first forward, in the order of "
                  "speckv.feature_names",
        PRE_FEATURES: "raw pre-draft features, in the order of speckv.pre_feature_names",
        COSTS: "seconds (any positive unit) of a step verifying each option (a chain of each "
               "candidate γ, then each tree of speckv.trees), its catch-up forward included",
        PLAIN_COST: "seconds (same unit) of a plain target step",
        SPECULATE: "1: draft this step; 0: a plain target step (from pre_features)",
        GAMMA: "the option with the most expected tokens per unit cost (from features): γ for "
               "a chain, max γ + 1 + i for tree i",
        EXPECTED_TOKENS: "E[tokens | option] = 1 + survival @ option matrix, per option",
        SURVIVAL: "P(accepted >= k | features): the chains' curve, then each tree's",
        PRE_EXPECTED_TOKENS: "E[tokens | option] from the pre-draft features",
        PRE_SURVIVAL: "P(accepted >= k | pre_features), laid out as survival",
        LOOKUP_FEATURES: "the context lookup's signals (lookup_length first, raw), then the "
                         "pre-draft vector, in the order of speckv.lookup_feature_names",
        LOOKUP_COST: "seconds (same unit) of a step verifying the lookup's continuation (one "
                     "target forward over it, no draft forward)",
        LOOKUP: "1: verify the lookup's continuation this step; 0: decide by speculate",
        LOOKUP_EXPECTED_TOKENS: "E[tokens | verify the continuation] = 1 + the first "
                                "lookup_length entries of lookup_survival",
        LOOKUP_SURVIVAL: "P(the continuation's first k tokens accepted | lookup_features)",
    }
    for value in (*model.graph.input, *model.graph.output):
        value.doc_string = docs[value.name]


def audit(model: onnx.ModelProto, info: ControllerInfo) -> list[str]:
    """The checks a controller graph must pass; returns its node types."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"The exported graph fails onnx.checker: {exc}") from None
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset < MIN_OPSET:
        raise ExportError(f"The graph has opset {opset}; speckv controllers need >= {MIN_OPSET}.")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    doubles = [t.name for t in inferred.initializer if t.data_type == _DOUBLE]
    doubles += [v.name for v in (*inferred.input, *inferred.output, *inferred.value_info)
                if v.type.tensor_type.elem_type == _DOUBLE]
    if doubles:
        raise ExportError(f"The graph computes in float64 at {doubles}; it must be float32.")
    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    if ins != list(INPUT_NAMES) or outs != list(OUTPUT_NAMES):
        raise ExportError(f"The graph's signature is {ins} -> {outs}, not "
                          f"{list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}.")
    static = [v.name for v in (*model.graph.input, *model.graph.output)
              if not v.type.tensor_type.shape.dim[0].dim_param]
    if static:
        raise ExportError(f"The batch axis of {static} is not dynamic.")
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------ checking
def _gamma_errors(got: np.ndarray, want: np.ndarray, ratio: np.ndarray, gammas: tuple[int, ...]
                  ) -> tuple[list[tuple[int, int, int]], int]:
    """Rows whose γ differs from PyTorch's, less exact ties in PyTorch's own ratios."""
    column = {g: i for i, g in enumerate(gammas)}
    wrong, ties = [], 0
    for row in np.nonzero(got != want)[0]:
        a, b = ratio[row, column[int(want[row])]], ratio[row, column[int(got[row])]]
        if abs(a - b) <= TIE_RTOL * max(abs(a), abs(b)):
            ties += 1
        else:
            wrong.append((int(row), int(want[row]), int(got[row])))
    return wrong, ties


def check_parity(graph: Any, path: Path, rows: ParityRows, info: ControllerInfo
                 ) -> dict[str, Any]:
    """Compare the written file (through the runtime) with PyTorch; raise if they disagree.

    The reference is ``graph`` evaluated in float64: the function the checkpoint's weights
    define, to ~1e-15. PyTorch's own float32 evaluation is not exact either, and not even
    stable between processes (one run of ``make demo`` saw it 1.6e-4 away from float64 on
    expected tokens where the ONNX file was 6e-7 away), so it is reported, not judged.
    """
    import torch

    from speckv.runtime import Controller, NumpyController

    f, p, c, q = rows.features, rows.pre_features, rows.costs, rows.plain_cost
    lf, lc = rows.lookup_features, rows.lookup_cost
    exact = copy.deepcopy(graph).double()
    with torch.inference_mode():
        (spec_t, gamma_t, expected_t, survival_t, pre_expected_t, pre_survival_t, lookup_t,
         lookup_expected_t, lookup_survival_t) = (
            t.numpy() for t in exact(*(torch.from_numpy(a.astype(np.float64))
                                       for a in rows.inputs)))
        torch32_expected = graph(*(torch.from_numpy(a) for a in rows.inputs))[2].numpy()
    expect = {"expected_features": info.feature_names, "expected_gammas": info.gammas,
              "expected_pre_features": info.pre_feature_names,
              "expected_lookup_features": info.lookup_feature_names}
    controller = Controller.load(path, **expect)
    pred = controller.predict(f, c)
    pre = controller.predict_pre(p, c, q)
    single = np.array([controller.choose(a, b) for a, b in zip(f, c, strict=True)])
    single_spec = np.array([controller.speculate(a, b, float(d[0]))
                            for a, b, d in zip(p, c, q, strict=True)])
    reference = NumpyController.load(path, **expect)
    ref, ref_pre = reference.predict(f, c), reference.predict_pre(p, c, q)
    look = controller.predict_lookup(lf, lc, p, c, q)
    single_look = np.array([controller.use_lookup(a, float(b[0]), d, e, float(h[0]))
                            for a, b, d, e, h in zip(lf, lc, p, c, q, strict=True)])
    ref_look = reference.predict_lookup(lf, lc, p, c, q)
    diffs = {
        "max_abs_diff_expected_tokens": float(np.max(np.abs(pred.expected_tokens - expected_t))),
        "max_abs_diff_survival": float(np.max(np.abs(pred.survival - survival_t))),
        "max_abs_diff_pre_expected_tokens":
            float(np.max(np.abs(pre.expected_tokens - pre_expected_t))),
        "max_abs_diff_pre_survival": float(np.max(np.abs(pre.survival - pre_survival_t))),
        "max_abs_diff_lookup_expected_tokens":
            float(np.max(np.abs(look.expected_tokens - lookup_expected_t))),
        "max_abs_diff_lookup_survival":
            float(np.max(np.abs(look.survival - lookup_survival_t))),
    }
    wrong, ties = [], 0
    for got in (pred.gamma, single):
        w, t = _gamma_errors(got, gamma_t, expected_t / c, info.codes)
        wrong += w
        ties += t
    # speculate differs only where the best ratio meets 1 / plain_cost within float32 noise
    margin = np.max(pre_expected_t / c, axis=-1) * q[:, 0] - 1.0
    spec_wrong = [int(r) for got in (pre.speculate, single_spec)
                  for r in np.nonzero(got != spec_t.astype(bool))[0]
                  if abs(margin[r]) > TIE_RTOL]
    # the lookup decision likewise, where its ratio meets the best other one within noise
    other = np.maximum(np.max(pre_expected_t / c, axis=-1), 1.0 / q[:, 0])
    lookup_margin = lookup_expected_t[:, 0] / lc[:, 0] / other - 1.0
    lookup_wrong = [int(r) for got in (look.lookup, single_look, ref_look.lookup)
                    for r in np.nonzero(got != lookup_t.astype(bool))[0]
                    if abs(lookup_margin[r]) > TIE_RTOL]
    report = {
        "rows": len(rows),
        **diffs,
        "gamma_mismatches": len(wrong),
        "gamma_ties": ties,
        "speculate_mismatches": len(spec_wrong),
        "speculate_share": float(np.mean(spec_t)),
        "lookup_mismatches": len(lookup_wrong),
        "lookup_share": float(np.mean(lookup_t)),
        "reference": "torch float64",
        "torch_float32_max_abs_diff_expected_tokens":
            float(np.max(np.abs(torch32_expected - expected_t))),
        "numpy_reference_max_abs_diff_expected_tokens":
            float(np.max(np.abs(ref.expected_tokens - expected_t))),
        "numpy_reference_gamma_mismatches": int(np.sum(ref.gamma != gamma_t)),
        "numpy_reference_speculate_mismatches":
            int(np.sum(ref_pre.speculate != spec_t.astype(bool))),
    }
    worst = max(diffs.values())
    if wrong or spec_wrong or lookup_wrong or not worst <= PARITY_ATOL:
        raise ExportError(
            f"The exported graph disagrees with PyTorch on {len(rows)} parity rows: max "
            f"|Δ| {worst:.3g} (limit {PARITY_ATOL:g}; {diffs}), γ differs on {len(wrong)} rows "
            f"(row, torch, onnx): {wrong[:5]}, speculate on {len(spec_wrong)} rows "
            f"{spec_wrong[:5]}, lookup on {len(lookup_wrong)} rows {lookup_wrong[:5]}. "
            "Nothing was written. This is a bug in the export; please "
            "report it.")
    return report


def decision_latency(path: Path, rows: ParityRows, info: ControllerInfo,
                     calls: int = LATENCY_CALLS) -> dict[str, float]:
    """p50/p99 microseconds of ``Controller.choose``, ``Controller.speculate`` and
    ``Controller.use_lookup`` (batch 1, one thread)."""
    from speckv.runtime import Controller

    controller = Controller.load(path, expected_features=info.feature_names,
                                 expected_gammas=info.gammas,
                                 expected_pre_features=info.pre_feature_names,
                                 expected_lookup_features=info.lookup_feature_names)
    n = len(rows)
    choose, speculate, clock = controller.choose, controller.speculate, time.perf_counter_ns
    use_lookup = controller.use_lookup
    f, p, c, lf = rows.features, rows.pre_features, rows.costs, rows.lookup_features
    q = rows.plain_cost[:, 0].tolist()
    lc = rows.lookup_cost[:, 0].tolist()
    for i in range(min(LATENCY_WARMUP, calls)):
        choose(f[i % n], c[i % n])
        speculate(p[i % n], c[i % n], q[i % n])
        use_lookup(lf[i % n], lc[i % n], p[i % n], c[i % n], q[i % n])
    times = np.empty((3, calls), np.int64)
    for i in range(calls):
        a, b, d, e, g, h = f[i % n], c[i % n], p[i % n], q[i % n], lf[i % n], lc[i % n]
        start = clock()
        choose(a, b)
        mid = clock()
        speculate(d, b, e)
        late = clock()
        use_lookup(g, h, d, b, e)
        times[:, i] = mid - start, late - mid, clock() - late

    def us(row: int, q: float) -> float:
        return float(np.percentile(times[row], q)) / 1e3

    return {"calls": calls, "p50_us": us(0, 50), "p99_us": us(0, 99),
            "speculate_p50_us": us(1, 50), "speculate_p99_us": us(1, 99),
            "lookup_p50_us": us(2, 50), "lookup_p99_us": us(2, 99)}


def export_controller(mlp: SurvivalMLP, meta: Mapping[str, Any], out: str | os.PathLike[str],
                      *, opset: int = OPSET, latency_calls: int = LATENCY_CALLS
                      ) -> dict[str, Any]:
    """Export ``mlp`` with a checkpoint's ``speckv`` metadata to ``out``; return a report.

    ``meta`` needs ``feature_names``, ``gammas`` and ``pre_mlp`` (the pre-draft network) and
    should carry the ``parity_*`` rows (see :func:`speckv.train.network.load_checkpoint`).
    ``out`` is replaced atomically, and only after the written graph has passed every check.
    ``latency_calls=0`` skips the timing.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}, the least speckv supports.")
    out = Path(out)
    info = controller_info(mlp, meta)
    rows = parity_rows(mlp, meta, info)
    graph = torch_graph(mlp, info, meta["pre_mlp"], meta["lookup_mlp"])
    model = to_onnx(graph, info, opset)
    rewrites = simplify(model)
    annotate(model, info)
    nodes = audit(model, info)
    data = model.SerializeToString()

    checks: dict[str, Any] = {}

    def write_and_check(tmp: Path) -> None:
        """The file is renamed into place only if every check on it passes."""
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        checks["parity"] = {**check_parity(graph, tmp, rows, info), "source": rows.source}
        checks["latency"] = (decision_latency(tmp, rows, info, latency_calls)
                             if latency_calls else None)

    atomic_write(out, write_and_check)
    sidecar = write_sidecar(out)  # its digest names these bytes: never stale unnoticed
    parity, latency = checks["parity"], checks["latency"]
    return {
        "out": str(out),
        "sidecar": str(sidecar),
        "bytes": len(data),
        "opset": opset,
        "format_version": FORMAT_VERSION,
        "exporter": "torch.onnx.export(dynamo=True)",
        "nodes": nodes,
        "rewrites": rewrites,
        "parity": parity,
        "latency": latency,
        "metadata": info.to_metadata(),
    }


# ------------------------------------------------------------------------------------ CLI
