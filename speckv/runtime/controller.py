"""The runtime controller: an exported speckv ONNX file behind ``choose(features, costs) -> γ``.

numpy + onnxruntime only. ``Controller.load`` reads the file's metadata before onnxruntime
sees it and refuses, with a message that says what to do, a file that is not ONNX, not
speckv's, of another format version, or built for other features or candidate γs.

Hot path (``choose``, one decision): the features and costs are copied into one preallocated
float32 row that onnxruntime reads in place through an IOBinding, checked there with a few
sub-microsecond numpy calls, and the graph writes γ into a preallocated int64 cell. Nothing
is allocated per call besides the returned ``int`` and a few numpy scalars. ``session.run``
(a dict of fresh arrays in, a list of fresh arrays out) costs a few microseconds more and
serves the batch calls, where it amortises. Because of the shared buffers one ``Controller``
must not run ``choose`` from two threads at once: give each thread its own, or hold a lock.
"""

from __future__ import annotations

import functools
import os
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
    OUTPUT_NAMES,
    SURVIVAL,
    ControllerInfo,
    describe_difference,
)
from speckv.runtime.errors import (
    BadInputError,
    CandidateMismatchError,
    ControllerFormatError,
    ControllerNotFoundError,
    FeatureMismatchError,
)
from speckv.runtime.features import FEATURE_NAMES, GAMMAS

DEFAULT_THREADS: Final = 1
PROVIDERS: Final = ("CPUExecutionProvider",)
#: A controller is a few kilobytes; refuse to read anything this large (a wrong path).
MAX_CONTROLLER_BYTES: Final = 64 * 2**20
_FLOAT: Final = "tensor(float)"
_isfinite: Final = np.isfinite
_INT64: Final = "tensor(int64)"
_FIX_FEATURES: Final = ("Build the vector with speckv.runtime.features.step_features (or History + "
                        "token_stats) from the draft's first-proposal logits.")
_FIX_COSTS: Final = ("Pass the seconds of a step drafting each candidate γ, measured on this "
                     "machine: speckv.runtime.costs_from(cost_draft_s, cost_verify_s).")


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


def read_info(data: bytes, source: str) -> ControllerInfo:
    """Parse the metadata of a serialized controller (no onnxruntime involved)."""
    try:
        header = onnx_proto.parse_model(data, graph=False)
    except onnx_proto.ProtoError as exc:
        raise ControllerFormatError(
            f"{source} is not an ONNX model ({exc}). Pass a controller written by "
            "`python -m speckv export` (an .onnx file).") from None
    return ControllerInfo.from_metadata(header.metadata, source=source)


def check_expected(info: ControllerInfo, source: str,
                   expected_features: Sequence[str] | None,
                   expected_gammas: Sequence[int] | None) -> None:
    """Refuse a controller whose features or candidate γs differ from the caller's."""
    if expected_features is not None and tuple(expected_features) != info.feature_names:
        raise FeatureMismatchError(
            f"{source} was trained on other features than this code builds: "
            f"{describe_difference(info.feature_names, tuple(expected_features))}. File: "
            f"{list(info.feature_names)}; expected: {list(expected_features)}. Retrain and "
            "re-export the controller with this speckv (`python -m speckv.train fit`, then "
            "`python -m speckv export`), or, if you build features in the file's order "
            "yourself, pass expected_features=None.")
    if expected_gammas is not None and tuple(int(g) for g in expected_gammas) != info.gammas:
        raise CandidateMismatchError(
            f"{source} chooses γ among {list(info.gammas)}, but {list(expected_gammas)} are "
            "expected. Retrain and re-export with the expected candidates, or pass "
            "expected_gammas=None and size the costs to the file's γs.")


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
    """Everything the graph computes for a batch of decisions."""

    gamma: np.ndarray  #: int64 [batch], each one of the controller's candidate γs
    expected_tokens: np.ndarray  #: float32 [batch, n_gammas]: E[tokens | γ] per candidate γ
    survival: np.ndarray  #: float32 [batch, gamma_max]: P(accept_len >= k), k = 1..gamma_max


class InputRow:
    """One preallocated float32 row ``[features | costs]``, filled and checked in place.

    ``features`` and ``costs`` are views of the row; an onnxruntime IOBinding (or the numpy
    reference) reads them directly. :meth:`fill` costs two copies and a finiteness mask.
    """

    def __init__(self, feature_names: Sequence[str], gammas: Sequence[int]) -> None:
        self.feature_names = tuple(feature_names)
        self.gammas = tuple(gammas)
        n, g = len(self.feature_names), len(self.gammas)
        self.row = np.zeros(n + g, np.float32)
        self.features = self.row[:n]
        self.costs = self.row[n:]
        self._finite = np.zeros(n + g, bool)
        self._feature_shape = (n,)
        self._cost_shape = (g,)

    def fill(self, features: np.ndarray | Sequence[float],
             costs: np.ndarray | Sequence[float]) -> None:
        """Copy one decision's inputs into the row; :class:`BadInputError` if they are bad."""
        f = np.asarray(features)
        c = np.asarray(costs)
        if f.shape != self._feature_shape or c.shape != self._cost_shape:
            raise self._shape_error(f, c)
        try:
            self.features[...] = f
            self.costs[...] = c
        except (TypeError, ValueError, RuntimeWarning) as exc:  # warning: overflow, -W error
            raise BadInputError(f"features and costs must be float32 numbers ({exc}). "
                                f"{_FIX_FEATURES}") from None
        # Two calls of ~0.3 µs each, where isfinite(...).all() and min() take over 1 µs:
        # argmin finds the first False of the finiteness mask (and the first NaN of the costs).
        finite = _isfinite(self.row, out=self._finite)
        costs = self.costs
        if not (finite[finite.argmin()] and costs[costs.argmin()] > 0.0):
            raise values_error(self.features[None], self.costs[None], self.feature_names,
                               self.gammas)

    def _shape_error(self, f: np.ndarray, c: np.ndarray) -> BadInputError:
        n, g = self._feature_shape[0], self._cost_shape[0]
        if f.shape != self._feature_shape:
            batch = " (for many decisions at once use choose_batch)" if f.ndim == 2 else ""
            return BadInputError(
                f"features must be a 1-D vector of {n} values in the order "
                f"{list(self.feature_names)}; got shape {f.shape}{batch}. {_FIX_FEATURES}")
        return BadInputError(
            f"costs must be a 1-D vector of {g} values, one per candidate γ "
            f"{list(self.gammas)}; got shape {c.shape}. {_FIX_COSTS}")


def values_error(features: np.ndarray, costs: np.ndarray, feature_names: Sequence[str],
                 gammas: Sequence[int]) -> BadInputError:
    """The message for non-finite features or bad costs (``[b, n]`` and ``[b, g]`` arrays)."""
    rows, cols = np.nonzero(~np.isfinite(features))
    if rows.size:
        where = ", ".join(f"{feature_names[j]}={features[i, j]}"
                          + (f" (row {i})" if features.shape[0] > 1 else "")
                          for i, j in zip(rows[:4], cols[:4], strict=True))
        return BadInputError(f"features must be finite; got {where}. A NaN or inf usually "
                             f"comes from NaN draft logits. {_FIX_FEATURES}")
    bad = ~(np.isfinite(costs) & (costs > 0))
    rows, cols = np.nonzero(bad)
    where = ", ".join(f"γ={gammas[j]}: {costs[i, j]}"
                      + (f" (row {i})" if costs.shape[0] > 1 else "")
                      for i, j in zip(rows[:4], cols[:4], strict=True))
    return BadInputError(f"costs must be finite and > 0 (they are step times; only their "
                         f"ratios matter); got {where}. {_FIX_COSTS}")


def batch_inputs(features: np.ndarray | Sequence[Sequence[float]],
                 costs: np.ndarray | Sequence[float], feature_names: Sequence[str],
                 gammas: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 ``[b, n]`` features and ``[b, g]`` costs for a batch call.

    ``features`` may be one vector ``[n]`` (a batch of one); ``costs`` may be one vector
    ``[g]`` shared by every row.
    """
    n, g = len(feature_names), len(gammas)
    try:
        f = np.asarray(features, dtype=np.float32)
        c = np.asarray(costs, dtype=np.float32)
    except (TypeError, ValueError, RuntimeWarning) as exc:
        raise BadInputError(f"features and costs must be float32 numbers ({exc}). "
                            f"{_FIX_FEATURES}") from None
    if f.ndim == 1:
        f = f[None]
    if f.ndim != 2 or f.shape[1] != n:
        raise BadInputError(f"features must be [batch, {n}] (columns in the order "
                            f"{list(feature_names)}); got shape {f.shape}. {_FIX_FEATURES}")
    if c.ndim == 1 and c.shape == (g,):
        c = np.broadcast_to(c, (f.shape[0], g))
    if c.shape != (f.shape[0], g):
        raise BadInputError(f"costs must be [{g}] (shared by every row) or [{f.shape[0]}, {g}] "
                            f"(one column per candidate γ {list(gammas)}); got shape {c.shape}. "
                            f"{_FIX_COSTS}")
    if not (np.isfinite(f).all() and np.isfinite(c).all() and (c > 0).all()):
        raise values_error(f, c, feature_names, gammas)
    return np.ascontiguousarray(f), np.ascontiguousarray(c)


class Controller:
    """An exported speckv controller on onnxruntime. Build it with :meth:`load`.

    Not thread-safe for :meth:`choose` (it reuses its input and output buffers); the batch
    methods allocate and are safe to call concurrently.
    """

    def __init__(self, session: ort.InferenceSession, info: ControllerInfo,
                 source: str = "<controller>") -> None:
        self.session = session
        self.info = info
        self.source = source
        _check_signature(session, info, source)
        n, g = len(info.feature_names), len(info.gammas)
        self._row = InputRow(info.feature_names, info.gammas)
        self._gamma = np.zeros(1, np.int64)
        self._expected = np.zeros((1, g), np.float32)  # bound so no output is allocated
        self._survival = np.zeros((1, info.gamma_max), np.float32)
        binding = session.io_binding()
        binding.bind_input(FEATURES, "cpu", 0, np.float32, [1, n], self._row.features.ctypes.data)
        binding.bind_input(COSTS, "cpu", 0, np.float32, [1, g], self._row.costs.ctypes.data)
        for name, out in ((GAMMA, self._gamma), (EXPECTED_TOKENS, self._expected),
                          (SURVIVAL, self._survival)):
            binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self._binding = binding
        self._run = bound_call(session, binding)
        self._fill = self._row.fill

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int = DEFAULT_THREADS,
             expected_features: Sequence[str] | None = FEATURE_NAMES,
             expected_gammas: Sequence[int] | None = GAMMAS) -> Controller:
        """Open an exported controller and check it against what the caller will pass.

        ``expected_features``: the feature names, in order, the caller builds (default:
        :data:`speckv.runtime.features.FEATURE_NAMES`); ``expected_gammas``: the candidate γs the
        costs are given for (default :data:`speckv.runtime.features.GAMMAS`). None skips a check.
        ``threads``: onnxruntime intra-op threads (1 is fastest for this tiny graph).
        """
        path, data = read_controller_bytes(path)
        info = read_info(data, str(path))
        check_expected(info, str(path), expected_features, expected_gammas)
        return cls(open_session(data, str(path), threads), info, str(path))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.info.feature_names

    @property
    def gammas(self) -> tuple[int, ...]:
        return self.info.gammas

    def choose(self, features: np.ndarray | Sequence[float],
               costs: np.ndarray | Sequence[float]) -> int:
        """γ for one decision: ``features`` ``[n_features]``, ``costs`` ``[n_gammas]`` (> 0)."""
        self._fill(features, costs)
        self._run()
        return self._gamma.item()

    def choose_batch(self, features: np.ndarray | Sequence[Sequence[float]],
                     costs: np.ndarray | Sequence[float]) -> np.ndarray:
        """γ for each row: ``features`` ``[b, n]``, ``costs`` ``[b, g]`` or ``[g]`` -> int64 [b]."""
        f, c = batch_inputs(features, costs, self.info.feature_names, self.info.gammas)
        if not f.shape[0]:
            return np.empty(0, np.int64)
        return self.session.run([GAMMA], {FEATURES: f, COSTS: c})[0]

    def predict(self, features: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
                costs: np.ndarray | Sequence[float]) -> Prediction:
        """γ, expected tokens per γ and the survival curve, always with a batch axis."""
        f, c = batch_inputs(features, costs, self.info.feature_names, self.info.gammas)
        if not f.shape[0]:
            return Prediction(np.empty(0, np.int64),
                              np.empty((0, len(self.info.gammas)), np.float32),
                              np.empty((0, self.info.gamma_max), np.float32))
        gamma, expected, survival = self.session.run(list(OUTPUT_NAMES),
                                                     {FEATURES: f, COSTS: c})
        return Prediction(gamma, expected, survival)

    def __repr__(self) -> str:
        return (f"Controller({self.source!r}, features={len(self.info.feature_names)}, "
                f"gammas={list(self.info.gammas)}, speckv {self.info.speckv_version})")


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


def _check_signature(session: ort.InferenceSession, info: ControllerInfo, source: str) -> None:
    """The graph's inputs and outputs must be speckv's, with widths that match the metadata."""
    n, g = len(info.feature_names), len(info.gammas)
    want = {FEATURES: (_FLOAT, n), COSTS: (_FLOAT, g), GAMMA: (_INT64, None),
            EXPECTED_TOKENS: (_FLOAT, g), SURVIVAL: (_FLOAT, info.gamma_max)}
    found = {a.name: a for a in (*session.get_inputs(), *session.get_outputs())}
    names_in = tuple(a.name for a in session.get_inputs())
    names_out = tuple(a.name for a in session.get_outputs())
    problems = []
    if set(names_in) != set(INPUT_NAMES) or set(names_out) != set(OUTPUT_NAMES):
        problems.append(f"inputs {list(names_in)} and outputs {list(names_out)} instead of "
                        f"{list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}")
    else:
        for name, (kind, width) in want.items():
            arg = found[name]
            shape = list(arg.shape)
            rank = 1 if width is None else 2
            if arg.type != kind or len(shape) != rank or (width is not None
                                                          and shape[1] != width):
                problems.append(f"{name} is {arg.type} {shape}, expected {kind} "
                                f"{['batch'] if width is None else ['batch', width]}")
    if problems:
        raise ControllerFormatError(
            f"{source} does not have speckv's controller signature ({'; '.join(problems)}). "
            "Re-export it with `python -m speckv export`.")
