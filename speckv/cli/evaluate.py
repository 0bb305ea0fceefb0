"""``speckv evaluate``: replay every γ policy on held-out trace records and say what it is
worth (see :mod:`speckv.evaluate.replay` for the replay and :mod:`speckv.evaluate.summary` for
the statistics)."""


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
from speckv.policies import OBJECTIVES, Learned, Policy, load_onnx_chooser
from speckv.records import read_records
from speckv.train.chooser import TorchChooser

log = logging.getLogger(__name__)


DEFAULT_RECORDS: Final = paths.DEFAULT_RECORDS
DEFAULT_CONTROLLER: Final = paths.DEFAULT_CONTROLLER

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
    src.add_argument("--ckpt", metavar="C", help="training checkpoint (.ckpt, or a run folder)")
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
    if args.report:
        written = write_report(result, args.report)
        result["report"] = [str(f) for f in written]
        log.info("wrote %s", ", ".join(str(f) for f in written))
    if args.json:
        print_table(result, sys.stderr)
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        print_table(result, sys.stdout)
    return 0

