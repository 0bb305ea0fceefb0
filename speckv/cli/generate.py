"""``speckv generate``: speculative decoding from the command line with any policy, the
measured cost model and live step records (see :mod:`speckv.decode.decoder`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Final

import torch

from speckv import paths
from speckv.cli.draft import AUTO_DTYPE_HELP, DEVICE_HELP
from speckv.decode.decoder import (
    DEFAULT_MAX_NEW_TOKENS,
    DecodeError,
    SpeculativeDecoder,
    StepView,
    measure_step_costs,
    records_frame,
)
from speckv.paths import find_file
from speckv.policies import Learned, Policy

log = logging.getLogger(__name__)

#: the controller shipped with the repository; the default policy when it exists.
DEFAULT_CONTROLLER: Final = find_file(paths.DEFAULT_CONTROLLER)
#: ``--dtype`` choices: compute dtypes of unquantized weights.
DTYPES: Final = ("bfloat16", "float16", "float32", "float64")


def default_policy_spec() -> str:
    """``onnx:export/speckv.onnx`` when the shipped controller exists, else ``heuristic``."""
    return f"onnx:{DEFAULT_CONTROLLER}" if DEFAULT_CONTROLLER.is_file() else "heuristic"


def needs_costs(policy: Policy | None) -> bool:
    """Whether the policy reads ``StepContext.costs`` (the learned controllers do)."""
    return isinstance(policy, Learned)


class _Streamer:
    """Prints the answer's text as it grows (holds back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer: Any, out: Any = None) -> None:
        # sys.stdout when it streams, not when the module was imported (tests swap it)
        self.tokenizer, self.out, self.shown = tokenizer, out or sys.stdout, 0

    def __call__(self, view: StepView) -> None:
        text = self.tokenizer.decode(view.tokens[view.n_prompt :], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    def end(self, text: str) -> None:
        self.out.write(text[self.shown :] + "\n")
        self.out.flush()


def build_parser() -> argparse.ArgumentParser:
    from speckv.llm.load import COMPRESSIONS, UNTRAINED
    from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET

    ap = argparse.ArgumentParser(
        prog="speckv generate",
        description="Speculative decoding with a γ policy; lossless: greedy output equals the "
                    "target's, sampled output follows the target's distribution.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (its answer streams to the terminal)")
    src.add_argument("--prompts", type=Path, help='JSONL file, one {"task", "prompt"} a line')
    ap.add_argument("--policy", help="ar | fixed:K | heuristic | confidence:T | entropy:T | ema "
                    "| onnx:PATH (default: onnx:export/speckv.onnx if it exists, else heuristic)")
    ap.add_argument("--draft", default=DEMO_DRAFT,
                    help=f"draft model: {DEMO_DRAFT!r}, a directory, a hub id, or "
                         f"'{UNTRAINED}[:LAYERS]' (the target's layers, untrained)")
    ap.add_argument("--target", default=DEMO_TARGET, help="target model")
    ap.add_argument("--compression", default="fp16", choices=COMPRESSIONS)
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="compute dtype of unquantized weights, the draft's and the target's "
                         f"(bfloat16 or float32 on a CPU). {AUTO_DTYPE_HELP}")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--costs", type=Path, help="cost model JSON written by --save-costs for the "
                    "same draft, target, compression, dtype, threads and machine (refused "
                    "otherwise; default: measure at start-up when the policy needs costs)")
    ap.add_argument("--save-costs", type=Path, help="measure the cost model and save it here")
    ap.add_argument("--records", type=Path, help="write the live step records (.parquet)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return ap


def main(argv: list[str]) -> int:
    from speckv.decode.costs import CostModel
    from speckv.decode.dtype import resolve_dtype
    from speckv.llm.load import load_draft_for, load_model
    from speckv.prompts import Prompt, chat_ids, load_jsonl
    from speckv.train.chooser import policy_from_spec as from_spec

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give at least 1 (or leave it out).")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
    if not args.temperature >= 0:
        parser.error(f"--temperature {args.temperature}: give 0 (greedy) or more.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.records is not None and args.records.suffix != ".parquet":
        raise DecodeError(f"--records {args.records}: write step records to a .parquet file.")
    spec = args.policy or default_policy_spec()
    policy = from_spec(spec)
    prompts = ([Prompt("chat", "prompt-0", args.prompt)] if args.prompt is not None
               else load_jsonl(args.prompts))
    costs = None

    def check(dtype: str | None) -> CostModel:
        return costs.check(compression=args.compression, target_model=args.target,
                           draft_model=args.draft if policy is not None else None,
                           compute_dtype=dtype, threads=torch.get_num_threads(),
                           source=args.costs)

    if args.costs is not None:  # refused before minutes of loading, not after
        costs = CostModel.load(args.costs)
        check(None if args.dtype == "auto" else args.dtype)
    dtype, choice = resolve_dtype(args.dtype, args.target, args.compression,
                                  device=args.device)
    if choice is not None:
        log.info("%s", choice.describe())
        if costs is not None:
            check(dtype)
    target = load_model(args.target, args.compression, dtype=dtype, device=args.device)
    draft = load_draft_for(args.draft, target, dtype) if policy is not None else None
    log.info("target %s (%s, %s) loaded in %.1fs; policy %s", target.name, target.compression,
             target.compute_dtype, target.load_s, spec)
    if costs is None and draft is not None and (needs_costs(policy) or args.save_costs is not None):
        started = time.perf_counter()
        costs = measure_step_costs(draft, target)
        if choice is not None:  # the saved cost file says how its dtype was chosen
            costs.extra = {**costs.extra, "dtype_auto": choice.to_json()}
        log.info("measured step costs in %.1fs: draft %.1f ms/token, verify %s ms",
                 time.perf_counter() - started, costs.cost_draft_s * 1e3,
                 " ".join(f"{v * 1e3:.0f}" for v in costs.cost_verify_s))
    if args.save_costs is not None and costs is not None:
        costs.save(args.save_costs)
    decoder = SpeculativeDecoder(draft, target, policy, costs)
    tok = target.tokenizer
    stream = len(prompts) == 1 and not args.json
    outputs, steps = [], []
    for prompt in prompts:
        streamer = _Streamer(tok) if stream else None
        result = decoder.generate(chat_ids(tok, prompt.text), args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed, task=prompt.task,
                                  prompt_id=prompt.prompt_id, on_step=streamer)
        text = tok.decode(result.token_ids, skip_special_tokens=True)
        steps.extend(result.steps)
        outputs.append({"prompt": prompt.text, "token_ids": result.token_ids, "text": text,
                        "steps": len(result.steps), "mean_accepted": result.mean_accepted,
                        "tokens_per_s": result.tokens_per_s})
        if streamer is not None:
            streamer.end(text)
        elif not args.json:
            print(f"--- {prompt.prompt_id}\n{text}")
        log.info("%s: %d tokens in %d steps, %.2f accepted/step, %.1f tokens/s (%s)",
                 prompt.prompt_id, len(result.token_ids), len(result.steps),
                 result.mean_accepted, result.tokens_per_s, result.stop)
    if args.records is not None:
        from speckv.records import write_records

        write_records(records_frame(steps), args.records,
                      {"runs": {steps[0]["run_id"]: {
                          "draft": args.draft if draft is not None else None,
                          "target": args.target, "compression": args.compression,
                          "policy": spec, "cost": costs.to_json() if costs else None}}})
    if args.json:
        print(json.dumps({"outputs": outputs, "policy": spec, "target": args.target,
                          "draft": args.draft if draft is not None else None,
                          "compression": args.compression, "temperature": args.temperature}))
    return 0
