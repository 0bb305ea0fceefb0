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
import sys
import time

from speckv.distill.data import ANSWER_TOKENS, POOL_PER_TASK
from speckv.llm.load import COMPRESSIONS
from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET


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
    t.add_argument("--trained-head", action="store_true",
                   help="train and store the reduced head (default: the target's own output "
                        "embeddings of those tokens, frozen, stored as ids only)")
    t.add_argument("--eval-every", type=int, default=100,
                   help="steps between held-out agreement checks")
    e = sub.add_parser("evaluate", help="agreement and costs on held-out prompts")
    e.add_argument("--draft", default=DEMO_DRAFT,
                   help="draft(s) to compare on the same answers, comma-separated: the demo "
                        "draft, folders of saved drafts, hub ids")
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
        from speckv.distill.data import generate_data

        out = generate_data(per_task=args.per_task, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            threads=args.threads)
        print(f"distillation data in {out}")
    elif args.cmd == "distill":
        from speckv.distill.train import train
        from speckv.llm.draft import DraftSpec

        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            print(f"speckv draft distill: error: --layers {args.layers!r}: write target layer "
                  "indices, e.g. 0,1,2,3.", file=sys.stderr)
            return 2
        spec = DraftSpec(init_layers=layers, draft_vocab=args.draft_vocab,
                         trained_head=args.trained_head)
        started = time.time()
        last = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     threads=args.threads, spec=spec, eval_every=args.eval_every)
        print(json.dumps({**last, "wall_s": time.time() - started}))
    else:
        from speckv.distill.evaluate import evaluate_drafts

        specs = [d.strip() for d in args.draft.split(",") if d.strip()]
        report = evaluate_drafts(specs, args.target, args.compression.split(","),
                                 per_task=args.per_task, max_new_tokens=args.max_new_tokens,
                                 dtype=args.dtype, threads=args.threads, cold=args.cold)
        if args.json:
            print(json.dumps(report))
        else:
            for spec, rows in report["drafts"].items():
                for comp, r in rows.items():
                    allow = r["allows_tokens_per_s"]
                    print(f"{spec:24s} {comp:5s} agreement {r['agreement']:.3f}  draft/target "
                          f"cost {r['draft_over_target_cost']:.3f}  plain {allow['plain']:.1f}"
                          f"  best static {allow['best_static']:.1f} "
                          f"({allow['best_static_choice']})  bound {allow['upper_bound']:.1f}"
                          " tokens/s")
    return 0
