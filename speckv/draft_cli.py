"""``speckv draft data|distill|evaluate``: make, train and measure the demo draft.

- ``data``: the target's greedy answers (+ top-k log-probs) to the distillation prompt pool,
  in resumable chunks under the cache directory;
- ``distill``: train the draft on them (resumable; writes ``models/speckv-draft/``);
- ``evaluate``: top-1 agreement with the target on held-out prompts (the profiling suites,
  which the draft never trained on) at every compression level, draft and target cost per
  token, and load times; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from speckv.draft import ANSWER_TOKENS, POOL_PER_TASK
from speckv.models import COMPRESSIONS, DEMO_DRAFT, DEMO_TARGET


def _evaluate(args) -> dict:
    import torch

    from speckv.costs import measure_costs
    from speckv.models import load_model
    from speckv.prompts import TASKS, chat_ids, suite

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"draft": args.draft, "target": args.target, "per_task": args.per_task,
                    "max_new_tokens": args.max_new_tokens, "compressions": {}}
    if args.cold:
        # a cold load converts the GGUF file again, into a throw-away cache directory
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("SPECKV_CACHE")
            os.environ["SPECKV_CACHE"] = tmp
            try:
                report["target_load_cold_s"] = load_model(args.target, "fp16", args.dtype).load_s
            finally:
                if old is None:
                    os.environ.pop("SPECKV_CACHE")
                else:
                    os.environ["SPECKV_CACHE"] = old
    draft = load_model(args.draft, "fp16", args.dtype)
    report["draft_load_s"] = draft.load_s
    prompts = [p for t in TASKS for p in suite(t)[: args.per_task]]
    for comp in args.compression.split(","):
        target = load_model(args.target, comp, args.dtype)
        tok = target.tokenizer
        hits = {t: [0, 0] for t in TASKS}
        for p in prompts:
            ids = chat_ids(tok, p.text)
            x = torch.tensor([ids])
            with torch.inference_mode():
                out = target.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                            max_new_tokens=args.max_new_tokens,
                                            do_sample=False, pad_token_id=tok.eos_token_id)
                answer = out[0, len(ids):]
                logits = draft.model(input_ids=out).logits[0, len(ids) - 1 : -1]
            agree = (logits.argmax(-1) == answer).numpy()
            hits[p.task][0] += int(agree.sum())
            hits[p.task][1] += len(agree)
        cost = measure_costs(draft, target)
        total = np.array(list(hits.values())).sum(0)
        report["compressions"][comp] = {
            "agreement": total[0] / total[1],
            "agreement_per_task": {t: h[0] / h[1] for t, h in hits.items()},
            "tokens": int(total[1]),
            "target_ms_per_token": 1000 * cost.cost_verify_s[0],
            "draft_ms_per_token": 1000 * cost.cost_draft_s,
            "draft_over_target_cost": cost.cost_draft_s / cost.cost_verify_s[0],
            "target_load_warm_s": target.load_s,
            "compute_dtype": target.compute_dtype,
        }
        print(f"{comp}: agreement {total[0] / total[1]:.3f} over {total[1]} tokens; "
              f"target {1000 * cost.cost_verify_s[0]:.1f} ms/token, draft "
              f"{1000 * cost.cost_draft_s:.1f} ms/token", file=sys.stderr)
    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="speckv draft", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="generate the target's answers to the training pool")
    d.add_argument("--per-task", type=int, default=POOL_PER_TASK,
                   help=f"pool prompts per task (default {POOL_PER_TASK})")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--max-new-tokens", type=int, default=ANSWER_TOKENS)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t = sub.add_parser("distill", help="train the draft (resumable)")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int)
    t.add_argument("--layers", default="0,1",
                   help="target layers the draft's layers start from (default 0,1)")
    t.add_argument("--draft-vocab", type=int, default=None,
                   help="tokens in the draft's reduced head, the most frequent of the target's "
                        "answers (default: the full vocabulary)")
    t.add_argument("--eval-every", type=int, default=100,
                   help="steps between held-out agreement checks")
    e = sub.add_parser("evaluate", help="agreement and costs on held-out prompts")
    e.add_argument("--draft", default=DEMO_DRAFT)
    e.add_argument("--target", default=DEMO_TARGET)
    e.add_argument("--compression", default=",".join(COMPRESSIONS))
    e.add_argument("--per-task", type=int, default=10)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--threads", type=int)
    e.add_argument("--cold", action="store_true", help="also time a cold (GGUF) load")
    e.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "data":
        from speckv.draft import generate_data

        out = generate_data(per_task=args.per_task, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            threads=args.threads)
        print(f"distillation data in {out}")
    elif args.cmd == "distill":
        from speckv.draft import DraftSpec, train

        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            print(f"speckv draft distill: error: --layers {args.layers!r}: write target layer "
                  "indices, e.g. 0,1,2,3.", file=sys.stderr)
            return 2
        spec = DraftSpec(init_layers=layers, draft_vocab=args.draft_vocab)
        started = time.time()
        last = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     threads=args.threads, spec=spec, eval_every=args.eval_every)
        print(json.dumps({**last, "wall_s": time.time() - started}))
    else:
        report = _evaluate(args)
        if args.json:
            print(json.dumps(report))
        else:
            for comp, r in report["compressions"].items():
                print(f"{comp:5s} agreement {r['agreement']:.3f}  target "
                      f"{r['target_ms_per_token']:.1f} ms/token  draft/target cost "
                      f"{r['draft_over_target_cost']:.3f}")
    return 0
