"""How good a draft is for its target: top-1 agreement with the target's greedy answers to
the profiling suites (prompts the draft never trained on), per task and compression level,
and what it costs per token next to the target (``speckv draft evaluate``)."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

from speckv.decode.costs import measure_costs
from speckv.llm.load import load_model
from speckv.prompts import TASKS, chat_ids, suite


def evaluate_draft(draft_spec: str, target_spec: str, compressions: list[str], *,
                   per_task: int = 10, max_new_tokens: int = 64, dtype: str = "bfloat16",
                   threads: int | None = None, cold: bool = False) -> dict:
    """Agreement with the target's greedy answers to held-out suite prompts, per task and
    compression, with the draft's and target's measured cost per token and load times."""
    if threads:
        torch.set_num_threads(threads)
    report: dict = {"draft": draft_spec, "target": target_spec, "per_task": per_task,
                    "max_new_tokens": max_new_tokens, "compressions": {}}
    if cold:
        # a cold load converts the GGUF file again, into a throw-away cache directory
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("SPECKV_CACHE")
            os.environ["SPECKV_CACHE"] = tmp
            try:
                report["target_load_cold_s"] = load_model(target_spec, "fp16", dtype).load_s
            finally:
                if old is None:
                    os.environ.pop("SPECKV_CACHE")
                else:
                    os.environ["SPECKV_CACHE"] = old
    draft = load_model(draft_spec, "fp16", dtype)
    report["draft_load_s"] = draft.load_s
    prompts = [p for t in TASKS for p in suite(t)[: per_task]]
    for comp in compressions:
        target = load_model(target_spec, comp, dtype)
        tok = target.tokenizer
        hits = {t: [0, 0] for t in TASKS}
        for p in prompts:
            ids = chat_ids(tok, p.text)
            x = torch.tensor([ids])
            with torch.inference_mode():
                out = target.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                            max_new_tokens=max_new_tokens,
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
