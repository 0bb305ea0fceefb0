"""How good a draft is for its target (``speckv draft evaluate``): top-1 agreement with the
target's greedy answers to the profiling suites (prompts the draft never trained on), per
task and compression level, what it costs per token next to the target, and the tokens/s
that agreement and cost allow when replayed (plain decoding, every fixed γ, the best static
choice and the exact bound). Several drafts are scored on the same answers in one run, so
their figures compare."""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

from speckv.decode.costs import measure_costs
from speckv.llm.feature_draft import is_feature_draft
from speckv.llm.load import load_model
from speckv.machine import fingerprint
from speckv.profile.feature_trace import feature_draft_side
from speckv.profile.profiler import agreement_runs
from speckv.prompts import TASKS, chat_ids, suite
from speckv.runtime.features import GAMMA_MAX


def replay_runs(runs: list[np.ndarray], budget: int, cost_draft_s: float,
                cost_verify_s: list[float]) -> dict[str, float]:
    """Tokens/s that a draft's agreement allows, replayed with measured costs.

    ``runs[j][i]``: how many drafted tokens the target would accept at position ``i`` of
    answer ``j`` (the run of agreements starting there, or for a feature-conditioned draft
    the leading run of its own chain that equals the answer; greedy decoding is lossless, so
    this is the whole outcome of any γ). A step's draft forwards are ``γ`` x the one-token
    cost (its first is a catch-up over the tokens the last step emitted: about one token's
    cost for a one-layer draft; ``speckv evaluate`` replays the measured catch-up).

    Every static choice (plain decoding, fixed γ = 1..8) is replayed as the decoder runs it
    (``max_gamma = min(8, budget - p - 1)``); the best of them is ``best_static`` (chosen on
    these same answers: a draft's ceiling for static γ, not a held-out baseline), and
    ``upper_bound`` is the exact per-answer optimum (dynamic
    programme over positions, plain steps allowed).
    """
    cv = np.asarray(cost_verify_s, np.float64)
    tokens = sum(len(r) for r in runs)
    out: dict[str, float] = {}
    for choice in range(GAMMA_MAX + 1):
        seconds = 0.0
        for run in runs:
            n, p = len(run), 0
            while p < n:
                g = min(choice, GAMMA_MAX, budget - p - 1)
                if g <= 0:
                    seconds, p = seconds + cv[0], p + 1
                    continue
                seconds += g * cost_draft_s + cv[g]
                p += min(min(int(run[p]), g) + 1, n - p)
        out["plain" if choice == 0 else f"fixed:{choice}"] = tokens / seconds
    best = max(out, key=out.get)
    out["best_static"], out["best_static_choice"] = out[best], best
    seconds = 0.0
    for run in runs:
        n = len(run)
        t = np.zeros(n + 1)
        for p in range(n - 1, -1, -1):
            best_t = cv[0] + t[p + 1]
            for g in range(1, min(GAMMA_MAX, budget - p - 1) + 1):
                nxt = p + min(min(int(run[p]), g) + 1, n - p)
                best_t = min(best_t, g * cost_draft_s + cv[g] + t[nxt])
            t[p] = best_t
        seconds += t[0]
    out["upper_bound"] = tokens / seconds
    return out


def evaluate_drafts(draft_specs: list[str], target_spec: str, compressions: list[str], *,
                    per_task: int = 10, max_new_tokens: int = 64, dtype: str = "bfloat16",
                    threads: int | None = None, cold: bool = False,
                    device: str = "auto") -> dict:
    """Every draft against the same target answers, in one run on one machine: agreement per
    task and compression, draft and target cost per token, and the tokens/s the agreement
    allows (:func:`replay_runs`)."""
    if threads:
        torch.set_num_threads(threads)
    report: dict = {"target": target_spec, "per_task": per_task,
                    "max_new_tokens": max_new_tokens, "machine": fingerprint(threads),
                    "drafts": {}}
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
    drafts = {spec: load_model(spec, "fp16", dtype, device=device) for spec in draft_specs}
    prompts = [p for t in TASKS for p in suite(t)[: per_task]]
    for comp in compressions:
        target = load_model(target_spec, comp, dtype, device=device)
        tok = target.tokenizer
        answers = []
        for p in prompts:
            ids = chat_ids(tok, p.text)
            x = torch.tensor([ids])
            with torch.inference_mode():
                out = target.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                            max_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=tok.eos_token_id)
            answers.append((p.task, out, len(ids)))
        for spec, draft in drafts.items():
            hits = {t: [0, 0] for t in TASKS}
            runs = []
            for task, out, n_prompt in answers:
                if is_feature_draft(draft.model):  # its γ > 1 proposals read its own states
                    answer = out[0, n_prompt:].numpy()
                    tr = feature_draft_side(draft.model, target.model, [out[0, :n_prompt].tolist()],
                                            [answer], max_new_tokens, [np.ones(len(answer))])[0]
                    agree, run = tr.agree, tr.accept_len
                else:
                    with torch.inference_mode():
                        logits = draft.model(input_ids=out).logits[0, n_prompt - 1 : -1]
                    agree = (logits.argmax(-1) == out[0, n_prompt:]).numpy()
                    run = agreement_runs(agree)
                hits[task][0] += int(agree.sum())
                hits[task][1] += len(agree)
                runs.append(run)
            cost = measure_costs(draft, target)
            total = np.array(list(hits.values())).sum(0)
            row = {
                "agreement": total[0] / total[1],
                "agreement_per_task": {t: h[0] / h[1] for t, h in hits.items()},
                "tokens": int(total[1]),
                "target_ms_per_token": 1000 * cost.cost_verify_s[0],
                "draft_ms_per_token": 1000 * cost.cost_draft_s,
                "draft_over_target_cost": cost.cost_draft_s / cost.cost_verify_s[0],
                "target_load_warm_s": target.load_s,
                "draft_load_s": draft.load_s,
                "compute_dtype": target.compute_dtype,
                "allows_tokens_per_s": replay_runs(runs, max_new_tokens, cost.cost_draft_s,
                                                   cost.cost_verify_s),
            }
            report["drafts"].setdefault(spec, {})[comp] = row
            allow = row["allows_tokens_per_s"]
            print(f"{comp} {spec}: agreement {row['agreement']:.3f} over {total[1]} tokens; "
                  f"target {row['target_ms_per_token']:.1f} ms/token, draft "
                  f"{row['draft_ms_per_token']:.1f} ms/token; plain {allow['plain']:.1f}, best "
                  f"static {allow['best_static']:.1f} ({allow['best_static_choice']}), bound "
                  f"{allow['upper_bound']:.1f} tokens/s", file=sys.stderr)
        del target
    return report
