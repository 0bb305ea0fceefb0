"""``speckv bench``: live tokens/s of the target alone, HF's generation and speckv, fairly.

What a fair live number needs (the design's "Live" protocol):

- **Every configuration a user would try on each side.** Hugging Face: plain ``generate``
  (``hf:ar``), assisted generation with the constant schedule at γ = 1..4
  (``hf:constant:K``, confidence stop off), the heuristic schedule (``hf:heuristic``,
  starting at speckv's heuristic start) and HF's own defaults (``hf:defaults``: nothing set;
  :func:`hf_defaults` reads what the installed transformers fills in: in 5.x 20 tokens, the
  constant schedule and a 0.4 confidence threshold, adapted per call only when scikit-learn
  is installed), and its prompt lookup (``hf:lookup``: ``prompt_lookup_num_tokens=10`` as
  its documentation shows it; ``hf:lookup:N`` for N tokens). speckv: the target alone in
  speckv's loop (``ar``), ``speckv:fixed:1..4``,
  the best static choice fitted on the train split (``speckv:best_static``: plain decoding
  or one γ per compression; the caller fits it, see :func:`bench_compression`), the
  heuristic and the controller (``speckv:onnx``). **HF best** is the fastest of all HF rows,
  plain ``generate`` included; every row is also divided by ``ar`` and by the best static
  choice.
- **Test prompts** by default (:func:`held_out_prompts`): the controller never saw them.
- **A balanced order.** Each (prompt, repeat) slot decodes the prompt with every method, in
  an order rotated by one more place than the slot before (:func:`rotation`), so every method
  takes every position equally often when prompts x repeats is a multiple of the number of
  methods, and within one otherwise; a prompt's repeats take different positions. Slow drifts
  of a shared machine spread over all methods instead of penalising whichever ran last. One
  warm-up pass of each method comes first. Repeats default to :data:`DEFAULT_REPEATS`.
- **Uncertainty.** Throughput is total new tokens over total wall-clock seconds (prefill
  included, as a user waits for it). 95% CIs come from a paired bootstrap over prompts
  (:data:`RESAMPLES` resamples, seeded): every resample takes the same prompts for every
  method, so the ratios' CIs are paired; a ratio to HF best re-picks HF's best row in every
  resample.
- **One benchmark on the machine.** Two side by side share cores and memory bandwidth and
  slow each other unevenly (:data:`ONE_PROCESS`); the machine's fingerprint goes with every
  result.

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

import importlib.util
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from speckv.decode.costs import module_of
from speckv.decode.invariant import first_difference
from speckv.errors import SpeckvError
from speckv.llm.feature_draft import is_feature_draft
from speckv.policies import HEURISTIC_START, PLAIN, BestStatic, Policy

if TYPE_CHECKING:
    import pandas as pd

    from speckv.decode.decoder import DecodeResult, SpeculativeDecoder
    from speckv.prompts import Prompt

log = logging.getLogger(__name__)

HF_CONSTANT_GAMMAS: Final = (1, 2, 3, 4)  # where speckv's controller mostly operates
SPECKV_FIXED_GAMMAS: Final = (1, 2, 3, 4)
HF_HEURISTIC_START: Final = HEURISTIC_START  # speckv's heuristic starts there too
HF_DEFAULTS: Final = "hf:defaults"
#: what transformers 5.x fills in when a user sets nothing (used if it cannot be read).
HF_FALLBACK_DEFAULTS: Final = {"num_assistant_tokens": 20,
                               "num_assistant_tokens_schedule": "constant",
                               "assistant_confidence_threshold": 0.4}
BEST_STATIC: Final = "speckv:best_static"
CONTROLLER: Final = "speckv:onnx"
DEFAULT_REPEATS: Final = 3
RESAMPLES: Final = 10_000
WARMUP_TOKENS: Final = 8
ONE_PROCESS: Final = ("Run one benchmark process on the machine at a time: two side by side "
                      "share its cores and memory bandwidth and slow each other unevenly.")
_HF_CONSTANT = re.compile(r"hf:constant:(\d+)")
_HF_LOOKUP = re.compile(r"hf:lookup(?::([1-9]\d*))?")
#: Hugging Face's prompt lookup as its documentation shows it (``prompt_lookup_num_tokens=10``)
HF_LOOKUP_TOKENS: Final = 10


class BenchError(SpeckvError, ValueError):
    """Bad benchmark input."""


# ------------------------------------------------------------------------------- methods
def default_methods() -> list[str]:
    """Every method of a fair comparison (the controller when ``export/speckv.onnx`` exists)."""
    from speckv.paths import DEFAULT_CONTROLLER, find_file

    methods = ["ar", "hf:ar", *(f"hf:constant:{g}" for g in HF_CONSTANT_GAMMAS),
               "hf:heuristic", HF_DEFAULTS, "hf:lookup",
               *(f"speckv:fixed:{g}" for g in SPECKV_FIXED_GAMMAS),
               BEST_STATIC, "speckv:heuristic"]
    controller = find_file(DEFAULT_CONTROLLER)
    if controller.is_file():
        methods += [f"speckv:onnx:{controller}", HF_SPECKV]
    return methods


def short_name(method: str) -> str:
    """``speckv:onnx:/long/path.onnx`` -> ``speckv:onnx`` (the name in tables and JSON)."""
    return CONTROLLER if method.startswith(CONTROLLER + ":") else method


def is_hf(method: str) -> bool:
    """Whether ``method`` is one of Hugging Face's own configurations (plain or assisted);
    :data:`HF_SPECKV` runs in HF's loop with speckv's controller and is not one of them."""
    return method.startswith("hf:") and method != HF_SPECKV


def hf_defaults() -> dict[str, Any]:
    """The assisted-generation settings the installed transformers uses when a user sets
    none, and whether it adapts the confidence threshold (it does so only with scikit-learn,
    and only within one ``generate`` call)."""
    out = dict(HF_FALLBACK_DEFAULTS)
    try:
        from transformers import GenerationConfig

        found = GenerationConfig()._get_default_generation_params()
        out.update({k: found[k] for k in HF_FALLBACK_DEFAULTS if k in found})
    except Exception as exc:  # a private helper: fall back to 5.x's values, say so
        log.warning("could not read transformers' assisted-generation defaults (%s); "
                    "assuming %s", exc, HF_FALLBACK_DEFAULTS)
    out["threshold_adapts"] = importlib.util.find_spec("sklearn") is not None
    return out


def _hf_settings(method: str) -> dict[str, Any] | None:
    """The assistant's generation settings for an HF method (None for plain ``generate``)."""
    if method == "hf:ar":
        return None
    if method == HF_DEFAULTS:  # nothing set: transformers fills in its defaults
        return {"num_assistant_tokens": None, "num_assistant_tokens_schedule": None,
                "assistant_confidence_threshold": None}
    if method == "hf:heuristic":  # HF carries γ over between calls: restart every prompt
        return {"num_assistant_tokens": HF_HEURISTIC_START,
                "num_assistant_tokens_schedule": "heuristic",
                "assistant_confidence_threshold": 0.0}  # 0 disables it (None means 0.4)
    lookup = _HF_LOOKUP.fullmatch(method)
    if lookup:  # prompt lookup: no assistant model, n-grams of the context
        return {"prompt_lookup_num_tokens": int(lookup.group(1) or HF_LOOKUP_TOKENS)}
    match = _HF_CONSTANT.fullmatch(method)
    if match and int(match.group(1)) >= 1:
        return {"num_assistant_tokens": int(match.group(1)),
                "num_assistant_tokens_schedule": "constant",
                "assistant_confidence_threshold": 0.0}
    raise BenchError(f"Unknown method {method!r}; the Hugging Face ones are hf:ar, "
                     f"hf:constant:K (K >= 1), hf:heuristic, {HF_DEFAULTS} and hf:lookup[:N] "
                     "(prompt lookup of N tokens).")


@dataclass
class Run:
    """One method's decoding of one prompt."""

    token_ids: list[int]
    seconds: float
    accepted: list[int] = field(default_factory=list)  # speckv: accepted tokens per step
    result: DecodeResult | None = None  # speckv: the whole result, with its forward log


Runner = Callable[[list[int], int], Run]
#: builds a runner for one loaded pair: ``(target, draft, costs, eos_ids, pad_id) -> Runner``;
#: how a higher stage (the Hugging Face integration) adds a method to the benchmark.
RunnerFactory = Callable[[Any, Any, Any, list[int], int], Runner]
#: Hugging Face's assisted generation with speckv's controller choosing γ
#: (:mod:`speckv.integrations.transformers`; its runner comes from the command line).
HF_SPECKV: Final = "hf:speckv"


def _hf_runner(target: torch.nn.Module, draft: torch.nn.Module | None, method: str,
               eos: list[int], pad: int) -> Runner:
    """A runner around ``target.generate`` (with ``draft`` as the assistant unless hf:ar)."""
    settings = _hf_settings(method)
    lookup = settings is not None and "prompt_lookup_num_tokens" in settings
    if settings is not None and draft is None and not lookup:
        raise BenchError(f"{method} needs a draft model (the assistant).")

    def run(ids: list[int], max_new_tokens: int) -> Run:
        extra: dict[str, Any] = {}
        if lookup:
            extra.update(settings)
        elif settings is not None:
            cfg = draft.generation_config  # set every call: HF writes the heuristic's γ back
            for key, value in settings.items():
                setattr(cfg, key, value)
            extra["assistant_model"] = draft
        input_ids = torch.tensor([ids], device=getattr(target, "device", None))
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


# ------------------------------------------------------------------------------- prompts
def held_out_prompts(records: pd.DataFrame, per_task: int | None = None, *, val: float = 0.15,
                 test: float = 0.15, seed: int = 0,
                 also: Sequence[pd.DataFrame] = ()) -> list[Prompt]:
    """The suite prompts of the records' test split (:func:`speckv.records.split_prompts`
    with the fractions and seed training uses), in suite order per task; ``per_task`` keeps
    the first N of each task. Record prompts that are not suite prompts are skipped.

    ``also``: other record sets, each split on its own (controllers trained on them are
    compared too): a prompt is kept only where no set trains or validates on it."""
    from speckv.prompts import SUITE_MAX, TASKS, suites
    from speckv.records import split_prompts

    def split(df: pd.DataFrame) -> tuple[set, set]:
        assign = split_prompts(df, val=val, test=test, seed=seed)
        keys = df[["task", "prompt_id"]].astype(str)
        pairs = list(zip(keys["task"], keys["prompt_id"], strict=True))
        held = {k for k, a in zip(pairs, assign, strict=True) if a == "test"}
        return held, set(pairs) - held

    wanted, _ = split(records)
    for other in also:
        wanted -= split(other)[1]
    chosen = [p for p in suites(n=SUITE_MAX) if (p.task, p.prompt_id) in wanted]
    if len(chosen) < len(wanted):
        log.warning("%d test prompt(s) of the records are not suite prompts; skipped",
                    len(wanted) - len(chosen))
    if per_task is not None:
        if per_task < 1:
            raise BenchError("--per-task must be at least 1.")
        counts: dict[str, int] = {}
        kept = []
        for p in chosen:
            counts[p.task] = counts.get(p.task, 0) + 1
            if counts[p.task] <= per_task:
                kept.append(p)
        chosen = kept
    if not chosen:
        raise BenchError("The records' test split holds no suite prompts to benchmark. Pass "
                         "your own with --prompts FILE (JSONL, one {\"task\", \"prompt\"} a "
                         "line), or records profiled on the suites.")
    order = {t: i for i, t in enumerate(TASKS)}
    return sorted(chosen, key=lambda p: order.get(p.task, len(order)))  # stable: suite order


# ------------------------------------------------------------------------------ the order
def rotation(n_methods: int, n_prompts: int, repeats: int) -> list[list[int]]:
    """``shift[r][i]``: how far the method list is rotated for prompt ``i`` in repeat ``r``.

    Slot ``i * repeats + r`` is rotated by that many places (mod the number of methods): over
    all slots every shift occurs equally often (within one when slots are not a multiple of
    the methods), so every method takes every position equally often, and one prompt's
    repeats take consecutive, distinct shifts."""
    return [[(i * repeats + r) % n_methods for i in range(n_prompts)] for r in range(repeats)]


def interleaved(methods: Sequence[str], shift: int) -> list[str]:
    """The methods rotated to start at method ``shift mod m``."""
    shift %= len(methods)
    return [*methods[shift:], *methods[:shift]]


def position_counts(n_methods: int, n_prompts: int, repeats: int) -> np.ndarray:
    """``counts[j, k]``: how often method ``j`` runs ``k``-th in a slot over the benchmark."""
    counts = np.zeros((n_methods, n_methods), np.int64)
    for row in rotation(n_methods, n_prompts, repeats):
        for shift in row:
            for pos in range(n_methods):
                counts[(shift + pos) % n_methods, pos] += 1
    return counts


# ------------------------------------------------------------------------------ statistics
def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(resamples, n)`` counts: how often each of ``n`` prompts is drawn in each resample
    (with replacement, seeded). Shared by every method, so ratios are paired."""
    if n < 1 or resamples < 1:
        raise BenchError("The bootstrap needs at least one prompt and one resample.")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.zeros((resamples, n), np.float64)
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    return weights


def _ci(values: np.ndarray) -> list[float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize(names: Sequence[str], tokens: np.ndarray, seconds: np.ndarray,
              resamples: int = RESAMPLES, seed: int = 0, reference: str = "ar"
              ) -> dict[str, Any]:
    """Tokens/s per method with 95% CIs, and its ratios to ``ar`` (or the method named
    ``reference``: another engine's plain decoding), to HF's best row and to the best static
    choice, with paired CIs.

    ``tokens`` and ``seconds`` are ``(prompts, methods)``: each method's new tokens and
    wall-clock seconds per prompt, summed over repeats. Tokens/s is a ratio of sums, in the
    point estimate and in every resample; HF's best is the fastest HF row (plain ``generate``
    included), re-picked in every resample for the ratios' CIs.
    """
    tokens = np.asarray(tokens, np.float64)
    seconds = np.asarray(seconds, np.float64)
    names = list(names)
    if tokens.shape != seconds.shape or tokens.ndim != 2 or tokens.shape[1] != len(names):
        raise BenchError(f"summarize needs (prompts, {len(names)}) tokens and seconds; got "
                         f"{tokens.shape} and {seconds.shape}.")
    weights = bootstrap_weights(tokens.shape[0], resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = tokens.sum(0) / seconds.sum(0)
        boot = (weights @ tokens) / (weights @ seconds)
    hf_cols = [j for j, n in enumerate(names) if is_hf(n)]
    hf_best = names[max(hf_cols, key=lambda j: point[j])] if hf_cols else None
    refs: dict[str, tuple[float, np.ndarray] | None] = {
        "ar": ((point[names.index(reference)], boot[:, names.index(reference)])
               if reference in names else None),
        "hf_best": (point[hf_cols].max(), boot[:, hf_cols].max(1)) if hf_cols else None,
        "best_static": ((point[names.index(BEST_STATIC)], boot[:, names.index(BEST_STATIC)])
                        if BEST_STATIC in names else None),
    }
    rows: dict[str, Any] = {}
    for j, name in enumerate(names):
        row: dict[str, Any] = {"tokens_per_s": _num(point[j]), "ci": _ci(boot[:, j])}
        for ref, found in refs.items():
            if found is None:
                row[f"ratio_to_{ref}"], row[f"ratio_to_{ref}_ci"] = None, [None, None]
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                row[f"ratio_to_{ref}"] = _num(point[j] / found[0])
                row[f"ratio_to_{ref}_ci"] = _ci(boot[:, j] / found[1])
        rows[name] = row
    return {"methods": rows, "hf_best": hf_best, "resamples": resamples, "seed": seed,
            "prompts": int(tokens.shape[0])}


# ---------------------------------------------------------------------------- benchmark
@torch.inference_mode()
def logit_gap(target, prefix: list[int], a: int, b: int) -> tuple[float, float]:
    """The target's logit gap between tokens ``a`` and ``b`` after ``prefix``, and its size
    relative to the top logit (one full forward, no cache)."""
    logits = target(input_ids=torch.tensor([prefix], device=getattr(target, "device", None)),
                    logits_to_keep=1).logits[0, -1].float()
    gap = abs(float(logits[a] - logits[b]))
    return gap, gap / max(float(logits.abs().max()), 1e-6)


def bench_compression(target, draft, prompts, methods: list[str], max_new_tokens: int,
                      costs=None, progress=None, repeats: int = DEFAULT_REPEATS, *,
                      policies: Mapping[str, Policy] | None = None,
                      factories: Mapping[str, RunnerFactory] | None = None,
                      resamples: int = RESAMPLES, seed: int = 0,
                      hf_draft=None) -> dict[str, Any]:
    """Benchmark ``methods`` on ``prompts`` for one loaded target (one compression level).

    Each prompt is decoded ``repeats`` times by every method in the rotated order
    (:func:`rotation`); greedy outputs repeat, so the first decoding is the one checked.
    ``policies`` maps a ``speckv:NAME`` method to a ready policy: :data:`BEST_STATIC` must
    come that way (fitting it needs the records and replay, stages above this one), and
``factories`` maps methods run by higher stages (:data:`HF_SPECKV`) to runner factories. A
    :class:`~speckv.policies.BestStatic` whose choice at this compression is ``PLAIN`` (0)
    runs as the target alone. ``hf_draft``: the assistant of Hugging Face's own assisted
    methods (default ``draft``; a feature-conditioned draft cannot be one).
    """
    from speckv.decode.decoder import SpeculativeDecoder, eos_ids
    from speckv.decode.invariant import explain_difference, greedy_invariant
    from speckv.policies import from_spec
    from speckv.prompts import chat_ids

    if repeats < 1 or max_new_tokens < 1:
        raise BenchError("--repeats and --max-new-tokens must be at least 1.")
    if len(set(methods)) != len(methods):
        raise BenchError(f"Methods repeat in {methods}: name each once.")
    compression = getattr(target, "compression", None) or "fp16"
    eos = sorted(eos_ids(target))
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    policies = dict(policies or {})
    runners: dict[str, Runner] = {}
    best_static_choice = None
    factories = dict(factories or {})
    for method in methods:
        if method in factories:
            runners[method] = factories[method](target, draft, costs, eos, pad)
        elif method == HF_SPECKV:
            raise BenchError(f"{HF_SPECKV} runs in a higher stage: pass its runner factory "
                             "(`speckv bench` does, from speckv.integrations.transformers).")
        elif is_hf(method):
            assistant = module_of(hf_draft if hf_draft is not None else draft)
            if method != "hf:ar" and not _HF_LOOKUP.fullmatch(method) and \
                    is_feature_draft(assistant):
                raise BenchError(
                    f"{method}: Hugging Face's assisted generation runs its assistant's own "
                    "generate(), which a feature-conditioned draft (it reads the target's "
                    "states) has not. Pass --hf-draft with a causal-LM draft for Hugging "
                    "Face's rows (e.g. models/speckv-draft-v2), or leave them out.")
            runners[method] = _hf_runner(target.model, assistant, method, eos, pad)
        elif method == "ar":
            runners[method] = _speckv_runner(SpeculativeDecoder(None, target, None))
        elif method.startswith("speckv:"):
            policy = policies.get(method)
            if policy is None:
                if method == BEST_STATIC:
                    raise BenchError(f"{BEST_STATIC} is fitted on the records' train split; "
                                     "pass it in policies (`speckv bench` fits it).")
                policy = from_spec(method.removeprefix("speckv:"))
            if isinstance(policy, BestStatic):
                if compression not in policy.choices:
                    raise BenchError(f"{method} was fitted on {sorted(policy.choices)}, not "
                                     f"on {compression}: profile records at {compression} "
                                     "or leave the method out.")
                best_static_choice = policy.choices[compression]
                if best_static_choice == PLAIN:  # the decoder would draft γ >= 1 for a 0
                    policy = None
            runners[method] = _speckv_runner(SpeculativeDecoder(
                draft if policy is not None else None, target, policy, costs))
        else:
            raise BenchError(f"Unknown method {method!r}: use ar, hf:ar, hf:constant:K, "
                             f"hf:heuristic, {HF_DEFAULTS} or speckv:POLICY.")
    ids = [chat_ids(tok, p.text) for p in prompts]
    for method in methods:  # warm-up: allocator, kernels, lazy imports
        runners[method](ids[0], min(WARMUP_TOKENS, max_new_tokens))
    m, n = len(methods), len(ids)
    tokens = np.zeros((n, m), np.float64)
    seconds = np.zeros((n, m), np.float64)
    accepted: list[list[int]] = [[] for _ in methods]
    outputs: dict[str, list[Run | None]] = {method: [None] * n for method in methods}
    shifts = rotation(m, n, repeats)
    for r in range(repeats):
        for i, prompt_ids in enumerate(ids):
            for method in interleaved(methods, shifts[r][i]):
                run = runners[method](prompt_ids, max_new_tokens)
                j = methods.index(method)
                tokens[i, j] += len(run.token_ids)
                seconds[i, j] += run.seconds
                accepted[j].extend(run.accepted)
                if r == 0:
                    outputs[method][i] = run
                if progress is not None:
                    progress.update(1)
    names = [short_name(method) for method in methods]
    summary = summarize(names, tokens, seconds, resamples, seed)
    for j, name in enumerate(names):
        summary["methods"][name].update({
            "tokens": int(tokens[:, j].sum()), "seconds": float(seconds[:, j].sum()),
            "mean_accepted": float(np.mean(accepted[j])) if accepted[j] else None,
        })
    violations = []
    for method in methods:
        for prompt, prompt_ids, run in zip(prompts, ids, outputs[method], strict=True):
            if run is None or run.result is None:
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
    counts = position_counts(m, n, repeats)
    return {
        **summary,
        "prompt_ids": [p.prompt_id for p in prompts],
        "per_prompt": {name: {"tokens": tokens[:, j].astype(int).tolist(),
                              "seconds": seconds[:, j].tolist()}
                       for j, name in enumerate(names)},
        "rotation": {"slots": n * repeats, "methods": m,
                     "exact": bool((counts == counts[0, 0]).all()),
                     "positions": {name: counts[j].tolist() for j, name in enumerate(names)}},
        "best_static_choice": best_static_choice,  # 0 = the target alone
        "identical_greedy": not violations, "invariant_violations": violations,
        "differences": differences,
        "compute_dtype": getattr(target, "compute_dtype", None),
        "costs": costs.to_json() if costs is not None else None,
    }


def summarize_methods(by_comp: Mapping[str, Any], resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, Any]:
    """Over every compression: per method, total tokens over total seconds with the same
    CIs and ratios as one compression (a prompt's resample weight applies at every level),
    and the per-compression rows."""
    blocks = list(by_comp.values())
    names = list(blocks[0]["per_prompt"])
    prompt_ids = blocks[0]["prompt_ids"]
    if any(b["prompt_ids"] != prompt_ids or list(b["per_prompt"]) != names for b in blocks):
        raise BenchError("Every compression must run the same prompts and methods.")
    tokens = sum(np.array([b["per_prompt"][n]["tokens"] for n in names], np.float64).T
                 for b in blocks)
    seconds = sum(np.array([b["per_prompt"][n]["seconds"] for n in names], np.float64).T
                  for b in blocks)
    summary = summarize(names, tokens, seconds, resamples, seed)
    for name, row in summary["methods"].items():
        row["per_compression"] = {c: {k: v for k, v in b["methods"][name].items()}
                                  for c, b in by_comp.items()}
    return summary
