"""``speckv profile``, ``speckv records merge|figures`` and ``speckv import-paper``: the command
lines of profiling (see :mod:`speckv.profile.profiler`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speckv import paths
from speckv.profile.profiler import ProfileError, parse_shard, run_profile
from speckv.prompts import TASKS, Prompt, load_jsonl, suites
from speckv.records import merge, read_records

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ CLI
def _prompts(args) -> list[Prompt]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ProfileError(f"--tasks has unknown task(s) {bad}; use {', '.join(TASKS)}.")
    if args.prompts:
        return [p for p in load_jsonl(args.prompts) if p.task in tasks]
    return suites(tasks, n=args.per_task)


def main(argv: list[str]) -> int:
    from speckv.llm.load import COMPRESSIONS
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET

    ap = argparse.ArgumentParser(prog="speckv profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default=DEMO_DRAFT)
    ap.add_argument("--target", default=DEMO_TARGET)
    ap.add_argument("--compression", default="fp16,int8,nf4",
                    help="comma-separated levels among fp16,int8,nf4")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--prompts", help="JSONL file of {task, prompt} (default: bundled suites)")
    ap.add_argument("--per-task", type=int, default=40, help="prompts per task from the suites")
    ap.add_argument("--mode", choices=("trace", "live"), default="trace")
    ap.add_argument("--policy", default="fixed:4", help="live mode: the γ policy")
    ap.add_argument("--temperature", type=float, default=0.0, help="live mode: sampling")
    ap.add_argument("--seed", type=int, default=0, help="live mode: sampling seed")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of unquantized weights")
    ap.add_argument("--shard", help="i/n or auto (RANK/WORLD_SIZE)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    comps = [c.strip() for c in args.compression.split(",") if c.strip()]
    bad = [c for c in comps if c not in COMPRESSIONS]
    if bad:
        raise ProfileError(f"--compression has unknown level(s) {bad}; use fp16, int8, nf4.")
    if args.out.suffix != ".parquet":
        raise ProfileError(f"--out {args.out}: write records to a .parquet file.")
    out = run_profile(draft=args.draft, target=args.target, compressions=comps,
                      prompts=_prompts(args), out=args.out, mode=args.mode,
                      max_new_tokens=args.max_new_tokens, shard=parse_shard(args.shard),
                      dtype=args.dtype, policy=args.policy, threads=args.threads,
                      temperature=args.temperature, seed=args.seed)
    df = read_records(out)
    print(f"wrote {len(df)} step records to {out}")
    return 0


def records_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="speckv records", description="Manage step-record files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="join shards into one file")
    m.add_argument("shards", nargs="+", type=Path)
    m.add_argument("--out", required=True, type=Path)
    f = sub.add_parser("figures", help="PNG figures and a summary of profiled records")
    f.add_argument("records", nargs="*", type=Path)
    f.add_argument("--out", type=Path, default=Path(paths.DEMO_FIGURES))
    f.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "figures":
        from speckv.evaluate.data_figures import write_figures
        from speckv.records import resolve_records

        files = resolve_records([str(p) for p in args.records] or None)
        summary = write_figures(read_records(files), args.out)
        print(json.dumps(summary, indent=None if args.json else 2))
        return 0
    if args.out.exists() and args.out in args.shards:
        raise ProfileError(f"--out {args.out} is also an input; write the merge elsewhere.")
    out = merge(args.shards, args.out)
    print(f"merged {len(args.shards)} file(s) into {out} ({len(read_records(out))} rows)")
    return 0


def import_paper_main(argv: list[str]) -> int:
    from speckv.records import import_paper

    ap = argparse.ArgumentParser(prog="speckv import-paper",
                                 description="Import the seed paper's step CSV as records.")
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    df = import_paper(args.csv, args.out)
    print(f"imported {len(df)} rows ({df['prompt_id'].nunique()} generations) into {args.out}; "
          "marked not replayable")
    return 0
