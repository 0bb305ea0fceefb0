"""``speckv bench``: live tokens/s of the target alone, Hugging Face's assisted generation
and speckv on one machine (see :mod:`speckv.decode.bench` for the protocol)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from speckv.decode.bench import BenchError, bench_compression, default_methods, summarize_methods
from speckv.decode.bench import __doc__ as bench_doc


def _format(result: dict[str, Any]) -> str:
    lines = []
    for comp, block in result["by_compression"].items():
        lines.append(f"\n{comp} ({block['compute_dtype']}), {result['prompts']} prompts x "
                     f"{result['repeats']}, {result['max_new_tokens']} new tokens max; "
                     f"HF best: {block['hf_best']}")
        lines.append(f"  {'method':<18}{'tokens/s':>10}{'x ar':>8}{'x HF best':>11}"
                     f"{'acc/step':>10}")
        for name, row in block["methods"].items():
            def num(x, fmt):
                return format(x, fmt) if x is not None else "-"
            lines.append(f"  {name:<18}{row['tokens_per_s']:>10.2f}"
                         f"{num(row['ratio_to_ar'], '.2f'):>8}"
                         f"{num(row['ratio_to_hf_best'], '.2f'):>11}"
                         f"{num(row['mean_accepted'], '.2f'):>10}")
        if block["identical_greedy"]:
            lines.append("  every speckv token is the target's argmax in the forward that "
                         "verified it")
        for v in block["invariant_violations"]:
            lines.append(f"  INVARIANT BROKEN: {v['method']} on {v['prompt_id']}: "
                         f"{v['reason']}")
        for d in block["differences"]:
            gap = f"logit gap {d['logit_gap']:.3g}" if d["logit_gap"] is not None else "length"
            why = {True: "; the target's one-token and chunked forwards disagree there",
                   False: "; NOT explained by the target's forwards", None: ""}[d["explained"]]
            lines.append(f"  {d['method']} on {d['prompt_id']} parts from ar at token "
                         f"{d['first_diff']} ({gap}{why})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    from speckv.decode.costs import measure_costs
    from speckv.llm.load import COMPRESSIONS, load_draft_for, load_model
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET
    from speckv.prompts import load_jsonl, suites

    ap = argparse.ArgumentParser(prog="speckv bench", description=bench_doc.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", help='JSONL file, one {"task", "prompt"} a line')
    src.add_argument("--per-task", type=int, default=1,
                     help="prompts per task from the bundled suites (default 1)")
    ap.add_argument("--compression", default="fp16", help="comma-separated: fp16,int8,nf4")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1,
                    help="decode every prompt this many times per method (default 1)")
    ap.add_argument("--methods", help="comma-separated subset (default: all available)")
    ap.add_argument("--draft", default=DEMO_DRAFT, help="draft model (see speckv generate)")
    ap.add_argument("--target", default=DEMO_TARGET)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of unquantized weights")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    comps = [c.strip() for c in args.compression.split(",") if c.strip()]
    bad = [c for c in comps if c not in COMPRESSIONS]
    if bad or not comps:
        raise BenchError(f"--compression {args.compression!r}: use levels among "
                         f"{', '.join(COMPRESSIONS)}.")
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else default_methods())
    if "ar" not in methods:
        methods.insert(0, "ar")  # the one-token reference differences are reported against
    prompts = load_jsonl(args.prompts) if args.prompts else suites(n=args.per_task)
    needs_draft = any(m != "ar" and m != "hf:ar" for m in methods)
    by_comp: dict[str, Any] = {}
    draft = None
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise BenchError("--repeats and --max-new-tokens must be at least 1.")
    with tqdm(total=len(comps) * len(prompts) * len(methods) * args.repeats, desc="bench",
              unit="run",
              file=sys.stderr) as bar:
        for comp in comps:
            target = load_model(args.target, comp, dtype=args.dtype)
            if needs_draft and draft is None:
                draft = load_draft_for(args.draft, target, args.dtype)
            costs = measure_costs(draft, target) if draft is not None else None
            bar.set_postfix_str(comp)
            by_comp[comp] = bench_compression(target, draft, prompts, methods,
                                              args.max_new_tokens, costs, bar,
                                              args.repeats)
            del target
    result = {
        "methods": summarize_methods(by_comp),
        "identical_greedy": all(b["identical_greedy"] for b in by_comp.values()),
        "by_compression": by_comp,
        "prompts": len(prompts), "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "draft": args.draft if needs_draft else None, "target": args.target,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(_format(result))
    return 0
