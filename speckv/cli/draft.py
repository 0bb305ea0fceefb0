"""``speckv draft data|distill|evaluate|export-gguf``: make, train, measure and export the
demo draft.

- ``prompts``: prompts the target writes itself (its own chat template's user turns), for
  ``data --prompts`` when there are no in-domain prompts at hand;
- ``data``: the target's greedy answers (+ top-k log-probs) to the distillation prompt pool,
  in resumable chunks under the cache directory;
- ``distill``: train the draft on them (resumable; writes ``models/speckv-draft/``);
- ``evaluate``: top-1 agreement with the target on held-out prompts (the profiling suites,
  which the draft never trained on) at every compression level, draft and target cost per
  token, and load times; ``--json`` prints one JSON object on stdout;
- ``export-gguf``: a causal-LM draft as a GGUF file on its target's GGUF, for llama.cpp
  (:mod:`speckv.engines.gguf_draft`); ``--check`` compares its logits with the torch draft's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from speckv.distill.data import ANSWER_TOKENS, CHUNK, POOL_PER_TASK
from speckv.engines.gguf_draft import GGUF_DRAFT
from speckv.llm.load import COMPRESSIONS
from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET

DTYPES = ("bfloat16", "float16", "float32", "float64")
#: what ``--dtype auto`` means, for every command that takes it.
AUTO_DTYPE_HELP = (
    "auto (the default): on a CPU, the faster of bfloat16 and float32 for this target and "
    "compression, measured at start-up (a plain one-token step, then verify forwards over "
    "2..9 tokens; the fewer target seconds per token wins, plain steps or the best fixed "
    "gamma at a per-token acceptance of 0.6, and within 3%% the cheaper plain step) and "
    "cached per target, compression, threads and machine in "
    "~/.cache/speckv/dtype/ (under $SPECKV_CACHE if set; delete a file there to measure "
    "again); on a GPU "
    "bfloat16 where it has it, else float16. One log line says what was chosen and why. "
    "nf4's 4-bit products keep computing in bfloat16 on a CPU")


#: what ``--device`` means, for every command that runs models.
DEVICE_HELP = ("where the models run: cpu, cuda (cuda:N) or auto (CUDA when there is one). "
               "Every step runs on that device; int8/nf4 use bitsandbytes' kernels for it "
               "(its CPU path on cpu)")


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (bad input is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="speckv draft", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="generate the target's answers to the training pool")
    d.add_argument("--per-task", type=positive, default=POOL_PER_TASK,
                   help=f"pool prompts per task (default {POOL_PER_TASK})")
    d.add_argument("--batch-size", type=positive, default=16)
    d.add_argument("--chunk", type=positive, default=CHUNK,
                   help=f"prompts per resumable file (default {CHUNK}): a killed run loses at "
                        "most the chunk in flight; run the same command again to resume")
    d.add_argument("--max-new-tokens", type=positive, default=ANSWER_TOKENS)
    d.add_argument("--target", default=DEMO_TARGET,
                   help="the model whose answers the draft learns (default: the demo target)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=positive, help="torch threads (default: torch's)")
    d.add_argument("--prompts", default=None,
                   help="answer your own prompts instead of the pool: a JSONL file, one "
                        '{"task", "prompt"} a line (prompts that repeat a profiling-suite '
                        "prompt are left out); train on them with distill --data")
    d.add_argument("--out", default=None,
                   help="the data folder (default: the pool's in the speckv cache; with "
                        "--prompts, distill-<file name> there)")
    w = sub.add_parser("prompts", help="prompts written by the target itself (Magpie-style), "
                       "for `draft data --prompts` when you have none of your own")
    w.add_argument("--out", required=True, help="JSONL file to write (resumed if it exists)")
    w.add_argument("--per-task", type=positive, default=500)
    w.add_argument("--tasks", default="chat,code,math,summarization",
                   help="comma-separated, among chat, code, math, summarization")
    w.add_argument("--batch-size", type=positive, default=16)
    w.add_argument("--temperature", type=positive_float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=positive, help="torch threads (default: torch's)")
    t = sub.add_parser("distill", help="train the draft (resumable)")
    t.add_argument("--steps", type=positive, default=3000)
    t.add_argument("--batch-size", type=positive, default=8)
    t.add_argument("--lr", type=positive_float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=positive)
    t.add_argument("--layers", default="0,1",
                   help="target layers the draft's layers start from (default 0,1)")
    t.add_argument("--draft-vocab", type=positive, default=None,
                   help="tokens in the draft's reduced head, the most frequent of the target's "
                        "answers (default: the full vocabulary)")
    t.add_argument("--trained-head", action="store_true",
                   help="train and store the reduced head (default: the target's own output "
                        "embeddings of those tokens, frozen, stored as ids only)")
    t.add_argument("--eval-every", type=positive, default=100,
                   help="steps between held-out agreement checks")
    t.add_argument("--arch", choices=("layers", "feature"), default="layers",
                   help="layers: the target's architecture with --layers of its own (a causal "
                        "LM); feature: one layer reading the target's last hidden state "
                        "(EAGLE-style, speckv.llm.feature_draft), trained with --depth "
                        "unrolled steps of its own states")
    t.add_argument("--depth", type=positive, default=3,
                   help="feature: unrolled drafting steps per training position (default 3)")
    t.add_argument("--reg-weight", type=float, default=1.0,
                   help="feature: weight of the state regression beside cross-entropy")
    t.add_argument("--soft-weight", type=float, default=0.0,
                   help="feature: share of the cross-entropy taken against the target's "
                        "distribution over the head's tokens instead of its token (EAGLE's "
                        "loss is 1; default 0)")
    t.add_argument("--feature-noise", type=float, default=0.0,
                   help="feature: uniform noise in [-a, a] on the target states the draft "
                        "reads while training (EAGLE's augmentation; the states' std is ~2)")
    t.add_argument("--prompt-labels", action="store_true",
                   help="feature: also learn the target's distribution at prompt positions "
                        "(with --soft-weight > 0; the prompt's tokens are not the target's)")
    t.add_argument("--weight-decay", type=float, default=0.0,
                   help="feature: AdamW weight decay")
    t.add_argument("--data", default=None,
                   help="feature: data folder(s) to train on, comma-separated (default: the "
                        "pool's; add folders `draft data --prompts` wrote)")
    t.add_argument("--init", default=None,
                   help="feature: start from this saved draft (folder) or checkpoint file, "
                        "with a fresh optimizer and schedule")
    t.add_argument("--ckpt", default=None,
                   help="feature: the resumable checkpoint file (default in the speckv cache); "
                        "a run resumes from it when it exists")
    t.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop (and save) after this many minutes of this run")
    t.add_argument("--out", default=None,
                   help="where the draft is saved (default models/speckv-draft)")
    e = sub.add_parser("evaluate", help="agreement and costs on held-out prompts")
    e.add_argument("--draft", default=DEMO_DRAFT,
                   help="draft(s) to compare on the same answers, comma-separated: the demo "
                        "draft, folders of saved drafts, hub ids")
    e.add_argument("--target", default=DEMO_TARGET)
    e.add_argument("--compression", default=",".join(COMPRESSIONS))
    e.add_argument("--per-task", type=positive, default=10)
    e.add_argument("--max-new-tokens", type=positive, default=64)
    e.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    e.add_argument("--threads", type=positive)
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--cold", action="store_true", help="also time a cold (GGUF) load")
    e.add_argument("--json", action="store_true")
    g = sub.add_parser("export-gguf", help="write a causal-LM draft as a GGUF file for "
                       "llama.cpp (speckv bench --engine llamacpp)")
    g.add_argument("--draft", default=GGUF_DRAFT,
                   help="the saved draft folder (a causal-LM draft; default %(default)s)")
    g.add_argument("--target", default=None,
                   help="the target's GGUF file, whose metadata, tokenizer and embeddings the "
                        "draft's file takes (default: the demo target's)")
    g.add_argument("--out", required=True, help="the GGUF file to write")
    g.add_argument("--type", default="bf16", choices=("bf16", "f16", "f32", "q8_0"),
                   help="the layers' weights: bf16 (the stored draft exactly; default), f16, "
                        "f32 or q8_0 (smaller and faster, rounded)")
    g.add_argument("--check", action="store_true",
                   help="compare the written file's logits with the torch draft's (full "
                        "head) on a prompt (needs llama-cpp-python)")
    g.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "export-gguf":
        return _export_gguf(args)
    if args.cmd == "evaluate":  # refuse before minutes of loading
        bad = [c for c in args.compression.split(",") if c.strip() not in COMPRESSIONS]
        if bad:
            e.error(f"--compression {args.compression!r}: use levels among "
                     f"{','.join(COMPRESSIONS)}, comma-separated.")
        if not any(d.strip() for d in args.draft.split(",")):
            e.error("--draft: name at least one draft.")
    if args.cmd == "distill":
        if not 0.0 <= args.soft_weight <= 1.0:
            t.error(f"--soft-weight {args.soft_weight}: a share between 0 and 1.")
        if args.feature_noise < 0 or args.weight_decay < 0:
            t.error("--feature-noise and --weight-decay: 0 or more.")
        if args.init and not os.path.exists(args.init):
            t.error(f"--init {args.init}: no such draft folder or checkpoint file.")
        folders = [d.strip() for d in (args.data or "").split(",") if d.strip()]
        missing = [d for d in folders if not os.path.isdir(d)]
        if missing:
            t.error(f"--data: no such data folder {', '.join(missing)}; make one with "
                    "`speckv draft data --prompts FILE --out DIR`.")
        if folders and args.arch != "feature":
            t.error("--data trains the feature-conditioned draft (--arch feature).")
        args.data = folders or None
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            layers = []
        if not layers or min(layers) < 0:
            t.error(f"--layers {args.layers!r}: write target layer indices, e.g. 0,1,2,3.")
    if args.cmd == "prompts":
        from pathlib import Path

        from speckv.distill.self_prompts import write_self_prompts
        from speckv.prompts import TASKS

        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            w.error(f"--tasks {args.tasks!r}: name tasks among {', '.join(TASKS)}.")
        made = write_self_prompts(Path(args.out), args.per_task, tasks,
                                  batch_size=args.batch_size, seed=args.seed,
                                  temperature=args.temperature, threads=args.threads)
        print(f"{len(made)} prompts in {args.out}; answer them with `speckv draft data "
              f"--prompts {args.out} --out DIR`")
        return 0
    if args.cmd == "data":
        from pathlib import Path

        from speckv.distill.data import generate_data
        from speckv.paths import cache_dir

        prompts, out = None, Path(args.out) if args.out else None
        if args.prompts:
            from speckv.prompts import load_jsonl

            prompts = load_jsonl(args.prompts)
            out = out or cache_dir() / f"distill-{Path(args.prompts).stem}"
        out = generate_data(per_task=args.per_task, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, chunk=args.chunk,
                            seed=args.seed, threads=args.threads, prompts=prompts, out=out,
                            target=args.target)
        print(f"distillation data in {out}")
    elif args.cmd == "distill":
        if args.arch == "feature":
            from pathlib import Path

            from speckv.distill.feature import train_feature_draft
            from speckv.paths import DRAFT_DIR

            started = time.time()
            last = train_feature_draft(
                Path(args.out) if args.out else DRAFT_DIR, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, depth=args.depth,
                reg_weight=args.reg_weight, soft_weight=args.soft_weight,
                feature_noise=args.feature_noise, weight_decay=args.weight_decay,
                prompt_labels=args.prompt_labels,
                init=Path(args.init) if args.init else None,
                data=[Path(d) for d in args.data] if args.data else None,
                ckpt=Path(args.ckpt) if args.ckpt else None,
                draft_vocab=args.draft_vocab or 8192,
                seed=args.seed, threads=args.threads, eval_every=args.eval_every,
                max_minutes=args.max_minutes)
            print(json.dumps({**last, "wall_s": time.time() - started}))
            return 0
        from speckv.distill.train import train
        from speckv.llm.draft import DraftSpec

        spec = DraftSpec(init_layers=layers, draft_vocab=args.draft_vocab,
                         trained_head=args.trained_head)
        started = time.time()
        last = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     threads=args.threads, spec=spec, eval_every=args.eval_every)
        print(json.dumps({**last, "wall_s": time.time() - started}))
    else:
        from speckv.distill.evaluate import evaluate_drafts

        specs = [d.strip() for d in args.draft.split(",") if d.strip()]
        report = evaluate_drafts(specs, args.target,
                                 [c.strip() for c in args.compression.split(",")],
                                 per_task=args.per_task, max_new_tokens=args.max_new_tokens,
                                 dtype=args.dtype, threads=args.threads, cold=args.cold,
                                 device=args.device)
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


#: the prompt ``export-gguf --check`` compares logits on (chat-templated by the target)
CHECK_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def _export_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speckv.engines.gguf_draft import check_logits, export_gguf
    from speckv.llm.weights import resolve

    target = Path(args.target) if args.target else Path(resolve(DEMO_TARGET))
    info = export_gguf(args.draft, target, args.out, args.type)
    if args.check:
        from speckv.llm.load import load_tokenizer
        from speckv.prompts import chat_ids

        ids = chat_ids(load_tokenizer(DEMO_TARGET if not args.target else args.target),
                       CHECK_PROMPT)
        info["check"] = check_logits(args.out, args.draft, ids)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {info['out']}: {info['layers']} layers ({info['type']}), head over the "
              f"full vocabulary, {info['bytes'] / 1e6:.1f} MB")
        if "check" in info:
            c = info["check"]
            print(f"check on {c['positions']} positions: top-1 agreement with the torch draft "
                  f"{c['top1_agreement']:.4f}, largest logit difference "
                  f"{c['max_rel_diff']:.2e} of a row's range (median {c['median_rel_diff']:.2e})")
    return 0
