"""``speckv bench-controller``: how long a step's decisions take, against what they save.

Times, in one run and interleaved in rounds (so that load from other processes falls on all
of them alike), with ``time.perf_counter_ns`` around every call after a warm-up:

- ``end_to_end``: :meth:`speckv.runtime.Controller.choose_from_logits`, the whole γ
  decision from the draft's first-proposal logits (``--vocab`` floats): statistics, step
  vector, checks and the step head (``end_to_end_us`` in the JSON);
- ``statistics``: the draft statistics alone (:class:`speckv.runtime.RowStats`);
- ``speculate``: :meth:`~speckv.runtime.Controller.speculate_for`, the pre-draft decision
  from a :class:`~speckv.runtime.History` (pre-draft vector, checks, the pre-draft head);
- ``onnx``: :meth:`~speckv.runtime.Controller.choose`, from a ready feature vector (the MLP
  part: input checks, IOBinding, onnxruntime; ``mlp_us``);
- ``graph``: the step head's onnxruntime call alone, its inputs already in the bound buffers
  (what ``choose`` spends outside its input copies and checks; ``graph_us``);
- ``numpy``: the same MLP in numpy (:class:`speckv.runtime.NumpyController`);
- ``floor``: an ONNX graph that only copies its input (Identity), run through the same
  session options and, at batch 1, the same bound-buffer call as ``choose`` (at batch 64,
  ``session.run`` like ``choose_batch``): what any onnxruntime call costs (``floor_us``);
- ``locked``: ``choose`` inside a ``threading.Lock`` (uncontended): what serialising the
  calls would have cost, against the per-thread buffers the controller uses.

at batch 1 (µs per decision) and batch 64 (µs per row of ``choose_batch``), and the ratio of
a step's decisions (end to end plus speculate, p50) to one step of the target model at FP16:
``--target-step-ms``, else the median ``cost_verify_s[0]`` (one plain target forward) of the
fp16 rows in the bundled step records. A thread check shares one controller between
``--check-threads`` threads and counts decisions that differ from the single-threaded ones.

torch-free: needs numpy and onnxruntime, and pandas + pyarrow only to read the records.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from speckv import paths
from speckv.errors import SpeckvError
from speckv.machine import describe, fingerprint
from speckv.runtime import Controller, History, NumpyController, RowStats, StepCosts, onnx_proto
from speckv.runtime.controller import DEFAULT_THREADS, PROVIDERS, bound_call, session_options

log = logging.getLogger(__name__)

DEFAULT_CONTROLLER: Final = Path(paths.DEFAULT_CONTROLLER)
DEFAULT_RECORDS: Final = Path(paths.DATAMODULES)
ITERS: Final = 20_000
WARMUP: Final = 2_000
ROUNDS: Final = 5
BATCH: Final = 64
INPUT_POOL: Final = 256  # distinct input rows cycled through
LOGITS_POOL: Final = 8  # distinct logits rows cycled through (each is --vocab floats)
VOCAB: Final = 49_152  # SmolLM2's vocabulary
CHECK_THREADS: Final = 4
CHECK_CALLS: Final = 2_000  # per thread
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


def _histories(count: int, seed: int = 0) -> list[History]:
    """Histories of answers in progress, some with deferred tokens (plain steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        history = History()
        for _ in range(int(rng.integers(0, 300))):
            history.settle(bool(rng.random() < 0.5), float(rng.uniform(0.1, 1.0)))
        out.append(history)
    return out


def thread_check(controller: Controller, features: np.ndarray, costs: np.ndarray,
                 threads: int = CHECK_THREADS, calls: int = CHECK_CALLS) -> dict[str, Any]:
    """Share ``controller`` between ``threads`` threads; count γs that differ from the
    single-threaded answers, and time the calls."""
    want = [controller.choose(f, c) for f, c in zip(features, costs, strict=True)]
    wrong = [0] * threads
    times = np.empty((threads, calls), np.int64)
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        order = np.random.default_rng(k).integers(0, len(features), calls).tolist()
        choose, clock = controller.choose, time.perf_counter_ns
        start.wait()
        for j, i in enumerate(order):
            t0 = clock()
            got = choose(features[i], costs[i])
            times[k, j] = clock() - t0
            wrong[k] += got != want[i]

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"threads": threads, "calls": threads * calls, "wrong": int(sum(wrong)),
            "per_call_us": _percentiles(times.ravel())}


def bench(path: Path, *, iters: int = ITERS, warmup: int = WARMUP, batch: int = BATCH,
          threads: int = DEFAULT_THREADS, target_ms: float | None = None,
          records: Path = DEFAULT_RECORDS, vocab: int = VOCAB,
          check_threads: int = CHECK_THREADS) -> dict[str, Any]:
    """Run every timing on the controller at ``path``; return the report."""
    controller = Controller.load(path, threads=threads, expected_features=None,
                                 expected_gammas=None, expected_pre_features=None)
    reference = NumpyController.load(path, expected_features=None, expected_gammas=None,
                                     expected_pre_features=None)
    info = controller.info
    n, g = len(info.feature_names), len(info.gammas)
    floor = Floor(n, threads)
    features, costs = _inputs(n, info.n_options, INPUT_POOL)
    pool = len(features)
    rows = [(features[i], costs[i]) for i in range(pool)]
    batches = [(features[(np.arange(batch) + i) % pool], costs[(np.arange(batch) + i) % pool])
               for i in range(8)]
    rng = np.random.default_rng(1)
    logits = [(rng.standard_normal(vocab) * rng.uniform(1, 6)).astype(np.float32)
              for _ in range(LOGITS_POOL)]
    histories = _histories(LOGITS_POOL)
    step_costs = StepCosts(0.01, 0.06 * (1 + 0.05 * np.arange(g + 1)), None,
                           [0.012 * d for _, d, _ in info.trees] or None,
                           [0.06 * (1 + 0.02 * size) for size, _, _ in info.trees] or None)
    row_costs = controller.option_costs(step_costs, 1)
    deferred = _histories(LOGITS_POOL, seed=1)
    for i, history in enumerate(deferred):
        for _ in range(i % 4):
            history.defer(0.8)
    stats = RowStats()
    lock = threading.Lock()
    compression = "fp16" if "fp16" in info.compressions else info.compressions[0]

    def end_to_end(i: int) -> object:
        k = i % LOGITS_POOL
        return controller.choose_from_logits(logits[k], histories[k], compression, row_costs)

    def stats_1(i: int) -> object:
        return stats(logits[i % LOGITS_POOL])

    def speculate_1(i: int) -> object:
        return controller.speculate_for(deferred[i % LOGITS_POOL], compression, step_costs)

    def onnx_1(i: int) -> object:
        return controller.choose(*rows[i % pool])

    graph_state = controller._state()  # this thread's bound buffers, filled once
    graph_state.step_row.fill(*rows[0])
    run_graph = graph_state.run_step

    def graph_1(i: int) -> object:
        return run_graph()

    def locked_1(i: int) -> object:
        with lock:
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

    log.info("timing batch 1: %d calls each", iters)
    one = measure({"end_to_end": end_to_end, "statistics": stats_1, "speculate": speculate_1,
                   "onnx": onnx_1, "graph": graph_1, "locked": locked_1, "numpy": numpy_1,
                   "floor": floor_1},
                  iters, warmup)
    batch_iters = max(iters // 10, 100)
    log.info("timing batch %d: %d calls each", batch, batch_iters)
    many = measure({"onnx": onnx_b, "numpy": numpy_b, "floor": floor_b}, batch_iters,
                   max(warmup // 10, 10))
    log.info("checking %d threads sharing one controller", check_threads)
    check = thread_check(controller, features, costs, check_threads)

    if target_ms is not None:
        step_ms, source = target_ms, "--target-step-ms"
    else:
        step_ms, source = target_step_ms(records)
    batch1 = {name: _percentiles(ns) for name, ns in one.items()}
    per_step = batch1["end_to_end"]["p50"] + batch1["speculate"]["p50"]
    return {
        "controller": str(path),
        "speckv_version": info.speckv_version,
        "format_version": info.format_version,
        "features": n,
        "pre_features": len(info.pre_feature_names),
        "gammas": list(info.gammas),
        "vocab": vocab,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "threads": threads,
        "machine": fingerprint(threads),
        "iters": iters,
        "batch": batch,
        "batch_iters": batch_iters,
        "end_to_end_us": batch1["end_to_end"],
        "mlp_us": batch1["onnx"],
        "graph_us": batch1["graph"],
        "floor_us": batch1["floor"],
        "speculate_us": batch1["speculate"],
        "statistics_us": batch1["statistics"],
        "lock_overhead_p50_us": round(batch1["locked"]["p50"] - batch1["onnx"]["p50"], 3),
        "batch1_us": batch1,
        f"batch{batch}_per_row_us": {name: _percentiles(ns, batch) for name, ns in many.items()},
        "onnx_over_floor_p50_us": round(batch1["onnx"]["p50"] - batch1["floor"]["p50"], 3),
        "thread_check": check,
        "target_step_ms": step_ms,
        "target_step_source": source,
        "decisions_per_step_p50_us": round(per_step, 3),
        "ratio_p50_to_target_step": None if step_ms is None else per_step / (step_ms * 1e3),
    }


def _table(report: dict[str, Any]) -> str:
    batch = report["batch"]
    lines = [
        f"controller {report['controller']} (format {report['format_version']}, speckv "
        f"{report['speckv_version']}, {report['features']} + {report['pre_features']} "
        f"features, γ in {report['gammas']})",
        f"machine: {describe(report['machine'])}",
        f"onnxruntime {report['onnxruntime']}, numpy {report['numpy']}, {report['threads']} "
        f"thread(s); {report['iters']} calls at batch 1, {report['batch_iters']} at batch {batch}",
        "",
        f"{'':<10}{'':<40}{'p50 µs':>10}{'p99 µs':>10}",
    ]
    names = {"end_to_end": f"logits [{report['vocab']}] -> γ (end to end)",
             "statistics": "  of which the draft statistics",
             "speculate": "speculate or not (pre-draft, end to end)",
             "onnx": "feature vector -> γ (Controller.choose)",
             "graph": "  of which the onnxruntime call",
             "locked": "  the same inside a lock",
             "numpy": "the same MLP in numpy", "floor": "floor (Identity graph)"}
    for i, (name, label) in enumerate(names.items()):
        stats = report["batch1_us"][name]
        lines.append(f"{'batch 1' if i == 0 else '':<10}{label:<40}{stats['p50']:>10.2f}"
                     f"{stats['p99']:>10.2f}")
    per_row = report[f"batch{batch}_per_row_us"]
    for i, (name, label) in enumerate((("onnx", "choose_batch, per row"),
                                       ("numpy", "numpy MLP, per row"),
                                       ("floor", "floor, per row"))):
        lines.append(f"{f'batch {batch}' if i == 0 else '':<10}{label:<40}"
                     f"{per_row[name]['p50']:>10.2f}{per_row[name]['p99']:>10.2f}")
    check = report["thread_check"]
    lines += ["", f"onnx above the floor: {report['onnx_over_floor_p50_us']:.2f} µs (p50); "
                  f"a lock would add {report['lock_overhead_p50_us']:.2f} µs",
              f"{check['threads']} threads sharing one controller: {check['wrong']} wrong γ in "
              f"{check['calls']} calls ({check['per_call_us']['p50']:.2f} µs p50 per call)"]
    if report["target_step_ms"] is None:
        lines.append(f"target step: {report['target_step_source']}")
    else:
        lines.append(f"target step {report['target_step_ms']:.1f} ms "
                     f"({report['target_step_source']}): a step's two decisions (p50) = "
                     f"{100 * report['ratio_p50_to_target_step']:.4f}% of it")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``speckv bench-controller [--controller X] [--json] [--target-step-ms MS]``."""
    parser = argparse.ArgumentParser(prog="speckv bench-controller",
                                     description="Time a step's decisions with an exported "
                                                 "controller: from the draft's logits to γ, "
                                                 "the pre-draft decision, the MLP alone, "
                                                 "numpy and the onnxruntime floor.")
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
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help=f"logits per row for the end-to-end timing (default: {VOCAB})")
    parser.add_argument("--check-threads", type=int, default=CHECK_THREADS,
                        help="threads sharing one controller in the thread check "
                             f"(default: {CHECK_THREADS})")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.threads < 1 or args.vocab < 2 or args.check_threads < 1:
        parser.error("--iters, --threads and --check-threads must be positive, --vocab >= 2")
    if args.target_step_ms is not None and not args.target_step_ms > 0:
        parser.error("--target-step-ms must be positive")
    if not args.controller.exists():
        raise SpeckvError(f"No controller at {args.controller}. Run `python -m speckv export` "
                          "first (it writes export/speckv.onnx), or pass --controller PATH.")
    report = bench(args.controller, iters=args.iters, warmup=min(WARMUP, args.iters),
                   threads=args.threads, target_ms=args.target_step_ms, records=args.records,
                   vocab=args.vocab, check_threads=args.check_threads)
    print(json.dumps(report) if args.json else _table(report))
    sys.stdout.flush()
    return 0
