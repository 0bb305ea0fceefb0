"""``speckv profile``, ``speckv records merge|figures`` and ``speckv import-paper``: the command
lines of profiling (see :mod:`speckv.profile.profiler`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speckv import paths
from speckv.atomic import remove_stale_temps
from speckv.cli.draft import AUTO_DTYPE_HELP, DEVICE_HELP, DTYPES, positive
from speckv.engines.gguf_draft import GGUF_DRAFT
from speckv.engines.quantize import QUANTIZATIONS, SHIPPED
from speckv.profile.profiler import ENGINES, ProfileError, parse_shard, run_profile
from speckv.prompts import SUITE_MAX, SUITE_SIZE, TASKS, Prompt, load_jsonl, suites
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


DTYPE_HELP = ("compute dtype of unquantized weights (and of the modules int8/nf4 leave "
              "unquantized), the target's and the draft's. float32/float64 make batched traces "
              "equal one-prompt traces (bfloat16 forwards are not batch-invariant; see "
              "speckv.profile.batched). " + AUTO_DTYPE_HELP + ". With several --compression "
              "levels the dtype chosen for fp16 (unquantized weights) applies to all of them "
              "(one dtype per profile run)")


def main(argv: list[str]) -> int:
    from speckv.llm.load import COMPRESSIONS
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET
    from speckv.profile.batched import DRAFT_BATCH, TARGET_BATCH

    ap = argparse.ArgumentParser(
        prog="speckv profile",
        description="Profile speculative decoding into step records. Trace mode (greedy): the "
                    "target's answers once, batched, and the outcome of every γ and stop rule at "
                    "every position; live mode: the real decoder with one policy, timed. Several "
                    "processes: --shard auto under torchrun or srun, then `speckv records merge`.")
    ap.add_argument("--draft", default=None,
                    help=f"the draft (default: {DEMO_DRAFT}; with --engine llamacpp the "
                         f"causal-LM {GGUF_DRAFT}, exported to GGUF once)")
    ap.add_argument("--target", default=DEMO_TARGET)
    ap.add_argument("--compression", default=None,
                    help="comma-separated levels among fp16,int8,nf4 (default: all three)")
    ap.add_argument("--engine", choices=ENGINES, default="hf",
                    help="hf: Hugging Face models (default); llamacpp: trace mode inside "
                         "llama.cpp, with a GGUF target per --quantization and the draft "
                         "exported to GGUF, priced with llama.cpp's own costs")
    ap.add_argument("--quantization", default=SHIPPED,
                    help="llamacpp: comma-separated llama.cpp quantizations of the target "
                         f"among {', '.join(QUANTIZATIONS)} (default {SHIPPED}, the file the "
                         "demo target ships as); each is one compression level of the records "
                         "(f16 -> fp16, q8_0 -> int8, q4_1 and q4_k_m -> nf4)")
    ap.add_argument("--gguf-target", help="llamacpp: the target GGUF the quantizations are "
                                          "written from (default: the demo target's)")
    ap.add_argument("--gguf-draft", help="llamacpp: the draft GGUF (default: --draft exported "
                                         "once into the cache by `speckv draft export-gguf`)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--prompts", help="JSONL file of {task, prompt} (default: bundled suites)")
    ap.add_argument("--per-task", type=int, default=SUITE_SIZE,
                    help=f"prompts per task from the suites (at most {SUITE_MAX})")
    ap.add_argument("--mode", choices=("trace", "live"), default="trace")
    ap.add_argument("--policy", default="fixed:4", help="live mode: the γ policy")
    ap.add_argument("--temperature", type=float, default=0.0, help="live mode: sampling")
    ap.add_argument("--seed", type=int, default=0, help="live mode: sampling seed")
    ap.add_argument("--max-new-tokens", type=positive, default=96)
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help=DTYPE_HELP)
    ap.add_argument("--target-batch", type=positive, default=TARGET_BATCH,
                    help="trace mode: prompts whose target answers are decoded together "
                         "(1: each alone, as one-sequence decoding computes it)")
    ap.add_argument("--draft-batch", type=positive, default=DRAFT_BATCH,
                    help="trace mode: answers the draft runs over together")
    ap.add_argument("--shard", help="i/n, or auto: the launcher's rank and world size "
                                    "(torchrun RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS)")
    ap.add_argument("--threads", type=positive)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (records, records/s, ...) on stdout")
    args = ap.parse_args(argv)
    if not args.temperature >= 0:
        ap.error(f"--temperature {args.temperature}: give 0 (greedy) or more.")
    gguf_targets = None
    if args.engine == "llamacpp":
        if args.compression is not None:
            raise ProfileError("--engine llamacpp takes its levels from --quantization (f16 -> "
                               "fp16, q8_0 -> int8, q4_1 -> nf4); drop --compression.")
        args.draft = args.draft or GGUF_DRAFT
        gguf_targets, args.draft = _gguf_files(args)
        comps = list(gguf_targets)
    else:
        args.draft = args.draft or DEMO_DRAFT
        comps = [c.strip() for c in (args.compression or ",".join(COMPRESSIONS)).split(",")
                 if c.strip()]
    bad = [c for c in comps if c not in COMPRESSIONS]
    if bad:
        raise ProfileError(f"--compression has unknown level(s) {bad}; use fp16, int8, nf4.")
    if args.out.suffix != ".parquet":
        raise ProfileError(f"--out {args.out}: write records to a .parquet file.")
    if not 1 <= args.per_task <= SUITE_MAX and not args.prompts:
        raise ProfileError(f"--per-task {args.per_task}: the suites hold 1 to {SUITE_MAX} "
                           "prompts per task; pass --prompts FILE for more.")
    prompts, shard = _prompts(args), parse_shard(args.shard)
    dtype = args.dtype
    if dtype == "auto" and comps and args.engine == "hf":
        import torch

        from speckv.decode.dtype import resolve_dtype

        if args.threads:  # measured with the threads the profile runs with
            torch.set_num_threads(args.threads)
        dtype, choice = resolve_dtype(dtype, args.target, comps[0] if len(comps) == 1 else "fp16",
                                      device=args.device)
        log.info("%s%s", choice.describe(), "" if len(comps) == 1 else
                 f"; applied to every level profiled ({', '.join(comps)})")
    run = run_profile(draft=args.draft, target=args.target, compressions=comps,
                      prompts=prompts, out=args.out, mode=args.mode,
                      max_new_tokens=args.max_new_tokens, shard=shard,
                      dtype=dtype, policy=args.policy, threads=args.threads,
                      temperature=args.temperature, seed=args.seed, device=args.device,
                      target_batch=args.target_batch, draft_batch=args.draft_batch,
                      engine=args.engine, gguf_targets=gguf_targets)
    summary = run.to_json()
    if run.out is not None:
        summary["rows"] = len(read_records(run.out))
    if args.json:
        print(json.dumps(summary))
    elif run.out is None:
        print(f"shard {run.shard[0]}/{run.shard[1]}: no prompts fall into this shard; "
              "nothing written")
    else:
        speed = (f" ({run.records} computed at {run.records_per_s:.1f} records/s)"
                 if run.records_per_s else "")
        print(f"wrote {summary['rows']} step records to {run.out}{speed}")
    return 0


def _gguf_files(args) -> tuple[dict[str, str], str]:
    """``--engine llamacpp``: the target GGUF of each compression level and the draft GGUF,
    written once into the cache where they are not given."""
    from speckv.engines.gguf_draft import cached_export
    from speckv.engines.llamacpp import check_gguf, compression_of
    from speckv.engines.quantize import cached_target, check_quantization
    from speckv.llm.weights import resolve

    base = check_gguf(args.gguf_target or resolve(args.target), "target")
    targets: dict[str, str] = {}
    for q in (check_quantization(q) for q in args.quantization.split(",") if q.strip()):
        level = compression_of(QUANTIZATIONS[q])
        if level in targets:
            raise ProfileError(f"--quantization {args.quantization}: two quantizations are the "
                               f"{level} level of the records; profile them into separate "
                               "--out files.")
        targets[level] = str(cached_target(q, base))
    if not targets:
        raise ProfileError("--quantization is empty: name one of "
                           f"{', '.join(QUANTIZATIONS)}.")
    if args.gguf_draft:
        draft = check_gguf(args.gguf_draft, "draft")
    else:
        draft = cached_export(resolve(args.draft), base)
    return targets, str(draft)


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
    c = sub.add_parser("columns", help="the records' columns with their units, as a Markdown "
                                       "table (the schema: speckv.records.SCHEMA)")
    c.add_argument("--card", type=Path, help="write the table into this data card, between "
                                             "its column markers, instead of printing it")
    args = ap.parse_args(argv)
    if args.cmd == "columns":
        from speckv.atomic import atomic_write
        from speckv.records import schema_table, with_schema_table

        if args.card is None:
            print(schema_table(), end="")
            return 0
        if not args.card.is_file():
            raise ProfileError(f"--card {args.card} does not exist; pass a data card (README.md).")
        text = with_schema_table(args.card.read_text(), str(args.card))
        atomic_write(args.card, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote the column table into {args.card}")
        return 0
    if args.cmd == "figures":
        from speckv.evaluate.data_figures import write_figures
        from speckv.records import resolve_records

        files = resolve_records([str(p) for p in args.records] or None)
        summary = write_figures(read_records(files), args.out)
        print(json.dumps(summary, indent=None if args.json else 2))
        return 0
    if args.out.exists() and args.out in args.shards:
        raise ProfileError(f"--out {args.out} is also an input; write the merge elsewhere.")
    remove_stale_temps(args.out.parent, args.out.name)  # a killed merge's
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
