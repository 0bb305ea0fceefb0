"""Adaptive γ inside Hugging Face ``generate``: speckv's controller choosing how many tokens
the assistant drafts at every step.

    python examples/hf_generate.py                          # the demo pair, streamed
    python examples/hf_generate.py --prompt "Write a haiku about the sea." --max-new-tokens 64
    python examples/hf_generate.py --compare --threads 1    # tokens/s against HF's own options

Any target/assistant pair that shares a tokenizer works: replace the two loading lines with
``AutoModelForCausalLM.from_pretrained(...)`` for each. Everything after them is plain
transformers plus one speckv call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import TextStreamer

from speckv.integrations.transformers import SpeckvStep, generate_with_speckv, pair_costs
from speckv.runtime import Controller


def load_pair(target_spec: str, draft_spec: str, dtype: str):
    """The demo pair through speckv's loader (it reads the demo target's GGUF and speckv's
    draft format); a Hugging Face id or folder works as well. Returns HF modules."""
    from speckv.llm.load import load_draft_for, load_model

    target = load_model(target_spec, "fp16", dtype=dtype)
    assistant = load_draft_for(draft_spec, target, dtype)
    # With your own pair instead:
    #   target = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct")
    #   assistant = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    return target.model, assistant.model, target.tokenizer


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """``[1, n]`` ids of one user turn, through the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        return enc["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default="speckv-draft")
    parser.add_argument("--controller", default="export/speckv.onnx")
    parser.add_argument("--prompt", default="Explain what a hash table is in two sentences.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="store_true",
                        help="time HF plain, HF assisted (constant γ=1, heuristic) and speckv")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hf-draft", default="models/speckv-draft-v2",
                        help="--compare: the assistant of HF's own assisted rows when --draft "
                             "reads the target's states (HF runs its assistant's generate(), "
                             "which such a draft has not)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # 1. the pair
    target, assistant, tokenizer = load_pair(args.target, args.draft, args.dtype)
    # 2. the controller (checked against the features speckv builds) and the pair's step
    #    costs: measured once on this machine, then read from speckv's cache
    controller = Controller.load(args.controller)
    costs = pair_costs(target, assistant)
    if args.compare:
        compare(target, assistant, tokenizer, controller, costs, args)
        return
    # 3. generate: any generate keyword works (sampling, streamers, stopping criteria, ...)
    trace: list[SpeckvStep] = []
    ids = prompt_ids(tokenizer, args.prompt)
    started = time.perf_counter()
    out = generate_with_speckv(target, assistant, controller, costs, ids,
                               max_new_tokens=args.max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id,
                               streamer=TextStreamer(tokenizer, skip_prompt=True),
                               trace=trace)
    seconds = time.perf_counter() - started
    new = out.shape[1] - ids.shape[1]
    gammas = [s.gamma for s in trace if s.gamma is not None]
    print(f"\n{new} tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s), {len(trace)} "
          f"steps, γ chosen {dict(sorted((g, gammas.count(g)) for g in set(gammas)))}, "
          f"{sum(s.accepted for s in trace)} drafted tokens accepted")


def compare(target, assistant, tokenizer, controller, costs, args) -> None:
    """Tokens/s of Hugging Face's plain and assisted ``generate`` and of speckv's controller
    in it, on one prompt per task, in an order that rotates from prompt to prompt."""
    from speckv.prompts import suites

    prompts = [prompt_ids(tokenizer, p.text)
               for p in suites(("code", "math", "chat", "summarization"), n=1)]
    common = {"max_new_tokens": args.max_new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.eos_token_id}
    steps: list[SpeckvStep] = []

    helper = assistant
    if getattr(assistant, "is_feature_draft", False):  # speckv's feature-conditioned draft
        from speckv.llm.load import load_draft_for, load_model

        helper = load_draft_for(args.hf_draft, load_model(args.target, "fp16", args.dtype),
                                args.dtype).model

    def assisted(schedule: str, start: int):
        def run(ids):
            cfg = helper.generation_config  # HF keeps the heuristic's γ between calls
            cfg.num_assistant_tokens_schedule, cfg.num_assistant_tokens = schedule, start
            cfg.assistant_confidence_threshold = 0.0
            return target.generate(ids, assistant_model=helper, **common)
        return run

    methods = {
        "hf:ar": lambda ids: target.generate(ids, **common),
        "hf:constant:1": assisted("constant", 1),
        "hf:heuristic": assisted("heuristic", 4),
        "hf:speckv": lambda ids: generate_with_speckv(target, assistant, controller, costs, ids,
                                                      trace=steps, **common),
    }
    names = list(methods)
    with torch.inference_mode():
        for name in names:  # warm-up
            methods[name](prompts[0][:, :16])
        steps.clear()
        tokens = dict.fromkeys(names, 0)
        seconds = dict.fromkeys(names, 0.0)
        outputs: dict[str, list[list[int]]] = {n: [] for n in names}
        for r in range(args.repeats):
            for i, ids in enumerate(prompts):
                shift = (r * len(prompts) + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    started = time.perf_counter()
                    out = methods[name](ids)
                    seconds[name] += time.perf_counter() - started
                    tokens[name] += out.shape[1] - ids.shape[1]
                    if r == 0:
                        outputs[name].append(out[0, ids.shape[1]:].tolist())
    drafting = [s for s in steps if s.drafted]
    report = {
        "tokens_per_s": {n: round(tokens[n] / seconds[n], 2) for n in names},
        "same_output_as_hf_ar": {n: sum(a == b for a, b in zip(outputs[n], outputs["hf:ar"],
                                                                strict=True))
                                 for n in names},
        "prompts": len(prompts), "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "dtype": args.dtype,
        "speckv_gamma_counts": {str(g): sum(s.gamma == g for s in steps)
                                for g in sorted({s.gamma for s in steps if s.gamma is not None})},
        "speckv_mean_accepted": round(sum(s.accepted for s in drafting) / max(len(drafting), 1),
                                      3),
        "costs_ms": {"draft": round(costs.cost_draft_s * 1e3, 2),
                     "verify": [round(v * 1e3, 2) for v in costs.cost_verify_s]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
