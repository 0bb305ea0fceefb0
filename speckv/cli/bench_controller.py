"""``speckv bench-controller``: how long one γ decision takes, against what it saves.

Times, in one run and interleaved in rounds (so that load from other processes falls on all
of them alike), with ``time.perf_counter_ns`` around every call after a warm-up:

- ``onnx``: :meth:`speckv.runtime.Controller.choose`, the call a decoder makes per step
  (input checks, IOBinding, onnxruntime);
- ``numpy``: the same MLP in numpy (:class:`speckv.runtime.NumpyController`);
- ``floor``: an ONNX graph that only copies its input (Identity), run through the same
  session options and, at batch 1, the same bound-buffer call as ``choose`` (at batch 64,
  ``session.run`` like ``choose_batch``): what any onnxruntime call costs.

at batch 1 (µs per decision) and batch 64 (µs per row of ``choose_batch``), and the ratio of
the onnx p50 to one step of the target model at FP16: ``--target-step-ms``, else the median
``cost_verify_s[0]`` (one plain target forward) of the fp16 rows in the bundled step records.

torch-free: needs numpy and onnxruntime, and pandas + pyarrow only to read the records.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from speckv import paths
from speckv.errors import SpeckvError
from speckv.runtime import Controller, NumpyController, onnx_proto
from speckv.runtime.controller import DEFAULT_THREADS, PROVIDERS, bound_call, session_options

log = logging.getLogger(__name__)

DEFAULT_CONTROLLER: Final = Path(paths.DEFAULT_CONTROLLER)
DEFAULT_RECORDS: Final = Path(paths.DATAMODULES)
ITERS: Final = 20_000
WARMUP: Final = 2_000
ROUNDS: Final = 5
BATCH: Final = 64
INPUT_POOL: Final = 256  # distinct input rows cycled through
TARGET_COMPRESSION: Final = "fp16"


class Floor:
    """An Identity graph over ``[batch, width]`` float32 behind a bound-buffer call."""

    def __init__(self, width: int, threads: int = DEFAULT_THREADS) -> None:
        self.session = ort.InferenceSession(onnx_proto.identity_model(width),
                                            sess_options=session_options(threads),
                                            providers=list(PROVIDERS))
        self.row = np.zeros((1, width), np.float32)
        self.out = np.zeros((1, width), np.float32)
        binding = self.session.io_binding()
        binding.bind_input("features", "cpu", 0, np.float32, [1, width], self.row.ctypes.data)
        binding.bind_output("out", "cpu", 0, np.float32, [1, width], self.out.ctypes.data)
        self._binding = binding
        self.run = bound_call(self.session, binding)

    def run_batch(self, features: np.ndarray) -> np.ndarray:
        """What ``choose_batch`` pays onnxruntime for ``features`` ``[b, width]``, minus work."""
        return self.session.run(None, {"features": features})[0]


def target_step_ms(records: Path) -> tuple[float | None, str]:
    """Median target step at FP16 from step records, in ms, and where it came from."""
    files = sorted(records.glob("*.parquet")) if records.is_dir() else (
        [records] if records.is_file() else [])
    if not files:
        return None, f"unknown: no step records (*.parquet) in {records}; pass --target-step-ms"
    try:
        import pandas as pd
    except ImportError:
        return None, ("unknown: reading step records needs pandas and pyarrow "
                      "(pip install 'speckv[train]'); pass --target-step-ms")
    values: list[float] = []
    for file in files:
        try:
            frame = pd.read_parquet(file, columns=["compression", "cost_verify_s"])
        except Exception as exc:  # pyarrow's errors vary: a broken or foreign file
            log.warning("skipping %s: %s", file, exc)
            continue
        for costs in frame.loc[frame["compression"] == TARGET_COMPRESSION, "cost_verify_s"]:
            if costs is not None and len(costs) and np.isfinite(costs[0]) and costs[0] > 0:
                values.append(float(costs[0]))
    if not values:
        return None, (f"unknown: no {TARGET_COMPRESSION} rows with cost_verify_s in "
                      f"{len(files)} record file(s) under {records}; pass --target-step-ms")
    return (1e3 * statistics.median(values),
            f"median cost_verify_s[0] of {len(values)} {TARGET_COMPRESSION} step records "
            f"in {records}")


def _inputs(n_features: int, n_gammas: int, rows: int, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic finite features and increasing positive costs (latency ignores values)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, n_features)).astype(np.float32)
    draft = rng.uniform(0.004, 0.04, (rows, 1))
    costs = 0.08 + draft * np.arange(1, n_gammas + 1)[None, :]
    return features, costs.astype(np.float32)


def _percentiles(ns: np.ndarray, per: int = 1) -> dict[str, float]:
    us = ns / 1e3 / per
    return {"p50": round(float(np.percentile(us, 50)), 3),
            "p99": round(float(np.percentile(us, 99)), 3)}


def measure(calls: dict[str, Callable[[int], object]], iters: int, warmup: int,
            rounds: int = ROUNDS) -> dict[str, np.ndarray]:
    """Nanoseconds of each call ``fn(i)``, ``iters`` times each, interleaved in ``rounds``."""
    clock = time.perf_counter_ns
    for fn in calls.values():
        for i in range(warmup):
            fn(i)
    times = {name: np.empty(iters, np.int64) for name in calls}
    per_round = -(-iters // rounds)
    for start in range(0, iters, per_round):
        stop = min(start + per_round, iters)
        for name, fn in calls.items():
            out = times[name]
            for i in range(start, stop):
                t0 = clock()
                fn(i)
                out[i] = clock() - t0
    return times


def bench(path: Path, *, iters: int = ITERS, warmup: int = WARMUP, batch: int = BATCH,
          threads: int = DEFAULT_THREADS, target_ms: float | None = None,
          records: Path = DEFAULT_RECORDS) -> dict[str, Any]:
    """Run every timing on the controller at ``path``; return the report."""
    controller = Controller.load(path, threads=threads, expected_features=None,
                                 expected_gammas=None)
    reference = NumpyController.load(path, expected_features=None, expected_gammas=None)
    info = controller.info
    n, g = len(info.feature_names), len(info.gammas)
    floor = Floor(n, threads)
    features, costs = _inputs(n, g, INPUT_POOL)
    pool = len(features)
    rows = [(features[i], costs[i]) for i in range(pool)]
    batches = [(features[(np.arange(batch) + i) % pool], costs[(np.arange(batch) + i) % pool])
               for i in range(8)]

    def onnx_1(i: int) -> object:
        return controller.choose(*rows[i % pool])

    def numpy_1(i: int) -> object:
        return reference.choose(*rows[i % pool])

    def floor_1(i: int) -> object:
        return floor.run()

    def onnx_b(i: int) -> object:
        return controller.choose_batch(*batches[i % 8])

    def numpy_b(i: int) -> object:
        return reference.choose_batch(*batches[i % 8])

    def floor_b(i: int) -> object:
        return floor.run_batch(batches[i % 8][0])

    log.info("timing batch 1: %d calls each of onnx, numpy, floor", iters)
    one = measure({"onnx": onnx_1, "numpy": numpy_1, "floor": floor_1}, iters, warmup)
    batch_iters = max(iters // 10, 100)
    log.info("timing batch %d: %d calls each", batch, batch_iters)
    many = measure({"onnx": onnx_b, "numpy": numpy_b, "floor": floor_b}, batch_iters,
                   max(warmup // 10, 10))

    if target_ms is not None:
        step_ms, source = target_ms, "--target-step-ms"
    else:
        step_ms, source = target_step_ms(records)
    batch1 = {name: _percentiles(ns) for name, ns in one.items()}
    p50 = batch1["onnx"]["p50"]
    return {
        "controller": str(path),
        "speckv_version": info.speckv_version,
        "features": n,
        "gammas": list(info.gammas),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "threads": threads,
        "iters": iters,
        "batch": batch,
        "batch_iters": batch_iters,
        "batch1_us": batch1,
        f"batch{batch}_per_row_us": {name: _percentiles(ns, batch) for name, ns in many.items()},
        "onnx_over_floor_p50_us": round(p50 - batch1["floor"]["p50"], 3),
        "target_step_ms": step_ms,
        "target_step_source": source,
        "ratio_p50_to_target_step": None if step_ms is None else p50 / (step_ms * 1e3),
    }


def _table(report: dict[str, Any]) -> str:
    batch = report["batch"]
    lines = [
        f"controller {report['controller']} (speckv {report['speckv_version']}, "
        f"{report['features']} features, γ in {report['gammas']})",
        f"onnxruntime {report['onnxruntime']}, numpy {report['numpy']}, {report['threads']} "
        f"thread(s); {report['iters']} calls at batch 1, {report['batch_iters']} at batch {batch}",
        "",
        f"{'':<10}{'':<24}{'p50 µs':>10}{'p99 µs':>10}",
    ]
    names = {"onnx": "onnx (Controller.choose)", "numpy": "numpy MLP", "floor": "floor (Identity)"}
    for title, key in (("batch 1", "batch1_us"), (f"batch {batch}", f"batch{batch}_per_row_us")):
        for i, (name, label) in enumerate(names.items()):
            stats = report[key][name]
            label = label if key == "batch1_us" else label.split(" (")[0] + ", per row"
            lines.append(f"{title if i == 0 else '':<10}{label:<24}{stats['p50']:>10.2f}"
                         f"{stats['p99']:>10.2f}")
    lines.append("")
    lines.append(f"onnx above the floor: {report['onnx_over_floor_p50_us']:.2f} µs (p50)")
    if report["target_step_ms"] is None:
        lines.append(f"target step: {report['target_step_source']}")
    else:
        lines.append(f"target step {report['target_step_ms']:.1f} ms "
                     f"({report['target_step_source']}): one decision (p50) = "
                     f"{100 * report['ratio_p50_to_target_step']:.4f}% of it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``speckv bench-controller [--controller X] [--json] [--target-step-ms MS]``."""
    parser = argparse.ArgumentParser(prog="speckv bench-controller",
                                     description="Time one γ decision of an exported "
                                                 "controller: onnxruntime, numpy, floor.")
    parser.add_argument("--controller", type=Path, default=DEFAULT_CONTROLLER,
                        help=f"exported controller (default: {DEFAULT_CONTROLLER})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (progress goes to stderr)")
    parser.add_argument("--target-step-ms", type=float, default=None,
                        help="one target decoding step in ms (default: from the step records)")
    parser.add_argument("--records", type=Path, default=DEFAULT_RECORDS,
                        help=f"step records for the target step time (default: {DEFAULT_RECORDS})")
    parser.add_argument("--iters", type=int, default=ITERS,
                        help=f"timed calls per method at batch 1 (default: {ITERS})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="onnxruntime intra-op threads (default: 1)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.threads < 1:
        parser.error("--iters and --threads must be positive")
    if args.target_step_ms is not None and not args.target_step_ms > 0:
        parser.error("--target-step-ms must be positive")
    if not args.controller.exists():
        raise SpeckvError(f"No controller at {args.controller}. Run `python -m speckv export` "
                          "first (it writes export/speckv.onnx), or pass --controller PATH.")
    report = bench(args.controller, iters=args.iters, warmup=min(WARMUP, args.iters),
                   threads=args.threads, target_ms=args.target_step_ms, records=args.records)
    print(json.dumps(report) if args.json else _table(report))
    sys.stdout.flush()
    return 0
