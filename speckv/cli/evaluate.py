"""``speckv evaluate``: replay every γ policy on held-out trace records and say what it is
worth (see :mod:`speckv.evaluate.replay` for the replay and :mod:`speckv.evaluate.summary` for
the statistics).

Replayed tokens/s are the record files' measured costs, so they hold for the machine that
profiled, not necessarily this one: the result names both (``machine``: this machine's
:func:`speckv.machine.fingerprint`; ``record_files``: each file's metadata and the machines
its runs were measured on), and so does the printed table's caption."""


from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Final

from speckv import paths
from speckv.errors import SpeckvError
from speckv.evaluate.pipeline import run
from speckv.evaluate.replay import RESAMPLES, SPLIT_SEED, SPLIT_TEST, SPLIT_VAL, EvaluateError
from speckv.evaluate.report import print_table, write_report
from speckv.machine import describe, fingerprint
from speckv.policies import OBJECTIVES, Learned, Policy, load_onnx_chooser
from speckv.records import read_metadata, read_records
from speckv.train.chooser import TorchChooser

log = logging.getLogger(__name__)


DEFAULT_RECORDS: Final = paths.DEFAULT_RECORDS
DEFAULT_CONTROLLER: Final = paths.DEFAULT_CONTROLLER

# ---------------------------------------------------------------------------- machines
def _run_machine(run: dict[str, Any]) -> dict[str, Any] | None:
    """The fingerprint a profiling run recorded: its own, else its cost model's."""
    for where in (run, run.get("cost") or {}):
        for key in ("machine", "fingerprint"):
            if isinstance(where.get(key), dict):
                return where[key]
    return None


def _run_line(run: dict[str, Any]) -> str:
    found = _run_machine(run)
    if found is not None:
        return describe(found)
    threads = run.get("threads")  # a file written before speckv recorded the machine
    known = [str(run["machine"])] if isinstance(run.get("machine"), str) else []
    if threads:
        known.append(f"{threads} thread{'s' if threads != 1 else ''}")
    return f"machine not recorded ({', '.join(known) or 'nothing known'})"


def record_file_info(path: Path) -> dict[str, Any]:
    """A record file's metadata and one line per distinct machine its runs were measured on."""
    meta = read_metadata(path)
    runs = meta.get("runs") if isinstance(meta.get("runs"), dict) else {}
    machines = list(dict.fromkeys(_run_line(run) for run in runs.values()
                                  if isinstance(run, dict)))
    return {"path": str(path), "machines": machines or ["machine not recorded"],
            "metadata": meta}


def machine_caption(result: dict[str, Any]) -> str:
    """Where the figures come from: the records' machines, and the evaluating one."""
    measured = list(dict.fromkeys(m for f in result.get("record_files", [])
                                  for m in f["machines"]))
    return (f"costs measured on: {'; '.join(measured) or 'unknown'}\n"
            f"evaluated on: {describe(result['machine'])}")


# ---------------------------------------------------------------------------------- CLI
def _learned(args: argparse.Namespace) -> tuple[Policy | None, dict[str, Any]]:
    objective = args.objective
    if args.ckpt:
        return Learned(TorchChooser.load(args.ckpt), objective), {"source": str(args.ckpt)}
    if args.controller:
        return (Learned(load_onnx_chooser(args.controller), objective),
                {"source": str(args.controller)})
    default = paths.find(DEFAULT_CONTROLLER)
    if not default:
        return None, {"reason": f"no controller given (--ckpt C or --controller X.onnx) and "
                                f"no {DEFAULT_CONTROLLER}"}
    try:
        return Learned(load_onnx_chooser(default[0]), objective), {"source": str(default[0])}
    except SpeckvError as exc:
        log.warning("cannot load the default controller %s: %s", default[0], exc)
        return None, {"reason": f"the default controller {default[0]} could not be loaded: {exc}"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speckv evaluate",
        description="Replay every γ policy on the held-out prompts of trace records: "
                    "tokens/s, speedup, tokens/step, acceptance with bootstrap CIs, and exact "
                    "paired sign-flip tests over prompts of the learned policy against fixed "
                    "γ=4, the best fixed γ and the best static choice (plain decoding or a "
                    "fixed γ per compression).")
    parser.add_argument("--records", nargs="+", metavar="R",
                        help=f"trace record files (default: {DEFAULT_RECORDS})")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="C",
                     help="training checkpoint (.ckpt, or a run folder); it makes both "
                          "decisions of a step as the file exported from it does")
    src.add_argument("--controller", metavar="X.onnx",
                     help=f"exported controller (default: {DEFAULT_CONTROLLER} if present)")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object with every figure on stdout")
    parser.add_argument("--report", metavar="DIR", type=Path,
                        help="write report.md and PNG plots to DIR")
    parser.add_argument("--objective", choices=OBJECTIVES, default="tokens_per_s",
                        help="what the learned policy, the oracle and best_fixed maximise, and "
                             "the metric of the p-values (default: tokens_per_s)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="prompts to evaluate on (default: test, held out from training)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap and of any Monte Carlo sign-flip test "
                             "(default 0)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"bootstrap resamples (default {RESAMPLES})")
    parser.add_argument("--policy", action="append", default=[], metavar="SPEC",
                        help="evaluate another policy too, e.g. confidence:0.6 (repeatable)")
    parser.add_argument("--val", type=float, default=SPLIT_VAL,
                        help="validation fraction of the split (must match training)")
    parser.add_argument("--test", type=float, default=SPLIT_TEST,
                        help="test fraction of the split (must match training)")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED,
                        help="seed of the split (must match training)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records:
        files = [Path(p) for p in args.records]
    else:
        files = paths.find(DEFAULT_RECORDS)
        if not files:
            raise EvaluateError(
                f"No records given and none at {DEFAULT_RECORDS}. Make trace records with "
                "`speckv profile --draft D --target T --compression fp16,int8,nf4 --mode "
                "trace --out datamodules/NAME/NAME.parquet`, or pass --records R ..."
            )
    learned, learned_info = _learned(args)  # a bad --ckpt/--controller is a PolicyError
    if learned is None:
        log.warning("learned policy skipped: %s; evaluating the baselines only",
                    learned_info["reason"])
    records = read_records(files)
    result, _, _ = run(records, learned, objective=args.objective, split=args.split,
                            seed=args.seed, resamples=args.resamples, extra=args.policy,
                            split_fractions=(args.val, args.test, args.split_seed))
    result["learned"].update(learned_info)
    result["records"] = [str(p) for p in files]
    result["machine"] = fingerprint()
    result["record_files"] = [record_file_info(p) for p in files]
    if args.report:
        written = write_report(result, args.report)
        result["report"] = [str(f) for f in written]
        log.info("wrote %s", ", ".join(str(f) for f in written))
    table = sys.stderr if args.json else sys.stdout
    print_table(result, table)
    print(machine_caption(result), file=table)
    if args.json:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        sys.stdout.flush()
    return 0

