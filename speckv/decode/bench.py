"""``speckv bench``: live tokens/s of the target alone, HF assisted generation and speckv.

Every prompt is decoded by every method, greedily, at each compression level. Methods run
in an interleaved order that rotates from prompt to prompt (prompt i starts with method
i mod m), after one warm-up pass of each, so slow drifts of a shared machine spread over all
methods instead of penalising whichever ran last. Throughput is total new tokens over total
wall-clock seconds (prefill included, as a user waits for it), per method and compression;
``--repeats R`` decodes every prompt R times per method (the rotation continues across rounds).

Methods:

- ``ar``: the target alone, one token per step, in speckv's decoding loop;
- ``hf:ar``: ``model.generate`` without an assistant;
- ``hf:constant``, ``hf:heuristic``, ``hf:confidence``: ``generate(assistant_model=draft)``
  with ``num_assistant_tokens_schedule`` "constant" (``HF_CONSTANT_TOKENS``) and "heuristic"
  (starting at ``HF_HEURISTIC_START``), and with ``assistant_confidence_threshold``
  (``HF_CONFIDENCE``: up to γmax tokens, stop below the threshold);
- ``speckv:fixed:4``, ``speckv:heuristic`` and, when a controller exists, ``speckv:onnx``.

Greedy speculative decoding is lossless: every token speckv emits is the argmax of the
target's logits in the forward that verified it. ``identical_greedy`` says whether that holds
for every speckv output (``ar`` included), checked exactly by replaying each output's target
forwards (:func:`speckv.decode.invariant.greedy_invariant`); ``invariant_violations``
lists any breach.
Equality with the ``ar`` output is information, not a verdict: a target is not
batch-invariant on a CPU (bfloat16, LLM.int8 and even float32 kernels can round a position's
logits differently in a chunked forward than in a one-token one), so at a near-tie the outputs
may part. ``differences`` gives, per method and prompt, the first token where an output
parts from ``ar``, the target's logit gap there (one full forward), and for speckv methods
whether the target's own forwards explain it
(:func:`speckv.decode.invariant.explain_difference`: its one-token forward gives the ``ar``
token, the chunked forward that verified it the emitted one). Hugging Face's outputs keep no
forward log, so they get the gap only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

from speckv.decode.invariant import first_difference
from speckv.errors import SpeckvError
from speckv.runtime.features import GAMMA_MAX

if TYPE_CHECKING:
    from speckv.decode.decoder import DecodeResult, SpeculativeDecoder

log = logging.getLogger(__name__)

HF_CONSTANT_TOKENS: Final = 4  # the same γ as speckv:fixed:4
HF_HEURISTIC_START: Final = 4  # speckv's Heuristic starts there too
HF_CONFIDENCE: Final = (GAMMA_MAX, 0.4)  # (num_assistant_tokens, threshold): HF's threshold
HF_SCHEDULES: Final = ("hf:constant", "hf:heuristic", "hf:confidence")
WARMUP_TOKENS: Final = 8


class BenchError(SpeckvError, ValueError):
    """Bad benchmark input."""


def default_methods() -> list[str]:
    from speckv.paths import DEFAULT_CONTROLLER, find_file

    methods = ["ar", "hf:ar", *HF_SCHEDULES, "speckv:fixed:4", "speckv:heuristic"]
    controller = find_file(DEFAULT_CONTROLLER)
    if controller.is_file():
        methods.append(f"speckv:onnx:{controller}")
    return methods


def short_name(method: str) -> str:
    """``speckv:onnx:/long/path.onnx`` -> ``speckv:onnx`` (the name in tables and JSON)."""
    return "speckv:onnx" if method.startswith("speckv:onnx:") else method


@dataclass
class Run:
    """One method's decoding of one prompt."""

    token_ids: list[int]
    seconds: float
    accepted: list[int] = field(default_factory=list)  # speckv: accepted tokens per step
    result: DecodeResult | None = None  # speckv: the whole result, with its forward log


Runner = Callable[[list[int], int], Run]


def _hf_runner(target: torch.nn.Module, draft: torch.nn.Module | None, method: str,
               eos: list[int], pad: int) -> Runner:
    """A runner around ``target.generate`` (with ``draft`` as the assistant unless hf:ar)."""
    if method not in ("hf:ar", *HF_SCHEDULES):
        raise BenchError(f"Unknown method {method!r}; the Hugging Face ones are hf:ar, "
                         f"{', '.join(HF_SCHEDULES)}.")

    def configure() -> dict[str, Any]:
        if method == "hf:ar":
            return {}
        cfg = draft.generation_config
        if method == "hf:constant":
            cfg.num_assistant_tokens_schedule = "constant"
            cfg.num_assistant_tokens = HF_CONSTANT_TOKENS
            cfg.assistant_confidence_threshold = 0.0  # 0 disables it (None means HF's 0.4)
        elif method == "hf:heuristic":
            # HF carries the heuristic's γ over between generate calls: restart each prompt
            cfg.num_assistant_tokens_schedule = "heuristic"
            cfg.num_assistant_tokens = HF_HEURISTIC_START
            cfg.assistant_confidence_threshold = 0.0
        else:  # hf:confidence
            cfg.num_assistant_tokens_schedule = "constant"
            cfg.num_assistant_tokens, cfg.assistant_confidence_threshold = HF_CONFIDENCE
        return {"assistant_model": draft}

    def run(ids: list[int], max_new_tokens: int) -> Run:
        extra = configure()
        input_ids = torch.tensor([ids])
        started = time.perf_counter()
        with torch.inference_mode():
            out = target.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad, **extra)
        seconds = time.perf_counter() - started
        return Run(out[0, len(ids):].tolist(), seconds)

    return run


def _speckv_runner(decoder: SpeculativeDecoder) -> Runner:
    def run(ids: list[int], max_new_tokens: int) -> Run:
        result = decoder.generate(ids, max_new_tokens)
        return Run(result.token_ids, result.seconds,
                   [s["accept_len"] for s in result.steps if s["drafted"]], result)

    return run


def interleaved(methods: list[str], i: int) -> list[str]:
    """The order of the methods for prompt ``i``: rotated to start at method ``i mod m``."""
    shift = i % len(methods)
    return methods[shift:] + methods[:shift]


@torch.inference_mode()
def logit_gap(target, prefix: list[int], a: int, b: int) -> tuple[float, float]:
    """The target's logit gap between tokens ``a`` and ``b`` after ``prefix``, and its size
    relative to the top logit (one full forward, no cache)."""
    logits = target(input_ids=torch.tensor([prefix]), logits_to_keep=1).logits[0, -1].float()
    gap = abs(float(logits[a] - logits[b]))
    return gap, gap / max(float(logits.abs().max()), 1e-6)


def bench_compression(target, draft, prompts, methods: list[str], max_new_tokens: int,
                      costs=None, progress=None, repeats: int = 1) -> dict[str, Any]:
    """Benchmark ``methods`` on ``prompts`` for one loaded target (one compression level).

    Each prompt is decoded ``repeats`` times by every method (greedy outputs repeat, so the
    first decoding is the one checked); the order rotates with every round.
    """
    from speckv.decode.decoder import SpeculativeDecoder, eos_ids
    from speckv.decode.invariant import explain_difference, greedy_invariant
    from speckv.policies import from_spec
    from speckv.prompts import chat_ids

    eos = sorted(eos_ids(target))
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    runners: dict[str, Runner] = {}
    for method in methods:
        if method.startswith("hf:"):
            runners[method] = _hf_runner(target.model, getattr(draft, "model", None), method,
                                         eos, pad)
        elif method == "ar":
            runners[method] = _speckv_runner(SpeculativeDecoder(None, target, None))
        elif method.startswith("speckv:"):
            policy = from_spec(method.removeprefix("speckv:"))
            runners[method] = _speckv_runner(SpeculativeDecoder(draft, target, policy, costs))
        else:
            raise BenchError(f"Unknown method {method!r}: use ar, hf:ar, "
                             f"{', '.join(HF_SCHEDULES)} or speckv:POLICY.")
    ids = [chat_ids(tok, p.text) for p in prompts]
    for method in methods:  # warm-up: allocator, kernels, lazy imports
        runners[method](ids[0], min(WARMUP_TOKENS, max_new_tokens))
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    outputs: dict[str, list[Run]] = {m: [] for m in methods}  # the first run of each prompt
    for r in range(repeats):
        for i, prompt_ids in enumerate(ids):
            for method in interleaved(methods, r * len(ids) + i):
                run = runners[method](prompt_ids, max_new_tokens)
                runs[method].append(run)
                if r == 0:
                    outputs[method].append(run)
                if progress is not None:
                    progress.update(1)
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        tokens = sum(len(r.token_ids) for r in runs[method])
        seconds = sum(r.seconds for r in runs[method])
        accepted = [a for r in runs[method] for a in r.accepted]
        table[short_name(method)] = {
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "tokens": tokens,
            "seconds": seconds,
            "mean_accepted": sum(accepted) / len(accepted) if accepted else None,
        }
    ar = table["ar"]["tokens_per_s"] if "ar" in table else None
    hf = [table[m]["tokens_per_s"] for m in HF_SCHEDULES if m in table]
    hf_best = max(hf) if hf else None
    for row in table.values():
        row["ratio_to_ar"] = row["tokens_per_s"] / ar if ar else None
        row["ratio_to_hf_best"] = row["tokens_per_s"] / hf_best if hf_best else None
    violations = []
    for method in methods:
        for prompt, prompt_ids, run in zip(prompts, ids, outputs[method], strict=True):
            if run.result is None:
                continue
            violations.extend({"method": short_name(method), "prompt_id": prompt.prompt_id,
                               "task": prompt.task, "position": v.position,
                               "emitted": v.emitted, "argmax": v.argmax, "reason": v.reason}
                              for v in greedy_invariant(target.model, prompt_ids, run.result))
    differences = []
    if "ar" in outputs:
        for method in methods:
            if method == "ar":
                continue
            for prompt, prompt_ids, ref, run in zip(prompts, ids, outputs["ar"], outputs[method],
                                                    strict=True):
                at = first_difference(ref.token_ids, run.token_ids)
                if at is None:
                    continue
                diff = {"method": short_name(method), "prompt_id": prompt.prompt_id,
                        "task": prompt.task, "first_diff": at, "logit_gap": None,
                        "explained": None}
                if at < min(len(ref.token_ids), len(run.token_ids)):
                    diff["logit_gap"], _ = logit_gap(target.model, prompt_ids + ref.token_ids[:at],
                                                     ref.token_ids[at], run.token_ids[at])
                if run.result is not None:
                    why = explain_difference(target.model, prompt_ids, run.result, ref.token_ids)
                    diff["explained"] = why is not None and why.explained
                differences.append(diff)
    return {"methods": table, "identical_greedy": not violations,
            "invariant_violations": violations, "differences": differences,
            "hf_best": max((m for m in HF_SCHEDULES if m in table),
                           key=lambda m: table[m]["tokens_per_s"], default=None),
            "compute_dtype": target.compute_dtype,
            "costs": costs.to_json() if costs is not None else None}


def summarize_methods(by_comp: dict[str, Any]) -> dict[str, Any]:
    """Per method: tokens/s over every compression (total tokens / total seconds), its ratio
    to the target alone and to HF's best schedule, and the per-compression rows."""
    names = next(iter(by_comp.values()))["methods"]
    out: dict[str, Any] = {}
    for name in names:
        rows = {c: b["methods"][name] for c, b in by_comp.items()}
        seconds = sum(r["seconds"] for r in rows.values())
        out[name] = {"tokens_per_s": sum(r["tokens"] for r in rows.values()) / seconds
                     if seconds > 0 else 0.0, "per_compression": rows}
    ar = out.get("ar", {}).get("tokens_per_s")
    hf_best = max((out[m]["tokens_per_s"] for m in HF_SCHEDULES if m in out), default=None)
    for row in out.values():
        row["ratio_to_ar"] = row["tokens_per_s"] / ar if ar else None
        row["ratio_to_hf_best"] = row["tokens_per_s"] / hf_best if hf_best else None
    return out
