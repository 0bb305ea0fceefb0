"""``speckv export``: a trained controller checkpoint to ONNX, checked against PyTorch and
timed (see :mod:`speckv.export.graph`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speckv.atomic import remove_stale_temps
from speckv.errors import SpeckvError
from speckv.export.graph import (
    DEFAULT_LOG_DIR,
    DEFAULT_OUT,
    ExportError,
    export_controller,
    find_checkpoint,
)
from speckv.train.checkpoint import newest_readable
from speckv.train.network import load_checkpoint

log = logging.getLogger(__name__)


def _summary(report: Mapping[str, Any]) -> str:
    p, lat, rw = report["parity"], report["latency"], report["rewrites"]
    lines = [
        f"wrote {report['out']} ({report['bytes']} bytes, opset {report['opset']}, "
        f"{len(report['nodes'])} nodes: {' '.join(report['nodes'])})",
        f"  metadata  also in {report['sidecar']} (with the file's SHA-256)",
        f"  from      {report.get('checkpoint', '(in memory)')}",
        f"  scaling   {rw['scaling']}; removed {rw['removed'] or 'nothing'}",
        f"  parity    {p['rows']} {p['source']} rows against PyTorch in float64: max "
        f"|Δ expected tokens| "
        f"{p['max_abs_diff_expected_tokens']:.2e}, max |Δ survival| "
        f"{p['max_abs_diff_survival']:.2e}, γ, speculate and lookup identical"
        + (f" ({p['gamma_ties']} exact ties)" if p["gamma_ties"] else ""),
    ]
    if lat:
        lines.append(f"  latency   p50 (p99) per decision, batch 1, 1 thread, {lat['calls']} "
                     f"calls: choose {lat['p50_us']:.1f} ({lat['p99_us']:.1f}) µs, speculate "
                     f"{lat['speculate_p50_us']:.1f} ({lat['speculate_p99_us']:.1f}) µs, "
                     f"use_lookup {lat['lookup_p50_us']:.1f} ({lat['lookup_p99_us']:.1f}) µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``speckv export [--ckpt C] [--out export/speckv.onnx] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="speckv export",
        description="Export a trained controller checkpoint to ONNX, check it against "
                    "PyTorch and time it.")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="checkpoint file, or a folder searched for the newest *.ckpt "
                             f"(default: the newest under {DEFAULT_LOG_DIR}/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"ONNX file to write (default: {DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object on stdout")
    args = parser.parse_args(argv)

    ckpt = find_checkpoint(args.ckpt)
    log.info("exporting %s", ckpt)
    remove_stale_temps(args.out.parent, args.out.name)  # what killed exports left
    try:
        mlp, meta = load_checkpoint(ckpt)
    except SpeckvError as exc:
        if args.ckpt is None or not args.ckpt.is_file():
            raise
        # the file named cannot be read: say which checkpoint beside it can
        newest, _ = newest_readable((c for c in ckpt.parent.glob("*.ckpt") if c != ckpt),
                                    weights_only=False)
        if newest is None:
            raise
        raise ExportError(f"{exc} The newest readable checkpoint beside it is {newest}: pass "
                          f"--ckpt {newest} (or --ckpt {ckpt.parent} for the newest "
                          "readable one).") from None
    except Exception as exc:  # a speckv entry that does not fit SurvivalMLP
        raise ExportError(f"{ckpt} has a speckv entry but does not load into the survival "
                          f"MLP ({type(exc).__name__}: {exc}). Retrain with this speckv.") from None
    report = export_controller(mlp, meta, args.out)
    report["checkpoint"] = str(ckpt)
    print(json.dumps(report) if args.json else _summary(report))
    return 0
