"""Every figure of an evaluation: ratios of sums per group, bootstrap CIs over prompts and
exact paired sign-flip tests of the learned policy against its baselines (JSON-ready)."""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from speckv.evaluate.replay import (
    BOUND,
    BOUND_DRAFTING,
    COMPARISONS,
    LEARNED,
    METRICS,
    ORACLE,
    PARTS,
    RESAMPLES,
    EvaluateError,
    Replay,
    Traces,
    metrics,
    ratio,
)
from speckv.evaluate.statistics import MIN_DRAWS, ratio_of_sums_differences, sign_flip_test
from speckv.policies import Objective
from speckv.runtime.features import COMPRESSIONS


# ---------------------------------------------------------------------------- statistics
def bootstrap_weights(units: np.ndarray, strata: np.ndarray | None, resamples: int,
                      seed: int) -> np.ndarray:
    """How often each unit is drawn in each resample: ``[resamples, n_units]`` float64.

    Units (prompts) are drawn with replacement within their stratum (task), as many as the
    stratum holds, so every resample keeps the split's task mix.
    """
    units = np.asarray(units)
    n = len(units)
    strata = np.zeros(n, np.int64) if strata is None else np.unique(strata, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, n), np.float64)
    rows = np.arange(resamples)[:, None]
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        np.add.at(weights, (np.broadcast_to(rows, draws.shape), draws), 1.0)
    return weights


def compare(per_prompt: np.ndarray, better: int, baseline: int, objective: Objective, *,
            seed: int = 0, draws: int = MIN_DRAWS) -> dict[str, Any]:
    """Sign-flip test of policy ``better`` against ``baseline`` over the prompts of a group.

    ``per_prompt`` ``[n_prompts, n_policies, len(PARTS)]`` holds the group's sums per
    prompt (only the group's prompts). The paired difference of a prompt is what the pooled
    objective's denominator loses: seconds (tokens_per_s) or steps (tokens_per_step) saved
    by ``better`` (see :func:`speckv.evaluate.statistics.ratio_of_sums_differences`). Returns the
    test's JSON entry: ``p``, ``method``, ``resolution``, ``n_prompts``, ``statistic``.
    """
    den = PARTS.index("time_s" if objective == "tokens_per_s" else "steps")
    tok = PARTS.index("tokens")
    try:
        diff = ratio_of_sums_differences(per_prompt[:, better, tok], per_prompt[:, better, den],
                                         per_prompt[:, baseline, tok],
                                         per_prompt[:, baseline, den])
    except ValueError as exc:  # replay emits every token once: cannot happen unless broken
        raise EvaluateError(f"Cannot compare the policies prompt by prompt: {exc}") from None
    return sign_flip_test(diff, seed=seed, draws=draws).as_dict()


def _ci(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class _Group:
    name: str
    kind: str  # overall | compression | task | compression_task
    mask: np.ndarray  # [S] sequences in the group


def _groups(traces: Traces) -> list[_Group]:
    comps = [c for c in COMPRESSIONS if c in set(traces.compression)]
    tasks = sorted(set(traces.task))
    out = [_Group("overall", "overall", np.ones(traces.n_sequences, bool))]
    out += [_Group(c, "compression", traces.compression == c) for c in comps]
    out += [_Group(t, "task", traces.task == t) for t in tasks]
    for c in comps:
        for t in tasks:
            mask = (traces.compression == c) & (traces.task == t)
            if mask.any():
                out.append(_Group(f"{c}/{t}", "compression_task", mask))
    return out


def summarize(traces: Traces, replays: dict[str, Replay], objective: Objective,
              resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Every figure of the evaluation, with bootstrap CIs and, for the learned policy, exact
    paired sign-flip tests against the baselines of ``COMPARISONS`` (JSON-ready)."""
    names = list(replays)
    prompts, prompt_idx = np.unique(traces.prompt, return_inverse=True)
    prompt_task = np.empty(len(prompts), dtype=object)
    prompt_task[prompt_idx] = traces.task
    weights = bootstrap_weights(prompts, prompt_task.astype(str), resamples, seed)
    target = traces.target_time()
    parts = np.stack([replays[n].parts(target) for n in names], 1)  # [S, P, K]
    policies: dict[str, dict[str, Any]] = {n: {} for n in names}
    p_values: dict[str, Any] = {"overall": {}, "per_compression": {}, "per_task": {},
                                "per_compression_task": {}}
    target_alone: dict[str, Any] = {}
    for group in _groups(traces):
        per_prompt = np.zeros((len(prompts), *parts.shape[1:]))
        np.add.at(per_prompt, prompt_idx[group.mask], parts[group.mask])
        point = metrics(per_prompt.sum(0))  # each [P]
        boot_parts = (weights @ per_prompt.reshape(len(prompts), -1)).reshape(
            resamples, *per_prompt.shape[1:])
        boot = metrics(boot_parts)  # each [B, P]
        present = (weights @ (np.bincount(prompt_idx[group.mask], minlength=len(prompts)) > 0)) > 0
        boot = {k: np.where(present[:, None], v, np.nan) for k, v in boot.items()}
        oracle = names.index(ORACLE) if ORACLE in names else None
        for i, name in enumerate(names):
            entry: dict[str, Any] = {m: _num(point[m][i]) for m in METRICS}
            cis = {m: _ci(boot[m][:, i]) for m in METRICS}
            entry["ci95"] = cis["tokens_per_s"]
            entry["ci95_by_metric"] = cis
            if oracle is not None:
                entry["regret_to_oracle"] = _num(1 - point["tokens_per_s"][i]
                                                 / point["tokens_per_s"][oracle])
                entry["ci95_by_metric"]["regret_to_oracle"] = _ci(
                    1 - boot["tokens_per_s"][:, i] / boot["tokens_per_s"][:, oracle])
            totals = per_prompt[:, i].sum(0)
            entry.update({k: _num(totals[j]) for j, k in enumerate(PARTS[:5])})
            entry["n_sequences"] = int(group.mask.sum())
            if group.kind == "overall":
                policies[name].update(entry)
            else:
                policies[name].setdefault(f"per_{group.kind}", {})[group.name] = entry
        tgt = per_prompt[:, 0, PARTS.index("target_time_s")]
        tok = per_prompt[:, 0, PARTS.index("tokens")]
        alone = {"tokens_per_s": _num(tok.sum() / tgt.sum()),
                 "ci95": _ci(ratio(weights @ tok, weights @ tgt))}
        if group.kind == "overall":
            target_alone.update(alone)
        else:
            target_alone.setdefault(f"per_{group.kind}", {})[group.name] = alone
        if LEARNED in names:
            li = names.index(LEARNED)
            members = np.unique(prompt_idx[group.mask])  # the group's prompts: the units
            pv = {}
            for key, base in COMPARISONS:
                if base in names:
                    bi = names.index(base)
                    entry = compare(per_prompt[members], li, bi, objective, seed=seed)
                    entry["ratio"] = _num(point[objective][li] / point[objective][bi])
                    entry["ratio_ci95"] = _ci(boot[objective][:, li] / boot[objective][:, bi])
                    pv[key] = entry
            if group.kind == "overall":
                p_values["overall"] = pv
            else:
                p_values[f"per_{group.kind}"][group.name] = pv
    gamma_hist = {}
    for name in names:
        if name in (BOUND, BOUND_DRAFTING):
            continue
        gamma_hist[name] = {
            c: replays[name].chosen[traces.compression == c, 1:].sum(0).tolist()
            for c in COMPRESSIONS if (traces.compression == c).any()
        }
    tps = {n: ratio(replays[n].tokens, replays[n].time_s) for n in names}
    beaten: dict[str, dict[str, int]] = {}
    for ref in (ORACLE, BOUND):
        if ref in names:
            beaten[ref] = {n: k for n in names if n not in (ORACLE, BOUND, BOUND_DRAFTING)
                           and (k := int((tps[ref] < tps[n] * (1 - 1e-9)).sum()))}
    if BOUND in names:  # the oracle and the drafting-only bound are policies it must beat too
        for other in (ORACLE, BOUND_DRAFTING):
            if other in names and (k := int((tps[BOUND] < tps[other] * (1 - 1e-9)).sum())):
                beaten[BOUND][other] = k
    bound = policies.pop(BOUND, None)
    bound_drafting = policies.pop(BOUND_DRAFTING, None)
    return {
        "policies": policies,
        "upper_bound": bound,
        "upper_bound_drafting": bound_drafting,
        "target_alone": target_alone,
        "p_value_vs_fixed4": p_values["overall"].get("vs_fixed4"),
        "p_value_vs_best_fixed": p_values["overall"].get("vs_best_fixed"),
        "p_value_vs_best_static": p_values["overall"].get("vs_best_static"),
        "p_value_metric": objective,
        "p_value_test": ("one-sided paired sign-flip test over prompts (H1: learned better); "
                         "per-prompt difference: "
                         + ("seconds" if objective == "tokens_per_s" else "steps")
                         + " saved by the learned policy, whose sum has the sign of the "
                         "pooled ratio's gain; exact over all 2^n sign patterns for n <= 16 "
                         f"prompts, else {MIN_DRAWS} seeded random patterns"),
        "p_values": p_values,
        "gamma_chosen": gamma_hist,
        "oracle_beaten_on_sequences": beaten.get(ORACLE, {}),
        "bound_beaten_on_sequences": beaten.get(BOUND, {}),
        "n_prompts": len(prompts),
        "n_sequences": traces.n_sequences,
        "n_rows": traces.n_rows,
        "resamples": resamples,
        "seed": seed,
    }


