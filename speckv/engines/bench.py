"""``speckv bench --engine llamacpp``: live tokens/s of llama.cpp's plain decoding, prompt
lookup, a GGUF draft at fixed γ and speckv's controller, all in llama.cpp, fairly.

The protocol is :mod:`speckv.decode.bench`'s: every method decodes every (prompt, repeat)
slot in an order rotated by one more place each slot, after one warm-up pass; throughput is
total new tokens over total wall-clock seconds (prefill included); 95% CIs come from a
paired bootstrap over prompts; the machine is named with the result. Ratios are to
``llamacpp:plain`` (llama.cpp's own greedy decoding of the same GGUF target).

Methods: ``llamacpp:plain``; ``llamacpp:lookup[:N]`` (speckv's :class:`ContextLookup`, at
most N tokens, default 10 as Hugging Face's documentation shows it); ``llamacpp:fixed:G``
(the GGUF draft, γ = G every step); ``llamacpp:onnx[:PATH]`` (the exported controller on
llama.cpp's measured costs, default ``export/speckv.onnx``).

Greedy identity: llama.cpp's batched forwards are not bit-identical to its one-token ones, so
an output may part from plain decoding at a near-tie. ``differences`` lists, per method and
prompt, the first token that differs, the size of the forward that emitted it, and the
top-1/top-2 logit margins of both runs there (a near-tie shows as a small margin).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from speckv.decode.bench import (
    DEFAULT_REPEATS,
    RESAMPLES,
    WARMUP_TOKENS,
    BenchError,
    interleaved,
    position_counts,
    rotation,
    summarize,
)
from speckv.decode.invariant import first_difference
from speckv.engines.llamacpp import GGUFModel, LlamaCppDecoder, measure_costs
from speckv.paths import DEFAULT_CONTROLLER

PLAIN: Final = "llamacpp:plain"
CONTROLLER: Final = "llamacpp:onnx"
#: the controller choosing between the context lookup and the draft per step
LEARNED_LOOKUP: Final = "llamacpp:lookup:auto+onnx"
FIXED_GAMMAS: Final = (1, 2, 3, 4)
LOOKUP_TOKENS: Final = 10
_FIXED = re.compile(r"llamacpp:fixed:([1-8])")
_LOOKUP = re.compile(r"llamacpp:lookup(?::([1-9]\d*))?")


def default_methods(controller: Path | None, llamacpp_controller: Path | None = None
                    ) -> list[str]:
    """Every baseline, the shipped controller, and the one trained on llama.cpp's records
    (alone and choosing the lookup too) where those files exist."""
    methods = [PLAIN, "llamacpp:lookup", "llamacpp:lookup:4",
               *(f"llamacpp:fixed:{g}" for g in FIXED_GAMMAS)]
    if controller is not None and controller.is_file():
        methods.append(f"{CONTROLLER}:{controller}")
    if llamacpp_controller is not None and llamacpp_controller.is_file():
        methods += [f"{CONTROLLER}:{llamacpp_controller}",
                    f"{LEARNED_LOOKUP}:{llamacpp_controller}"]
    return methods


def _controller_path(method: str) -> tuple[bool, str | None] | None:
    """``(learned lookup, path or None)`` of a controller method, None for another."""
    for prefix, lookup in ((LEARNED_LOOKUP, True), (CONTROLLER, False)):
        if method == prefix:
            return lookup, None
        if method.startswith(prefix + ":"):
            return lookup, method[len(prefix) + 1:]
    return None


def short_name(method: str) -> str:
    """The method's name in the results: a controller by its file's name unless it is the
    shipped one (``llamacpp:onnx``; ``llamacpp:onnx:speckv-llamacpp.onnx``)."""
    parsed = _controller_path(method)
    if parsed is None:
        return method
    lookup, path = parsed
    prefix = LEARNED_LOOKUP if lookup else CONTROLLER
    if path is None or Path(path).name == Path(DEFAULT_CONTROLLER).name:
        return prefix
    return f"{prefix}:{Path(path).name}"


def needs_draft(methods: Sequence[str]) -> bool:
    return any(_FIXED.fullmatch(m) or _controller_path(m) is not None for m in methods)


def make_decoder(method: str, target: GGUFModel, draft: GGUFModel | None, costs,
                 default_controller: Path | None) -> LlamaCppDecoder:
    """The decoder a method name stands for."""
    from speckv.runtime import Controller

    if method == PLAIN:
        return LlamaCppDecoder(target)
    if (m := _LOOKUP.fullmatch(method)) is not None:
        return LlamaCppDecoder(target, mode="lookup",
                               lookup_tokens=int(m.group(1) or LOOKUP_TOKENS))
    if (m := _FIXED.fullmatch(method)) is not None:
        return LlamaCppDecoder(target, draft, "fixed", gamma=int(m.group(1)))
    if (parsed := _controller_path(method)) is not None:
        lookup, path = parsed
        path = path or default_controller
        if path is None:
            raise BenchError(f"{method} needs a controller: {method}:PATH.")
        return LlamaCppDecoder(target, draft, "controller", controller=Controller.load(path),
                               costs=costs, learned_lookup=lookup)
    raise BenchError(f"Unknown llama.cpp method {method!r}: use {PLAIN}, llamacpp:lookup[:N], "
                     f"llamacpp:fixed:G (G = 1..8), {CONTROLLER}[:PATH] or "
                     f"{LEARNED_LOOKUP}[:PATH].")


def bench_llamacpp(target: GGUFModel, draft: GGUFModel | None, prompt_ids: list[list[int]],
                   prompt_names: list[str], methods: list[str], max_new_tokens: int, *,
                   repeats: int = DEFAULT_REPEATS, resamples: int = RESAMPLES, seed: int = 0,
                   default_controller: Path | None = None, progress=None) -> dict[str, Any]:
    """Benchmark ``methods`` on the prompts (token ids) with one loaded target and draft."""
    if repeats < 1 or max_new_tokens < 1:
        raise BenchError("--repeats and --max-new-tokens must be at least 1.")
    if len(set(methods)) != len(methods):
        raise BenchError(f"Methods repeat in {methods}: name each once.")
    if PLAIN not in methods:
        methods = [PLAIN, *methods]
    if needs_draft(methods) and draft is None:
        raise BenchError("A draft method needs a GGUF draft (--gguf-draft, or --draft to "
                         "export one).")
    measured = measure_costs(target, draft, prompt_ids[0])
    decoders = {m: make_decoder(m, target, draft, measured["step_costs"], default_controller)
                for m in methods}
    for m in methods:  # warm-up
        decoders[m].generate(prompt_ids[0], min(WARMUP_TOKENS, max_new_tokens))
    n, k = len(prompt_ids), len(methods)
    tokens = np.zeros((n, k))
    seconds = np.zeros((n, k))
    accepted: list[list[int]] = [[] for _ in methods]
    choices: list[list[int]] = [[] for _ in methods]  # γ of each draft or plain step
    lookups = [0] * len(methods)  # lookup steps
    first: dict[str, list[Any]] = {m: [None] * n for m in methods}
    shifts = rotation(k, n, repeats)
    for r in range(repeats):
        for i, ids in enumerate(prompt_ids):
            for method in interleaved(methods, shifts[r][i]):
                res = decoders[method].generate(ids, max_new_tokens)
                j = methods.index(method)
                tokens[i, j] += len(res.token_ids)
                seconds[i, j] += res.seconds
                accepted[j].extend(res.accepted)
                choices[j].extend(s.get("gamma") or 0 for s in res.steps
                                  if s["source"] != "lookup")
                lookups[j] += sum(s["source"] == "lookup" for s in res.steps)
                if r == 0:
                    first[method][i] = res
                if progress is not None:
                    progress.update(1)
    names = [short_name(m) for m in methods]
    if len(set(names)) != len(names):
        raise BenchError(f"Two methods share a name in {methods}: give their controllers "
                         "files of different names.")
    summary = summarize(names, tokens, seconds, resamples, seed, reference=PLAIN)
    for j, name in enumerate(names):
        row = summary["methods"][name]
        row["ratio_to_plain"], row["ratio_to_plain_ci"] = row.pop("ratio_to_ar"), \
            row.pop("ratio_to_ar_ci")
        for key in ("ratio_to_hf_best", "ratio_to_hf_best_ci", "ratio_to_best_static",
                    "ratio_to_best_static_ci"):
            row.pop(key, None)
        counts = np.bincount(choices[j], minlength=9) if choices[j] else None
        row.update(tokens=int(tokens[:, j].sum()), seconds=float(seconds[:, j].sum()),
                   mean_accepted=float(np.mean(accepted[j])) if accepted[j] else None,
                   steps_by_gamma=None if counts is None else counts.tolist(),
                   lookup_steps=lookups[j])
    differences = []
    for method in methods:
        if method == PLAIN:
            continue
        for name, ref, run in zip(prompt_names, first[PLAIN], first[method], strict=True):
            at = first_difference(ref.token_ids, run.token_ids)
            if at is None or at >= min(len(ref.token_ids), len(run.token_ids)):
                continue
            differences.append({
                "method": short_name(method), "prompt_id": name,
                "first_diff": at,
                "forward_rows": run.forward_rows[at], "plain_margin": ref.margins[at],
                "method_margin": run.margins[at]})
    counts = position_counts(k, n, repeats)
    costs = {key: measured[key] for key in ("t_verify", "t_draft", "t_catchup", "context",
                                            "repeats")}
    return {**summary, "reference": PLAIN, "prompt_ids": prompt_names,
            "per_prompt": {nm: {"tokens": tokens[:, j].astype(int).tolist(),
                                "seconds": seconds[:, j].tolist()}
                           for j, nm in enumerate(names)},
            "rotation": {"slots": n * repeats, "methods": k,
                         "exact": bool((counts == counts[0, 0]).all())},
            "identical_to_plain": not differences, "differences": differences,
            "costs": costs, "target": {"path": str(target.path), "desc": target.description,
                                       "compression": target.compression},
            "draft": None if draft is None else {"path": str(draft.path),
                                                 "desc": draft.description},
            "threads": target.threads}


def format_result(result: dict[str, Any]) -> str:
    """The human-readable table."""
    def fmt(v, ci, spec=".2f"):
        if v is None:
            return "-"
        if ci and ci[0] is not None:
            return f"{v:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"
        return f"{v:{spec}}"

    lines = [f"machine: {result.get('machine_description', '?')}",
             f"prompts: {result.get('prompt_source', '?')}",
             f"target: {result['target']['path']} ({result['target']['desc']}, as "
             f"{result['target']['compression']} for the controller); draft: "
             f"{(result['draft'] or {}).get('path', '-')}; {result['threads']} threads",
             f"{result['prompts']} prompts x {result['repeats']} repeats, "
             f"{result['max_new_tokens']} new tokens max; order rotated"]
    c = result["costs"]
    lines.append("llama.cpp costs (ms): verify over 1..9 tokens "
                 + " ".join(f"{1e3 * t:.1f}" for t in c["t_verify"])
                 + ("" if c["t_draft"] is None else
                    f"; draft token {1e3 * c['t_draft']:.1f}; catch-up 1..{len(c['t_catchup'])} "
                    + " ".join(f"{1e3 * t:.1f}" for t in c["t_catchup"])))
    rows = [("method", "tokens/s [95% CI]", "x plain [95% CI]", "acc/step", "steps by γ")]
    for name, row in result["methods"].items():
        rows.append((name, fmt(row["tokens_per_s"], row["ci"]),
                     fmt(row["ratio_to_plain"], row["ratio_to_plain_ci"]),
                     "-" if row["mean_accepted"] is None else f"{row['mean_accepted']:.2f}",
                     "" if _controller_path(name) is None or not row["steps_by_gamma"] else
                     " ".join([*(f"{g}:{n}" for g, n in enumerate(row["steps_by_gamma"]) if n),
                               *([f"lookup:{row['lookup_steps']}"] if row.get("lookup_steps")
                                 else [])])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  " + "  ".join([r[0].ljust(widths[0]),
                                       *(x.rjust(w) for x, w in zip(r[1:], widths[1:],
                                                                    strict=True))]).rstrip())
    if result["identical_to_plain"]:
        lines.append("  every output equals llama.cpp's plain decoding")
    for d in result["differences"]:
        lines.append(f"  {d['method']} on {d['prompt_id']} parts from plain at token "
                     f"{d['first_diff']} (emitted by a {d['forward_rows']}-row forward; top-1 "
                     f"margin {d['plain_margin']:.3g} in plain's one-token forward, "
                     f"{d['method_margin']:.3g} in the method's)")
    load = result.get("load_average")
    if load:
        lines.append(f"load average (1 min): {load['start'][0]:.2f} at start, "
                     f"{load['end'][0]:.2f} at end")
    for pid in result.get("other_bench_processes", []):
        lines.append(f"WARNING: another benchmark process (pid {pid}) was running")
    lines.append(f"95% CIs: paired bootstrap over prompts, {result['resamples']} resamples; "
                 "tokens/s = total tokens / total seconds (prefill included). Run one "
                 "benchmark on the machine at a time.")
    return "\n".join(lines)
