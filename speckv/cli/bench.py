"""``speckv bench``: live tokens/s of the target alone, Hugging Face's generation and speckv
on one machine, with every configuration a user would try on each side (see
:mod:`speckv.decode.bench` for the protocol).

This command sits on top of the stages, so it does what the decoder's stage cannot: it reads
the bundled records, takes their test split as the default prompts, and fits the best static
choice (plain decoding or one γ per compression) on their train split by replay, as
``speckv evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from speckv.cli.draft import AUTO_DTYPE_HELP, DEVICE_HELP, DTYPES, positive
from speckv.decode.bench import (
    BEST_STATIC,
    CONTROLLER,
    DEFAULT_REPEATS,
    HF_DEFAULTS,
    HF_SPECKV,
    ONE_PROCESS,
    RESAMPLES,
    BenchError,
    Run,
    Runner,
    RunnerFactory,
    bench_compression,
    default_methods,
    held_out_prompts,
    hf_defaults,
    is_hf,
    summarize_methods,
)
from speckv.engines.gguf_draft import GGUF_DRAFT
from speckv.errors import SpeckvError
from speckv.paths import DEFAULT_CONTROLLER, LLAMACPP_CONTROLLER, LLAMACPP_RECORDS, find_file

log = logging.getLogger(__name__)

EPILOG = f"""\
methods (default: all of them): ar (the target alone in speckv's loop), hf:ar (plain
generate), hf:constant:K (assisted, constant schedule, K = 1..4 by default), hf:heuristic,
{HF_DEFAULTS} (assisted with transformers' own defaults), speckv:fixed:K, {BEST_STATIC}
(fitted on the records' train split), speckv:heuristic, speckv:onnx:PATH (the controller).
HF best is the fastest of every hf:* row, plain generate included.

--engine llamacpp runs the same protocol inside llama.cpp (`speckv bench --engine llamacpp
--help`).

NOTE: {ONE_PROCESS} Use --threads to fix the compute threads."""


def _prompt_source(ap: argparse.ArgumentParser) -> None:
    """The prompts a benchmark decodes: a file, or the first N test prompts of each task."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", help='JSONL file, one {"task", "prompt"} a line (default: '
                     "the test split of the records)")
    src.add_argument("--per-task", type=int,
                     help="the first N test prompts of each task (default: all of them)")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return format(x, spec) if x is not None else "-"


def _with_ci(value: float | None, ci: list[float | None], spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if ci[0] is None:
        return _fmt(value, spec)
    return f"{_fmt(value, spec)} [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def _table(block: dict[str, Any], with_accepted: bool = True) -> list[str]:
    rows = [("method", "tokens/s [95% CI]", "x ar [95% CI]", "x HF best [95% CI]",
             "x best static", "acc/step")]
    for name, row in block["methods"].items():
        rows.append((name, _with_ci(row["tokens_per_s"], row["ci"]),
                     _with_ci(row["ratio_to_ar"], row["ratio_to_ar_ci"]),
                     _with_ci(row["ratio_to_hf_best"], row["ratio_to_hf_best_ci"]),
                     _fmt(row["ratio_to_best_static"]),
                     _fmt(row.get("mean_accepted")) if with_accepted else ""))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                       strict=True)]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _headline(block: dict[str, Any]) -> str | None:
    row = block["methods"].get(CONTROLLER)
    if row is None:
        return None
    parts = [f"{CONTROLLER} / HF best ({block['hf_best']}) = "
             f"{_with_ci(row['ratio_to_hf_best'], row['ratio_to_hf_best_ci'])}"]
    if row["ratio_to_best_static"] is not None:
        parts.append(f"/ best static = "
                     f"{_with_ci(row['ratio_to_best_static'], row['ratio_to_best_static_ci'])}")
    if row["ratio_to_ar"] is not None:
        parts.append(f"/ ar = {_with_ci(row['ratio_to_ar'], row['ratio_to_ar_ci'])}")
    return "  " + "; ".join(parts)


def _format(result: dict[str, Any]) -> str:
    lines = []
    if "machine_description" in result:
        lines.append(f"machine: {result['machine_description']}")
    if "prompt_source" in result:
        lines.append(f"prompts: {result['prompt_source']}")
    if "hf_defaults" in result:
        d = result["hf_defaults"]
        adapts = "adapted per call" if d["threshold_adapts"] else "fixed: no scikit-learn"
        lines.append(f"{HF_DEFAULTS}: {d['num_assistant_tokens']} assistant tokens, "
                     f"{d['num_assistant_tokens_schedule']} schedule, confidence threshold "
                     f"{d['assistant_confidence_threshold']} ("
                     f"{adapts})")
    for comp, block in result["by_compression"].items():
        rot = block.get("rotation")
        order = ""
        if rot:
            order = (f"; order rotated, every method in every position "
                     f"{'equally often' if rot['exact'] else 'equally often within one'}")
        static = block.get("best_static_choice")
        static = ("" if static is None else
                  f"; best static here: {'the target alone' if static == 0 else f'γ={static}'}")
        lines.append(f"\n{comp} ({block['compute_dtype']}), {result['prompts']} prompts x "
                     f"{result['repeats']} repeats, {result['max_new_tokens']} new tokens max; "
                     f"HF best: {block['hf_best']}{static}{order}")
        lines += _table(block)
        head = _headline(block)
        if head:
            lines.append(head)
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
    if len(result["by_compression"]) > 1 and "hf_best" in result:
        lines.append(f"\nall levels, HF best: {result['hf_best']}")
        lines += _table(result, with_accepted=False)
        head = _headline(result)
        if head:
            lines.append(head)
    if "resamples" in result:
        lines.append(f"\n95% CIs: paired bootstrap over prompts, {result['resamples']} "
                     f"resamples, seed {result['seed']}; tokens/s = total tokens / total "
                     "seconds (prefill included).")
    load, cores = result.get("load_average"), result.get("machine", {}).get("cores")
    if load:
        lines.append(f"load average (1 min): {load['start'][0]:.2f} at start, "
                     f"{load['end'][0]:.2f} at end, on {cores} cores")
        if cores and max(load["start"][0], load["end"][0]) > cores:
            lines.append("WARNING: the machine was busy (load above its cores): other "
                         "processes shared it, so every method ran slower than it would alone")
    for pid in result.get("other_bench_processes", []):
        lines.append(f"WARNING: another benchmark process (pid {pid}) was running")
    lines.append(f"NOTE: {ONE_PROCESS}")
    return "\n".join(lines)


def other_bench_processes() -> list[int]:
    """Other ``speckv bench`` processes on this machine (Linux; best effort)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if pid == os.getpid():
            continue
        args = [a.decode(errors="replace") for a in args if a]
        for k, arg in enumerate(args[:-1]):
            if (arg == "speckv" or arg.endswith("/speckv")) and args[k + 1] == "bench":
                found.append(pid)
                break
    return sorted(found)


def _records(pattern: str | None):
    from speckv.records import read_records, resolve_records

    paths = resolve_records(pattern)
    return paths, read_records(paths)


def fit_best_static(records):
    """The best static choice per compression, fitted on the records' train split (the
    split and the replay ``speckv evaluate`` uses)."""
    from speckv.evaluate.baselines import fit_best_static as fit
    from speckv.evaluate.replay import SPLIT_SEED, SPLIT_TEST, SPLIT_VAL, prepare, replayable_rows
    from speckv.records import split_prompts

    assign = split_prompts(records, val=SPLIT_VAL, test=SPLIT_TEST, seed=SPLIT_SEED)
    usable = replayable_rows(records, warn=False)
    return fit(prepare(records.loc[usable & (assign == "train")]))


def _hf_speckv_factory(methods: list[str]) -> RunnerFactory:
    """``hf:speckv``: Hugging Face's assisted generation with the same controller as
    ``speckv:onnx`` choosing each step (speckv.integrations.transformers)."""
    from speckv.integrations.transformers import generate_with_speckv
    from speckv.policies import from_spec

    onnx = next((m.removeprefix("speckv:") for m in methods
                 if m.startswith(CONTROLLER + ":")), f"onnx:{find_file(DEFAULT_CONTROLLER)}")

    def factory(target: Any, draft: Any, costs: Any, eos: list[int], pad: int) -> Runner:
        policy = from_spec(onnx)

        def run(ids: list[int], max_new_tokens: int) -> Run:
            trace: list[Any] = []
            started = time.perf_counter()
            out = generate_with_speckv(target, draft, policy, costs, torch.tensor([ids]),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=eos, pad_token_id=pad, trace=trace)
            seconds = time.perf_counter() - started
            return Run(out[0, len(ids):].tolist(), seconds,
                       [step.accepted for step in trace if step.drafted])

        return run

    return factory


ENGINES = ("hf", "llamacpp")


def main(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(prog="speckv bench", add_help=False)
    pre.add_argument("--engine", choices=ENGINES, default="hf")
    known, rest = pre.parse_known_args(argv)
    if known.engine == "llamacpp":
        return llamacpp_main(rest)
    return hf_main(rest)


LLAMACPP_EPILOG = """\
methods (default: all of them): llamacpp:plain (llama.cpp's greedy decoding; every ratio is to
it), llamacpp:lookup[:N] (prompt lookup, N = 10 by default), llamacpp:fixed:G (the GGUF draft,
G = 1..4 by default), llamacpp:onnx[:PATH] (speckv's controller on costs measured in
llama.cpp; default export/speckv.onnx), llamacpp:lookup:auto+onnx[:PATH] (the controller also
chooses the context lookup per step; a format-4 controller). By default the controller trained
on llama.cpp's records, export/speckv-llamacpp.onnx, runs in both forms too.

--quantization writes the demo target at llama.cpp's f16, q8_0 or q4_k_m once into the cache
(llama.cpp's quantizer, from the shipped Q4_1 file); the draft is exported on the shipped file.

The draft GGUF is exported from --draft once and cached (speckv draft export-gguf writes one
where you choose). NOTE: """ + ONE_PROCESS


def llamacpp_main(argv: list[str]) -> int:
    """``speckv bench --engine llamacpp``: every method inside llama.cpp."""
    from tqdm import tqdm

    from speckv.engines.bench import (
        PLAIN,
        bench_llamacpp,
        default_methods,
        format_result,
        needs_draft,
    )
    from speckv.engines.gguf_draft import cached_export
    from speckv.engines.llamacpp import GGUFModel, check_gguf
    from speckv.engines.quantize import QUANTIZATIONS, cached_target
    from speckv.evaluate.replay import SPLIT_SEED, SPLIT_TEST, SPLIT_VAL
    from speckv.llm.load import load_tokenizer
    from speckv.llm.weights import DEMO_TARGET, resolve
    from speckv.machine import describe, fingerprint
    from speckv.prompts import chat_ids, load_jsonl

    ap = argparse.ArgumentParser(prog="speckv bench --engine llamacpp",
                                 description="live tokens/s of speckv's loop inside llama.cpp",
                                 epilog=LLAMACPP_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _prompt_source(ap)
    ap.add_argument("--records", action="append",
                    help="a record set whose test split the prompts come from; repeat it for "
                         "several (a prompt any of them trains on is left out). Default: the "
                         "demo's and llama.cpp's (datamodules/smollm2-llamacpp, when present)")
    ap.add_argument("--gguf-target", default=None,
                    help="the target GGUF (default: the demo target's, Q4_1)")
    ap.add_argument("--quantization", default=None, choices=tuple(QUANTIZATIONS),
                    help="the target at this llama.cpp quantization, written once from "
                         "--gguf-target (or the demo target) by llama.cpp's quantizer")
    ap.add_argument("--gguf-draft", default=None,
                    help="the draft GGUF (default: --draft exported once into the cache)")
    ap.add_argument("--draft", default=GGUF_DRAFT,
                    help="the causal-LM draft to export when --gguf-draft is not given")
    ap.add_argument("--draft-type", default="bf16", choices=("bf16", "f16", "f32", "q8_0"),
                    help="the exported draft's weights (default bf16)")
    ap.add_argument("--methods", help="comma-separated subset (default: all)")
    ap.add_argument("--max-new-tokens", type=positive, default=64)
    ap.add_argument("--repeats", type=positive, default=DEFAULT_REPEATS)
    ap.add_argument("--resamples", type=positive, default=RESAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive, help="llama.cpp threads (default: the cores)")
    ap.add_argument("--extra-buffers", action="store_true",
                    help="let llama.cpp repack weights into its extra buffer types (the AMX "
                         "path that crashed on the first decode, ggml-org/llama.cpp#20824); "
                         "off by default")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    controller = find_file(DEFAULT_CONTROLLER)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else default_methods(controller, find_file(LLAMACPP_CONTROLLER)))
    base_path = check_gguf(args.gguf_target if args.gguf_target else resolve(DEMO_TARGET),
                           "target")
    target_path = (cached_target(args.quantization, base_path) if args.quantization
                   else base_path)
    if args.gguf_draft:
        check_gguf(args.gguf_draft, "draft")
    if args.prompts:
        prompts = load_jsonl(args.prompts)
        source = f"{args.prompts} ({len(prompts)})"
    else:
        from speckv.decode.bench import held_out_prompts

        sets = args.records or [None, *([LLAMACPP_RECORDS] if find_file(LLAMACPP_RECORDS)
                                        .is_file() else [])]
        loaded = [_records(pattern) for pattern in sets]
        record_paths = [p for paths_, _ in loaded for p in paths_]
        prompts = held_out_prompts(loaded[0][1], args.per_task, val=SPLIT_VAL,
                                   test=SPLIT_TEST, seed=SPLIT_SEED,
                                   also=[df for _, df in loaded[1:]])
        source = (f"test split of {' and '.join(map(str, record_paths))} (no set trains on "
                  f"them): {len(prompts)} prompts"
                  + (f", the first {args.per_task} per task" if args.per_task else ""))
    tok = load_tokenizer(DEMO_TARGET if not args.gguf_target else args.gguf_target)
    ids = [chat_ids(tok, p.text) for p in prompts]
    draft_path = None
    if needs_draft(methods):
        draft_path = Path(args.gguf_draft) if args.gguf_draft else \
            cached_export(Path(args.draft), base_path, args.draft_type)
    longest = max(map(len, ids)) + args.max_new_tokens + 16
    n_ctx = max(512, 1 << (longest - 1).bit_length())
    others = other_bench_processes()
    if others:
        log.warning("another benchmark is running (pid %s): %s", ", ".join(map(str, others)),
                    ONE_PROCESS)
    load_before = os.getloadavg()
    target = GGUFModel(target_path, n_ctx=n_ctx, threads=args.threads,
                       extra_buffers=args.extra_buffers, what="target")
    draft = None if draft_path is None else GGUFModel(
        draft_path, n_ctx=n_ctx, threads=args.threads, extra_buffers=args.extra_buffers,
        what="draft")
    with tqdm(total=len(prompts) * len({*methods, PLAIN}) * args.repeats, desc="bench",
              unit="run", file=sys.stderr) as bar:
        result = bench_llamacpp(target, draft, ids, [p.prompt_id for p in prompts], methods,
                                args.max_new_tokens, repeats=args.repeats,
                                resamples=args.resamples, seed=args.seed,
                                default_controller=controller if controller.is_file() else None,
                                progress=bar)
    fp = fingerprint(target.threads)
    result.update(prompt_source=source, repeats=args.repeats,
                  max_new_tokens=args.max_new_tokens, machine=fp,
                  machine_description=describe(fp), engine="llamacpp",
                  extra_buffers=args.extra_buffers,
                  load_average={"start": list(load_before), "end": list(os.getloadavg())},
                  other_bench_processes=sorted(set(others) | set(other_bench_processes())),
                  note=ONE_PROCESS)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def hf_main(argv: list[str]) -> int:
    from tqdm import tqdm

    from speckv.decode.decoder import measure_step_costs
    from speckv.decode.dtype import resolve_dtype
    from speckv.evaluate.replay import SPLIT_SEED, SPLIT_TEST, SPLIT_VAL
    from speckv.llm.load import COMPRESSIONS, load_draft_for, load_model
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET
    from speckv.machine import describe, fingerprint
    from speckv.prompts import load_jsonl

    ap = argparse.ArgumentParser(prog="speckv bench", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _prompt_source(ap)
    ap.add_argument("--records", help="step records for the test split and the best static "
                    "fit (default: the demo's, datamodules/smollm2-demo/*.parquet)")
    ap.add_argument("--compression", default="fp16", help="comma-separated: fp16,int8,nf4")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                    help=f"decode every prompt this many times per method (default "
                    f"{DEFAULT_REPEATS})")
    ap.add_argument("--methods", help="comma-separated subset (default: all available)")
    ap.add_argument("--resamples", type=int, default=RESAMPLES,
                    help=f"bootstrap resamples for the CIs (default {RESAMPLES})")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ap.add_argument("--draft", default=DEMO_DRAFT, help="draft model (see speckv generate)")
    ap.add_argument("--hf-draft", default=None,
                    help="the assistant of Hugging Face's own assisted rows (hf:constant:K, "
                         "hf:heuristic, hf:defaults); default --draft. Hugging Face runs its "
                         "assistant's own generate(), which a feature-conditioned draft (one "
                         "that reads the target's states) has not: with one, name a causal-LM "
                         "draft here (e.g. models/speckv-draft-v2), the best a Hugging Face "
                         "user could run")
    ap.add_argument("--target", default=DEMO_TARGET)
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="compute dtype of unquantized weights, the draft's and the target's "
                         f"(with several compressions, the draft's is the first one's). "
                         f"{AUTO_DTYPE_HELP}")
    ap.add_argument("--threads", type=positive, help="torch intra-op threads")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--engine", choices=ENGINES, default="hf",
                    help="hf (default): Hugging Face models in speckv's loop and HF's own "
                         "generation; llamacpp: every method inside llama.cpp on GGUF files "
                         "(see `speckv bench --engine llamacpp --help`)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    comps = [c.strip() for c in args.compression.split(",") if c.strip()]
    bad = [c for c in comps if c not in COMPRESSIONS]
    if bad or not comps:
        raise BenchError(f"--compression {args.compression!r}: use levels among "
                         f"{', '.join(COMPRESSIONS)}.")
    if args.repeats < 1 or args.max_new_tokens < 1 or args.resamples < 1:
        raise BenchError("--repeats, --max-new-tokens and --resamples must be at least 1.")
    explicit = args.methods is not None
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if explicit
               else default_methods())
    if "ar" not in methods:
        methods.insert(0, "ar")  # the one-token reference differences are reported against
    others = other_bench_processes()
    if others:
        log.warning("another benchmark is running (pid %s): %s", ", ".join(map(str, others)),
                    ONE_PROCESS)
    records = record_paths = None
    if not args.prompts or BEST_STATIC in methods:
        try:
            record_paths, records = _records(args.records)
        except SpeckvError as exc:
            if not args.prompts or explicit:
                raise
            log.warning("no records for %s (%s); leaving it out", BEST_STATIC, exc)
            methods.remove(BEST_STATIC)
    if args.prompts:
        prompts = load_jsonl(args.prompts)
        source = f"{args.prompts} ({len(prompts)})"
    else:
        prompts = held_out_prompts(records, args.per_task, val=SPLIT_VAL, test=SPLIT_TEST,
                                   seed=SPLIT_SEED)
        source = (f"test split of {', '.join(map(str, record_paths))} (val {SPLIT_VAL}, test "
                  f"{SPLIT_TEST}, seed {SPLIT_SEED}): {len(prompts)} prompts"
                  + (f", the first {args.per_task} per task" if args.per_task else ""))
    policies = {}
    if BEST_STATIC in methods:
        policies[BEST_STATIC] = fit_best_static(records)
        log.info("%s fitted on train: %s (0 = the target alone)", BEST_STATIC,
                 policies[BEST_STATIC].choices)
    factories = {HF_SPECKV: _hf_speckv_factory(methods)} if HF_SPECKV in methods else {}
    needs_draft = any(m not in ("ar", "hf:ar") for m in methods)
    by_comp: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}  # --dtype auto: the choice per compression, and why
    draft = hf_draft = None
    needs_hf_draft = any(is_hf(m) and m != "hf:ar" for m in methods)
    load_before = os.getloadavg()
    with tqdm(total=len(comps) * len(prompts) * len(methods) * args.repeats, desc="bench",
              unit="run", file=sys.stderr) as bar:
        for comp in comps:
            dtype, choice = resolve_dtype(args.dtype, args.target, comp, device=args.device)
            if choice is not None:
                log.info("%s", choice.describe())
                dtypes[comp] = choice.to_json()
            target = load_model(args.target, comp, dtype=dtype, device=args.device)
            if needs_draft and draft is None:
                draft = load_draft_for(args.draft, target, dtype)
            if needs_hf_draft and hf_draft is None:
                hf_draft = (load_draft_for(args.hf_draft, target, dtype) if args.hf_draft
                            else draft)
            costs = measure_step_costs(draft, target) if draft is not None else None
            bar.set_postfix_str(comp)
            by_comp[comp] = bench_compression(target, draft, prompts, methods,
                                              args.max_new_tokens, costs, bar, args.repeats,
                                              policies=policies, factories=factories,
                                              resamples=args.resamples, seed=args.seed,
                                              hf_draft=hf_draft)
            del target
    fp = fingerprint(torch.get_num_threads())
    summary = summarize_methods(by_comp, args.resamples, args.seed)
    controller = summary["methods"].get(CONTROLLER)
    result = {
        "methods": summary["methods"],
        "hf_best": summary["hf_best"],
        "controller": None if controller is None else {
            k: controller[k] for k in ("tokens_per_s", "ci", "ratio_to_hf_best",
                                       "ratio_to_hf_best_ci", "ratio_to_best_static",
                                       "ratio_to_best_static_ci", "ratio_to_ar",
                                       "ratio_to_ar_ci")},
        "identical_greedy": all(b["identical_greedy"] for b in by_comp.values()),
        "by_compression": by_comp,
        "prompts": len(prompts), "prompt_ids": [p.prompt_id for p in prompts],
        "prompt_source": source, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "resamples": args.resamples, "seed": args.seed,
        "best_static_choice": (policies[BEST_STATIC].choices if BEST_STATIC in policies
                               else None),
        "hf_defaults": hf_defaults(),
        "draft": args.draft if needs_draft else None, "target": args.target,
        "hf_draft": (args.hf_draft or args.draft) if needs_hf_draft else None,
        "dtype": args.dtype, "dtype_auto": dtypes or None,
        "threads": torch.get_num_threads(),
        "machine": fp, "machine_description": describe(fp),
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
        "other_bench_processes": sorted(set(others) | set(other_bench_processes())),
        "note": ONE_PROCESS,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(_format(result))
    return 0
