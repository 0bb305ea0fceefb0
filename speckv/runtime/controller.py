"""The runtime controller: an exported speckv ONNX file behind the step's three decisions.

numpy + onnxruntime only. ``Controller.load`` reads the file's metadata before onnxruntime
sees it and refuses, with a message that says what to do, a file that is not ONNX, not
speckv's, of another format version, or built for other features or candidate γs.

Per step (see :mod:`speckv.runtime.contract`)::

    use_lookup(lookup_features, lookup_cost,                where the context lookup
               pre_features, costs, plain_cost) -> bool     proposes: its continuation?
    speculate(pre_features, costs, plain_cost) -> bool      before the draft's forward
    choose(features, costs) -> γ                            after its first proposal

or, from a :class:`~speckv.runtime.features.History` and the draft's logits directly,
:meth:`Controller.speculate_for` and :meth:`Controller.choose_from_logits` (the decoder's hot
path: statistics, feature vector and the graph in one call, without allocating).

The file's graph holds every head; onnxruntime runs every node of a graph on every call, so
the controller extracts the three decisions into three sessions and each call computes one.

Hot path: the inputs are written into preallocated float32 rows that onnxruntime reads in
place through an IOBinding, checked there with a few sub-microsecond numpy calls, and the graph
writes its outputs into preallocated cells. Those buffers are per thread (``threading.local``),
so one ``Controller`` may serve any number of threads at once: onnxruntime sessions are safe
to run concurrently, and each thread binds its own buffers on its first call (~0.1 µs per
call for the lookup, against ~0.2 µs for a lock that would also serialise the threads).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime as ort

from speckv.runtime import onnx_proto
from speckv.runtime.contract import (
    COSTS,
    EXPECTED_TOKENS,
    FEATURES,
    GAMMA,
    INPUT_NAMES,
    LOOKUP,
    LOOKUP_COST,
    LOOKUP_EXPECTED_TOKENS,
    LOOKUP_FEATURES,
    LOOKUP_OUTPUTS,
    LOOKUP_SURVIVAL,
    OUTPUT_NAMES,
    PLAIN_COST,
    PRE_EXPECTED_TOKENS,
    PRE_FEATURES,
    PRE_OUTPUTS,
    PRE_SURVIVAL,
    SPECULATE,
    STEP_OUTPUTS,
    SURVIVAL,
    UNAVAILABLE_COST,
    ControllerInfo,
    describe_difference,
)
from speckv.runtime.costs import StepCosts
from speckv.runtime.errors import (
    BadInputError,
    CandidateMismatchError,
    ControllerFormatError,
    ControllerNotFoundError,
    FeatureMismatchError,
)
from speckv.runtime.features import (
    FEATURE_NAMES,
    GAMMAS,
    LOOKUP_FEATURE_NAMES,
    PRE_FEATURE_NAMES,
    History,
    RowStats,
    fill_pre_features,
    fill_step_features,
    lookup_features,
)
from speckv.runtime.features import (
    pre_features as pre_vector,
)
from speckv.runtime.proposal import TREES

DEFAULT_THREADS: Final = 1
PROVIDERS: Final = ("CPUExecutionProvider",)
#: A controller is a few kilobytes; refuse to read anything this large (a wrong path).
MAX_CONTROLLER_BYTES: Final = 64 * 2**20
_FLOAT: Final = "tensor(float)"
_INT64: Final = "tensor(int64)"
_ELEM: Final = {_FLOAT: onnx_proto.FLOAT, _INT64: onnx_proto.INT64}
_isfinite: Final = np.isfinite
_FIX_FEATURES: Final = ("Build the vectors with speckv.runtime.features (step_features after the "
                        "draft's first forward, pre_features before it) from a History.")
_FIX_COSTS: Final = ("Pass the seconds of a step verifying each option (a chain of each γ, "
                     "then each tree) and of a plain step, measured on this machine: "
                     "Controller.option_costs(speckv.runtime.StepCosts(...), unseen) and "
                     "StepCosts.plain.")


def session_options(threads: int = DEFAULT_THREADS) -> ort.SessionOptions:
    """speckv's onnxruntime settings: ``threads`` intra-op threads, one inter-op, sequential.

    With more than one thread the pool does not spin between calls, so it leaves the CPU to
    the decoder that calls it once per step.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}.")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's
    if threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def read_controller_bytes(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """The file's bytes, or :class:`ControllerNotFoundError` / :class:`ControllerFormatError`."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ControllerNotFoundError(
            f"Controller {path} {what}. Export one with `python -m speckv export --out "
            f"{path if path.suffix == '.onnx' else 'export/speckv.onnx'}`, or pass the path of "
            "an exported .onnx file.")
    size = path.stat().st_size
    if size > MAX_CONTROLLER_BYTES:
        raise ControllerFormatError(
            f"{path} is {size / 2**20:.0f} MiB; a speckv controller is a few kilobytes. Is this "
            "the right file? Export one with `python -m speckv export`.")
    return path, path.read_bytes()


def read_model(data: bytes, source: str, *, graph: bool = True
               ) -> tuple[onnx_proto.Model, ControllerInfo]:
    """Parse a serialized controller and its metadata (no onnxruntime involved)."""
    try:
        model = onnx_proto.parse_model(data, graph=graph)
    except onnx_proto.ProtoError as exc:
        raise ControllerFormatError(
            f"{source} is not an ONNX model ({exc}). Pass a controller written by "
            "`python -m speckv export` (an .onnx file).") from None
    return model, ControllerInfo.from_metadata(model.metadata, source=source)


def read_info(data: bytes, source: str) -> ControllerInfo:
    """The metadata of a serialized controller (no onnxruntime involved)."""
    return read_model(data, source, graph=False)[1]


#: speckv's trees as a controller file lists them
SPECKV_TREES: Final = tuple((t.size, t.depth, t.branch) for t in TREES)


def check_expected(info: ControllerInfo, source: str,
                   expected_features: Sequence[str] | None,
                   expected_gammas: Sequence[int] | None,
                   expected_pre_features: Sequence[str] | None = None,
                   expected_trees: Sequence[Sequence[int]] | None = SPECKV_TREES,
                   expected_lookup_features: Sequence[str] | None = None) -> None:
    """Refuse a controller whose features, candidate γs or trees differ from the caller's
    (a file without trees chooses among chains only, whatever ``expected_trees``)."""
    for kind, found, expected in (("step", info.feature_names, expected_features),
                                  ("pre-draft", info.pre_feature_names, expected_pre_features),
                                  ("lookup", info.lookup_feature_names,
                                   expected_lookup_features)):
        if expected is not None and tuple(expected) != found:
            raise FeatureMismatchError(
                f"{source} was trained on other {kind} features than this code builds: "
                f"{describe_difference(found, tuple(expected))}. File: {list(found)}; "
                f"expected: {list(expected)}. Retrain and re-export the controller with this "
                "speckv (`python -m speckv.train fit`, then `python -m speckv export`), or, if "
                "you build features in the file's order yourself, pass expected_features=None, "
                "expected_pre_features=None and expected_lookup_features=None.")
    if expected_gammas is not None and tuple(int(g) for g in expected_gammas) != info.gammas:
        raise CandidateMismatchError(
            f"{source} chooses γ among {list(info.gammas)}, but {list(expected_gammas)} are "
            "expected. Retrain and re-export with the expected candidates, or pass "
            "expected_gammas=None and size the costs to the file's γs.")
    if expected_trees is not None and info.trees and \
            tuple(tuple(int(v) for v in t) for t in expected_trees) != tuple(info.trees):
        raise CandidateMismatchError(
            f"{source} chooses among the trees {[list(t) for t in info.trees]} "
            "([size, depth, branch]), but this decoder builds "
            f"{[list(t) for t in expected_trees]}: its tree costs would price other trees. "
            "Retrain and re-export with this speckv, or pass expected_trees=None and size "
            "the costs to the file's trees.")


def check_signature(model: onnx_proto.Model, info: ControllerInfo, source: str) -> None:
    """The graph's inputs and outputs must be speckv's, with widths that match the metadata."""
    n, m, g = len(info.feature_names), len(info.pre_feature_names), info.n_options
    w, k = info.survival_width, len(info.lookup_feature_names)
    want = {FEATURES: (_FLOAT, n), PRE_FEATURES: (_FLOAT, m), COSTS: (_FLOAT, g),
            PLAIN_COST: (_FLOAT, 1), SPECULATE: (_INT64, None), GAMMA: (_INT64, None),
            EXPECTED_TOKENS: (_FLOAT, g), SURVIVAL: (_FLOAT, w),
            PRE_EXPECTED_TOKENS: (_FLOAT, g), PRE_SURVIVAL: (_FLOAT, w),
            LOOKUP_FEATURES: (_FLOAT, k), LOOKUP_COST: (_FLOAT, 1), LOOKUP: (_INT64, None),
            LOOKUP_EXPECTED_TOKENS: (_FLOAT, 1),
            LOOKUP_SURVIVAL: (_FLOAT, info.lookup_max_tokens)}
    found = {v.name: v for v in (*model.inputs, *model.outputs)}
    names_in = tuple(v.name for v in model.inputs)
    names_out = tuple(v.name for v in model.outputs)
    problems = []
    if set(names_in) != set(INPUT_NAMES) or set(names_out) != set(OUTPUT_NAMES):
        problems.append(f"inputs {list(names_in)} and outputs {list(names_out)} instead of "
                        f"{list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}")
    else:
        for name, (kind, width) in want.items():
            value = found[name]
            rank = 1 if width is None else 2
            if value.elem_type != _ELEM[kind] or len(value.shape) != rank or (
                    width is not None and value.shape[1] != width):
                found_kind = kind if value.elem_type == _ELEM[kind] else "another type"
                problems.append(f"{name} is {found_kind} {list(value.shape)}, expected {kind} "
                                f"{['batch'] if width is None else ['batch', width]}")
    if problems:
        raise ControllerFormatError(
            f"{source} does not have speckv's controller signature ({'; '.join(problems)}). "
            "Re-export it with `python -m speckv export`.")


def open_session(data: bytes, source: str, threads: int = DEFAULT_THREADS
                 ) -> ort.InferenceSession:
    """An onnxruntime session on the CPU provider with :func:`session_options`."""
    opts = session_options(threads)
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=list(PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own pybind classes for every failure
        raise ControllerFormatError(
            f"onnxruntime {ort.__version__} cannot load {source}: {exc}. If the file was "
            "exported with a newer opset, upgrade onnxruntime; otherwise re-export it with "
            "`python -m speckv export`.") from None


@dataclass(frozen=True)
class Prediction:
    """Everything the step head computes for a batch of γ decisions."""

    gamma: np.ndarray  #: int64 [batch], each an option code (γ for a chain, then the trees)
    expected_tokens: np.ndarray  #: float32 [batch, n_options]: E[tokens | option]
    survival: np.ndarray  #: float32 [batch, survival_width]: each family's P(accepted >= k)


@dataclass(frozen=True)
class PrePrediction:
    """Everything the pre-draft head computes for a batch of speculate-or-not decisions."""

    speculate: np.ndarray  #: bool [batch]: draft this step (else a plain target step)
    expected_tokens: np.ndarray  #: float32 [batch, n_options]: E[tokens | option, pre-draft]
    survival: np.ndarray  #: float32 [batch, survival_width]


@dataclass(frozen=True)
class LookupPrediction:
    """Everything the lookup head computes for a batch of lookup-or-not decisions."""

    lookup: np.ndarray  #: bool [batch]: verify the lookup's continuation (else as speculate)
    expected_tokens: np.ndarray  #: float32 [batch, 1]: E[tokens | verify the continuation]
    survival: np.ndarray  #: float32 [batch, lookup_max_tokens]


class InputRow:
    """One preallocated float32 row holding a decision's inputs, filled and checked in place.

    ``parts``: ``(name, width)`` in row order; the parts from ``positive`` on are costs
    (finite and > 0), the others features (finite). ``view(name)`` is a part of the row that
    an onnxruntime IOBinding (or the numpy reference) reads directly.
    """

    def __init__(self, parts: Sequence[tuple[str, int]], positive: str,
                 names: dict[str, Sequence[object]]) -> None:
        self.parts = tuple(parts)
        self.names = names  # per part: what its columns are, for messages
        total = sum(w for _, w in self.parts)
        self.row = np.zeros(total, np.float32)
        self._views: dict[str, np.ndarray] = {}
        start = 0
        for name, width in self.parts:
            if name == positive:
                self.positive = self.row[start:]
            self._views[name] = self.row[start:start + width]
            start += width
        self._finite = np.zeros(total, bool)
        self._shapes = tuple((w,) for _, w in self.parts)
        self._view_list = tuple(self._views[name] for name, _ in self.parts)

    def view(self, name: str) -> np.ndarray:
        return self._views[name]

    def fill(self, *values: np.ndarray | Sequence[float] | float) -> None:
        """Copy one decision's inputs (one per part, in order) into the row and check them.

        The hot path of ``choose``: vectors of the right shape (and a float for a one-value
        part) are copied as they are, ~0.3 µs each; anything else goes through
        :meth:`_fill_slowly`, which converts or explains.
        """
        views, shapes = self._view_list, self._shapes
        if len(values) == 2 and len(views) == 2:  # unrolled: the step decision's inputs
            a, b = values
            if (type(a) is np.ndarray and type(b) is np.ndarray and a.shape == shapes[0]
                    and b.shape == shapes[1]):
                try:
                    views[0][...] = a
                    views[1][...] = b
                except (TypeError, ValueError, RuntimeWarning):
                    self._fill_slowly(values)
            else:
                self._fill_slowly(values)
        else:
            ready = len(values) == len(views)
            if ready:
                for value, shape in zip(values, shapes, strict=True):
                    if not ((type(value) is np.ndarray and value.shape == shape)
                            or (type(value) is float and shape == (1,))):
                        ready = False
                        break
            if ready:
                try:
                    for view, value in zip(views, values, strict=True):
                        view[...] = value
                except (TypeError, ValueError, RuntimeWarning):
                    ready = False
            if not ready:
                self._fill_slowly(values)
        # Two calls of ~0.3 µs each, where isfinite(...).all() and min() take over 1 µs:
        # argmin finds the first False of the finiteness mask (and the first NaN of the costs).
        finite = _isfinite(self.row, out=self._finite)
        costs = self.positive
        if not (finite[finite.argmin()] and costs[costs.argmin()] > 0.0):
            raise values_error({name: self._views[name][None] for name, _ in self.parts},
                               self.names)

    def _fill_slowly(self, values: Sequence[np.ndarray | Sequence[float] | float]) -> None:
        if len(values) != len(self.parts):
            raise BadInputError(f"expected {len(self.parts)} inputs "
                                f"({', '.join(n for n, _ in self.parts)}), got {len(values)}.")
        arrays = [np.asarray(v) for v in values]
        for (name, width), array, shape in zip(self.parts, arrays, self._shapes, strict=True):
            if array.shape != shape and not (width == 1 and array.size == 1):
                raise self._shape_error(name, width, array)
        try:
            for (name, _), array in zip(self.parts, arrays, strict=True):
                self._views[name][...] = array.reshape(-1) if array.ndim > 1 else array
        except (TypeError, ValueError, RuntimeWarning) as exc:  # warning: overflow, -W error
            raise BadInputError(f"features and costs must be float32 numbers ({exc}). "
                                f"{_FIX_FEATURES}") from None

    def check(self) -> None:
        """:class:`BadInputError` unless every value is finite and every cost > 0."""
        # Two calls of ~0.3 µs each, where isfinite(...).all() and min() take over 1 µs:
        # argmin finds the first False of the finiteness mask (and the first NaN of the costs).
        finite = _isfinite(self.row, out=self._finite)
        costs = self.positive
        if not (finite[finite.argmin()] and costs[costs.argmin()] > 0.0):
            raise values_error({name: self._views[name][None] for name, _ in self.parts},
                               self.names)

    def _shape_error(self, name: str, width: int, array: np.ndarray) -> BadInputError:
        columns = self.names.get(name)
        if name in (FEATURES, PRE_FEATURES):
            batch = " (for many decisions at once use the *_batch methods)" if array.ndim == 2 \
                else ""
            return BadInputError(f"{name} must be a 1-D vector of {width} values in the order "
                                 f"{list(columns or ())}; got shape {array.shape}{batch}. "
                                 f"{_FIX_FEATURES}")
        if name == COSTS:
            return BadInputError(f"costs must be a 1-D vector of {width} values, one per "
                                 f"option {list(columns)}; got shape {array.shape}. "
                                 f"{_FIX_COSTS}")
        return BadInputError(f"{name} must be one number; got shape {array.shape}. "
                             f"{_FIX_COSTS}")


def values_error(parts: dict[str, np.ndarray], names: dict[str, Sequence[object]]
                 ) -> BadInputError:
    """The message for non-finite features or bad costs (``[b, width]`` arrays per part)."""
    for name in (FEATURES, PRE_FEATURES, LOOKUP_FEATURES):
        if name not in parts:
            continue
        values = parts[name]
        rows, cols = np.nonzero(~np.isfinite(values))
        if rows.size:
            where = ", ".join(f"{names[name][j]}={values[i, j]}"
                              + (f" (row {i})" if values.shape[0] > 1 else "")
                              for i, j in zip(rows[:4], cols[:4], strict=True))
            return BadInputError(f"{name} must be finite; got {where}. A NaN or inf usually "
                                 f"comes from NaN draft logits. {_FIX_FEATURES}")
    where = []
    for name in (COSTS, PLAIN_COST, LOOKUP_COST):
        if name not in parts:
            continue
        values = parts[name]
        rows, cols = np.nonzero(~(np.isfinite(values) & (values > 0)))
        where += [f"{names[name][j]}: {values[i, j]}"
                  + (f" (row {i})" if values.shape[0] > 1 else "")
                  for i, j in zip(rows[:4], cols[:4], strict=True)]
    return BadInputError(f"costs must be finite and > 0 (they are step times; only their "
                         f"ratios matter); got {', '.join(where[:4])}. {_FIX_COSTS}")


def batch_inputs(parts: Sequence[tuple[str, int, np.ndarray | Sequence | float]],
                 names: dict[str, Sequence[object]]) -> list[np.ndarray]:
    """Checked float32 ``[b, width]`` arrays for a batch call, one per ``(name, width, value)``.

    The first part fixes the batch (a single vector is a batch of one); later parts may be
    one vector (or number) shared by every row.
    """
    out: list[np.ndarray] = []
    batch = None
    for name, width, value in parts:
        try:
            a = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError, RuntimeWarning) as exc:
            raise BadInputError(f"features and costs must be float32 numbers ({exc}). "
                                f"{_FIX_FEATURES}") from None
        if batch is None:
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2 or a.shape[1] != width:
                raise BadInputError(f"{name} must be [batch, {width}] (columns in the order "
                                    f"{list(names.get(name, ()))}); got shape {a.shape}. "
                                    f"{_FIX_FEATURES}")
            batch = a.shape[0]
        else:
            if width == 1 and a.ndim == 1 and a.shape == (batch,):
                a = a[:, None]
            if a.ndim <= 1 and a.size == width:
                a = np.broadcast_to(a.reshape(1, width), (batch, width))
            if a.shape != (batch, width):
                raise BadInputError(f"{name} must be [{width}] (shared by every row) or "
                                    f"[{batch}, {width}]; got shape {a.shape}. {_FIX_COSTS}")
        out.append(a)
    checked = dict(zip((p[0] for p in parts), out, strict=True))
    ok = all(np.isfinite(a).all() for a in out) and all(
        (checked[n] > 0).all() for n in (COSTS, PLAIN_COST, LOOKUP_COST) if n in checked)
    if not ok:
        raise values_error(checked, names)
    return [np.ascontiguousarray(a) for a in out]


def check_lookup_length(length: np.ndarray, max_tokens: int) -> None:
    """:class:`BadInputError` unless every ``lookup_length`` is a whole number of tokens in
    ``1..max_tokens`` (the graph sums the lookup's survival curve up to it)."""
    ok = (length >= 1.0) & (length <= max_tokens) & (length == np.floor(length))
    if not ok.all():
        bad = length[~ok][:4].tolist()
        raise BadInputError(f"lookup_features[0] (lookup_length) must be the continuation's "
                            f"length, a whole number of tokens from 1 to {max_tokens}; got "
                            f"{bad}. Ask the lookup decision only where the context lookup "
                            "proposes tokens, and build the vector with "
                            "speckv.runtime.features.lookup_features.")


def bound_call(session: ort.InferenceSession, binding: ort.IOBinding) -> Callable[[], object]:
    """``session.run_with_iobinding(binding)`` as a no-argument call, minus one Python frame.

    onnxruntime's Python wrapper only forwards to its C++ session (``_sess``); calling that
    directly saves ~0.4 µs of the ~6 µs call. Where a future onnxruntime lays its wrapper out
    differently, the public method is used.
    """
    inner, raw = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    if inner is not None and raw is not None and hasattr(inner, "run_with_iobinding"):
        fast = functools.partial(inner.run_with_iobinding, raw, None)
        try:
            fast()
        except Exception:  # another signature: fall back to the public API
            pass
        else:
            return fast
    return functools.partial(session.run_with_iobinding, binding)


class _Head:
    """One decision's extracted graph: its session and what a thread needs to call it."""

    def __init__(self, session: ort.InferenceSession, parts: Sequence[tuple[str, int]],
                 positive: str, outputs: Sequence[tuple[str, tuple[int, ...], type]],
                 names: dict[str, Sequence[object]]) -> None:
        self.session, self.parts, self.positive = session, tuple(parts), positive
        self.outputs, self.names = tuple(outputs), names

    def bind(self) -> tuple[InputRow, dict[str, np.ndarray], Callable[[], object]]:
        """This thread's input row, output cells and bound call."""
        row = InputRow(self.parts, self.positive, self.names)
        binding = self.session.io_binding()
        for name, width in self.parts:
            binding.bind_input(name, "cpu", 0, np.float32, [1, width], row.view(name).ctypes.data)
        cells = {}
        for name, shape, dtype in self.outputs:
            cell = np.zeros(shape, dtype)
            binding.bind_output(name, "cpu", 0, cell.dtype, list(shape), cell.ctypes.data)
            cells[name] = cell
        call = bound_call(self.session, binding)
        # the binding must outlive the call that refers to it
        call.binding = binding  # type: ignore[attr-defined]
        return row, cells, call


class _ThreadState:
    """A thread's buffers and bound calls (built on its first decision)."""

    def __init__(self, pre: _Head, step: _Head, lookup: _Head) -> None:
        self.pre_row, pre_cells, self.run_pre = pre.bind()
        self.step_row, step_cells, self.run_step = step.bind()
        self.lookup_row, lookup_cells, self.run_lookup = lookup.bind()
        # every bound cell must live as long as its binding: onnxruntime writes into it
        self.cells = {**pre_cells, **step_cells, **lookup_cells}
        self.lookup = lookup_cells[LOOKUP]
        self.lookup_length = self.lookup_row.view(LOOKUP_FEATURES)[:1]
        self.speculate = pre_cells[SPECULATE]
        self.gamma = step_cells[GAMMA]
        self.pre_features = self.pre_row.view(PRE_FEATURES)
        self.pre_costs = self.pre_row.view(COSTS)
        self.plain_cost = self.pre_row.view(PLAIN_COST)
        self.features = self.step_row.view(FEATURES)
        self.step_costs = self.step_row.view(COSTS)
        self.stats = RowStats()


def option_labels(info: ControllerInfo) -> tuple[str, ...]:
    """What each cost column prices, for error messages: ``γ=1``.., ``tree:N``..."""
    return (*(f"γ={g}" for g in info.gammas), *(f"tree:{t[0]}" for t in info.trees))


class Controller:
    """An exported speckv controller on onnxruntime. Build it with :meth:`load`.

    Safe to share between threads: every thread gets its own bound buffers.
    """

    def __init__(self, pre: ort.InferenceSession, step: ort.InferenceSession,
                 lookup: ort.InferenceSession, info: ControllerInfo,
                 source: str = "<controller>") -> None:
        self.info = info
        self.source = source
        n, m, g = len(info.feature_names), len(info.pre_feature_names), info.n_options
        w, k = info.survival_width, len(info.lookup_feature_names)
        names: dict[str, Sequence[object]] = {FEATURES: info.feature_names,
                                              PRE_FEATURES: info.pre_feature_names,
                                              COSTS: option_labels(info), PLAIN_COST: ("plain",),
                                              LOOKUP_FEATURES: info.lookup_feature_names,
                                              LOOKUP_COST: ("lookup",)}
        self._names = names
        self._pre = _Head(pre, ((PRE_FEATURES, m), (COSTS, g), (PLAIN_COST, 1)), COSTS,
                          ((SPECULATE, (1,), np.int64), (PRE_EXPECTED_TOKENS, (1, g), np.float32),
                           (PRE_SURVIVAL, (1, w), np.float32)), names)
        self._step = _Head(step, ((FEATURES, n), (COSTS, g)), COSTS,
                           ((GAMMA, (1,), np.int64), (EXPECTED_TOKENS, (1, g), np.float32),
                            (SURVIVAL, (1, w), np.float32)), names)
        # the lookup's inputs, then the pre-draft decision's: costs from LOOKUP_COST on
        self._lookup = _Head(lookup, ((LOOKUP_FEATURES, k), (PRE_FEATURES, m), (LOOKUP_COST, 1),
                                      (COSTS, g), (PLAIN_COST, 1)), LOOKUP_COST,
                             ((LOOKUP, (1,), np.int64),
                              (LOOKUP_EXPECTED_TOKENS, (1, 1), np.float32),
                              (LOOKUP_SURVIVAL, (1, info.lookup_max_tokens), np.float32)), names)
        self._local = threading.local()
        self._state()  # bind this thread now: a broken graph fails at load, not mid-decode

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int = DEFAULT_THREADS,
             expected_features: Sequence[str] | None = FEATURE_NAMES,
             expected_gammas: Sequence[int] | None = GAMMAS,
             expected_pre_features: Sequence[str] | None = PRE_FEATURE_NAMES,
             expected_trees: Sequence[Sequence[int]] | None = SPECKV_TREES,
             expected_lookup_features: Sequence[str] | None = LOOKUP_FEATURE_NAMES
             ) -> Controller:
        """Open an exported controller and check it against what the caller will pass.

        ``expected_features`` / ``expected_pre_features``: the names, in order, of the step
        and pre-draft vectors the caller builds (default: speckv.runtime.features');
        ``expected_gammas``: the candidate γs the costs are given for (default
        :data:`speckv.runtime.features.GAMMAS`); ``expected_trees``: the trees the caller
        prices (default :data:`speckv.runtime.proposal.TREES`; a file without trees is
        accepted, it chooses among chains); ``expected_lookup_features``: the lookup
        vector's names (default :data:`speckv.runtime.features.LOOKUP_FEATURE_NAMES`). None
        skips a check. ``threads``:
        onnxruntime intra-op threads (1 is fastest for this tiny graph).
        """
        path, data = read_controller_bytes(path)
        source = str(path)
        model, info = read_model(data, source)
        check_expected(info, source, expected_features, expected_gammas, expected_pre_features,
                       expected_trees, expected_lookup_features)
        check_signature(model, info, source)
        pre, step, lookup = (open_session(onnx_proto.extract(data, list(outputs)), source, threads)
                             for outputs in (PRE_OUTPUTS, STEP_OUTPUTS, LOOKUP_OUTPUTS))
        return cls(pre, step, lookup, info, source)

    def _state(self) -> _ThreadState:
        try:
            return self._local.state
        except AttributeError:
            state = self._local.state = _ThreadState(self._pre, self._step, self._lookup)
            return state

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.info.feature_names

    @property
    def pre_feature_names(self) -> tuple[str, ...]:
        return self.info.pre_feature_names

    @property
    def gammas(self) -> tuple[int, ...]:
        return self.info.gammas

    @property
    def n_options(self) -> int:
        """The width of ``costs``: the chains of :attr:`gammas`, then the file's trees."""
        return self.info.n_options

    def option_costs(self, costs: StepCosts, unseen: int = 1) -> np.ndarray:
        """``[n_options]`` float32 costs in this file's order after a catch-up over
        ``unseen`` tokens: the chains', then the trees' (:data:`UNAVAILABLE_COST` where
        ``costs`` has no tree costs, so no tree is chosen)."""
        chains = costs.drafting(unseen)
        if not self.info.trees:
            return chains
        trees = costs.trees(unseen)
        if trees is None:
            trees = np.full(len(self.info.trees), UNAVAILABLE_COST, np.float32)
        return np.concatenate([chains, trees]).astype(np.float32)

    @property
    def max_skip_run(self) -> int:
        """Plain steps in a row after which a policy should draft anyway (a probe)."""
        return self.info.max_skip_run

    @property
    def lookup_feature_names(self) -> tuple[str, ...]:
        return self.info.lookup_feature_names

    # ------------------------------------------------------------------- one decision each
    def use_lookup(self, lookup_features: np.ndarray | Sequence[float], lookup_cost: float,
                   pre_features: np.ndarray | Sequence[float],
                   costs: np.ndarray | Sequence[float], plain_cost: float) -> bool:
        """Where the context lookup proposes a continuation, before the draft's forward:
        verify it this step (True, no draft forward), or decide with :meth:`speculate`?

        ``lookup_features`` ``[n_lookup_features]``
        (:func:`speckv.runtime.features.lookup_features`); ``lookup_cost``: a step verifying
        the continuation; the rest as for :meth:`speculate` (all costs > 0).
        """
        state = self._state()
        state.lookup_row.fill(lookup_features, pre_features, lookup_cost, costs, plain_cost)
        check_lookup_length(state.lookup_length, self.info.lookup_max_tokens)
        state.run_lookup()
        return bool(state.lookup[0])

    def use_lookup_for(self, history: History, compression: str, costs: StepCosts,
                       proposal) -> bool:
        """:meth:`use_lookup` for a :class:`~speckv.runtime.lookup.LookupProposal` (at most
        ``lookup_max_tokens`` tokens) with both vectors built from ``history``: the step
        would verify the proposal in a forward over its tokens and the last emitted one
        (``costs.t_verify[len(tokens)]``), against drafting after a catch-up over
        ``history.unsettled + 1`` tokens or a plain step."""
        pre = pre_vector(history, compression)
        n = len(proposal.tokens)
        look = lookup_features(pre, n, proposal.match, proposal.occurrences, proposal.agreeing)
        return self.use_lookup(look, costs.t_verify[n], pre,
                               self.option_costs(costs, len(history.pending) + 1), costs.plain)

    def speculate(self, pre_features: np.ndarray | Sequence[float],
                  costs: np.ndarray | Sequence[float], plain_cost: float) -> bool:
        """Before the draft's forward: draft this step (True) or take a plain step (False)?

        ``pre_features`` ``[n_pre_features]``; ``costs`` ``[n_options]``: a step verifying
        each option, its catch-up included (:meth:`option_costs`); ``plain_cost``: a plain
        target step (all > 0).
        """
        state = self._state()
        state.pre_row.fill(pre_features, costs, plain_cost)
        state.run_pre()
        return bool(state.speculate[0])

    def choose(self, features: np.ndarray | Sequence[float],
               costs: np.ndarray | Sequence[float]) -> int:
        """The option for one decision (γ for a chain, a tree's code): ``features``
        ``[n_features]``, ``costs`` ``[n_options]`` (> 0)."""
        state = self._state()
        state.step_row.fill(features, costs)
        state.run_step()
        return state.gamma.item()

    def speculate_for(self, history: History, compression: str, costs: StepCosts) -> bool:
        """:meth:`speculate` with the pre-draft vector built from ``history`` in place.

        The step's catch-up covers ``history.unsettled + 1`` tokens, priced from ``costs``.
        """
        state = self._state()
        fill_pre_features(state.pre_features, history, compression)
        state.pre_costs[...] = self.option_costs(costs, len(history.pending) + 1)
        state.plain_cost[0] = costs.plain
        state.pre_row.check()
        state.run_pre()
        return bool(state.speculate[0])

    def choose_from_logits(self, logits: np.ndarray, history: History, compression: str,
                           costs: np.ndarray) -> int:
        """γ from the draft's first-proposal logits: statistics, step vector and graph.

        ``logits``: ``[vocab]`` float32 (a CPU torch tensor's ``.numpy()`` needs no copy);
        ``history``: complete (the catch-up forward's verdicts settled); ``costs``: the step's
        ``[n_options]`` costs, e.g. ``option_costs(step_costs, unseen)`` for the catch-up it
        just ran.
        """
        state = self._state()
        x = logits if type(logits) is np.ndarray else np.asarray(logits)
        if x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        entropy, top1, margin = state.stats(x)
        fill_step_features(state.features, entropy, top1, margin, history, compression)
        state.step_costs[...] = costs
        state.step_row.check()
        state.run_step()
        return state.gamma.item()

    # ------------------------------------------------------------------------ batch calls
    def _pre_inputs(self, pre_features, costs, plain_cost) -> dict[str, np.ndarray]:
        info = self.info
        p, c, q = batch_inputs(((PRE_FEATURES, len(info.pre_feature_names), pre_features),
                                (COSTS, info.n_options, costs), (PLAIN_COST, 1, plain_cost)),
                               self._names)
        return {PRE_FEATURES: p, COSTS: c, PLAIN_COST: q}

    def _step_inputs(self, features, costs) -> dict[str, np.ndarray]:
        info = self.info
        f, c = batch_inputs(((FEATURES, len(info.feature_names), features),
                             (COSTS, info.n_options, costs)), self._names)
        return {FEATURES: f, COSTS: c}

    def _lookup_inputs(self, lookup_features, lookup_cost, pre_features, costs, plain_cost
                       ) -> dict[str, np.ndarray]:
        info = self.info
        parts = ((LOOKUP_FEATURES, len(info.lookup_feature_names), lookup_features),
                 (PRE_FEATURES, len(info.pre_feature_names), pre_features),
                 (LOOKUP_COST, 1, lookup_cost), (COSTS, info.n_options, costs),
                 (PLAIN_COST, 1, plain_cost))
        feeds = dict(zip((name for name, _, _ in parts), batch_inputs(parts, self._names),
                         strict=True))
        check_lookup_length(feeds[LOOKUP_FEATURES][:, 0], info.lookup_max_tokens)
        return feeds

    def predict_lookup(self, lookup_features, lookup_cost, pre_features, costs, plain_cost
                       ) -> LookupPrediction:
        """The lookup decision, its expected tokens and survival curve, with a batch axis."""
        feeds = self._lookup_inputs(lookup_features, lookup_cost, pre_features, costs,
                                    plain_cost)
        if not feeds[LOOKUP_FEATURES].shape[0]:
            return LookupPrediction(np.empty(0, bool), np.empty((0, 1), np.float32),
                                    np.empty((0, self.info.lookup_max_tokens), np.float32))
        lookup, expected, survival = self._lookup.session.run(list(LOOKUP_OUTPUTS), feeds)
        return LookupPrediction(lookup.astype(bool), expected, survival)

    def speculate_batch(self, pre_features, costs, plain_cost) -> np.ndarray:
        """:meth:`speculate` for each row: ``[b, m]``, ``[b, g]`` or ``[g]``, ``[b]`` or a
        number -> bool ``[b]``."""
        feeds = self._pre_inputs(pre_features, costs, plain_cost)
        if not feeds[PRE_FEATURES].shape[0]:
            return np.empty(0, bool)
        return self._pre.session.run([SPECULATE], feeds)[0].astype(bool)

    def choose_batch(self, features: np.ndarray | Sequence[Sequence[float]],
                     costs: np.ndarray | Sequence[float]) -> np.ndarray:
        """γ for each row: ``features`` ``[b, n]``, ``costs`` ``[b, g]`` or ``[g]`` -> int64 [b]."""
        feeds = self._step_inputs(features, costs)
        if not feeds[FEATURES].shape[0]:
            return np.empty(0, np.int64)
        return self._step.session.run([GAMMA], feeds)[0]

    def predict(self, features: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
                costs: np.ndarray | Sequence[float]) -> Prediction:
        """γ, expected tokens per γ and the survival curve, always with a batch axis."""
        feeds = self._step_inputs(features, costs)
        g = self.info.n_options
        if not feeds[FEATURES].shape[0]:
            return Prediction(np.empty(0, np.int64), np.empty((0, g), np.float32),
                              np.empty((0, self.info.survival_width), np.float32))
        return Prediction(*self._step.session.run(list(STEP_OUTPUTS), feeds))

    def predict_pre(self, pre_features, costs, plain_cost) -> PrePrediction:
        """The pre-draft decision, expected tokens per γ and survival, with a batch axis."""
        feeds = self._pre_inputs(pre_features, costs, plain_cost)
        g = self.info.n_options
        if not feeds[PRE_FEATURES].shape[0]:
            return PrePrediction(np.empty(0, bool), np.empty((0, g), np.float32),
                                 np.empty((0, self.info.survival_width), np.float32))
        speculate, expected, survival = self._pre.session.run(list(PRE_OUTPUTS), feeds)
        return PrePrediction(speculate.astype(bool), expected, survival)

    def __repr__(self) -> str:
        return (f"Controller({self.source!r}, features={len(self.info.feature_names)}+"
                f"{len(self.info.pre_feature_names)}, gammas={list(self.info.gammas)}, "
                f"speckv {self.info.speckv_version})")

