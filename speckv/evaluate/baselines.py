"""The baselines a learned policy must beat, fitted on the training prompts by replay:
every fixed γ, the best fixed γ and the best static choice (plain decoding or a fixed γ) per
compression, and the rules (heuristic, confidence and entropy stops, EMA, oracle)."""


from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from speckv.evaluate.replay import EvaluateError, Traces, metrics, prepare, replay
from speckv.policies import (
    BestFixed,
    BestStatic,
    ConfidenceStop,
    EmaRule,
    EntropyStop,
    FixedGamma,
    FixedTree,
    Heuristic,
    LookupRule,
    Objective,
    Oracle,
    Plain,
    Policy,
    from_spec,
)
from speckv.runtime.features import GAMMAS
from speckv.runtime.proposal import TREES


def static_scores(traces: Traces, objective: Objective = "tokens_per_s"
                  ) -> dict[str, np.ndarray]:
    """Objective of plain decoding, every fixed γ and (where the records hold them) every
    fixed tree per compression, by replay: ``{compression: [plain, fixed:1, ..., fixed:8,
    tree:N...]}`` (index = the option code, 0 = plain)."""
    target = traces.target_time()
    scores: dict[str, list[float]] = {c: [] for c in sorted(set(traces.compression))}
    trees = [FixedTree(t.size) for t in TREES] if traces.has_trees else []
    for pol in [Plain(), *(FixedGamma(g) for g in GAMMAS), *trees]:
        parts = replay(traces, pol).parts(target)
        for comp in scores:
            m = metrics(parts[traces.compression == comp].sum(0))
            scores[comp].append(float(m[objective]))
    return {c: np.asarray(v) for c, v in scores.items()}


def fixed_scores(traces: Traces, objective: Objective = "tokens_per_s") -> dict[str, np.ndarray]:
    """Objective of every fixed γ per compression: ``{compression: [len(GAMMAS)]}``."""
    target = traces.target_time()
    scores: dict[str, list[float]] = {c: [] for c in sorted(set(traces.compression))}
    for g in GAMMAS:
        parts = replay(traces, FixedGamma(g)).parts(target)
        for comp in scores:
            m = metrics(parts[traces.compression == comp].sum(0))
            scores[comp].append(float(m[objective]))
    return {c: np.asarray(v) for c, v in scores.items()}



# ----------------------------------------------------------------------------- pipeline
def baseline_policies(train: Traces | None, objective: Objective,
                      extra: Sequence[str] = ()) -> list[Policy]:
    """best_static and best_fixed (both fitted on ``train``), fixed:1..8, every fixed tree
    (where the training records hold trees), heuristic, confidence, entropy, ema, oracle,
    and any extra specs."""
    policies: list[Policy] = []
    if train is not None:
        scores = static_scores(train, objective)  # one replay serves both fits
        policies += [BestStatic.from_scores(scores),
                     BestFixed.from_scores({c: v[: len(GAMMAS) + 1] for c, v in scores.items()})]
    policies += [FixedGamma(g) for g in GAMMAS]
    if train is not None and train.has_trees:
        policies += [FixedTree(t.size) for t in TREES]
    if train is not None and train.lookup is not None:
        policies += [LookupRule(1), fit_lookup_rule(train, policies[0], objective)]
    policies += [Heuristic(), ConfidenceStop(), EntropyStop(), EmaRule(), Oracle(objective)]
    for spec in extra:
        pol = from_spec(spec, objective=objective)
        if pol is None:
            continue  # "ar" is the target-alone baseline, reported anyway
        if any(p.name == pol.name for p in policies):
            raise EvaluateError(f"--policy {spec}: {pol.name!r} is evaluated already.")
        policies.append(pol)
    return policies


def fit_best_fixed(train: Traces | pd.DataFrame, objective: Objective = "tokens_per_s"
                   ) -> BestFixed:
    """Replay ``fixed:1..8`` on the training records and keep, per compression, the γ with the
    most tokens per second (or per step); near-ties go to the smaller γ."""
    traces = train if isinstance(train, Traces) else prepare(train)
    return BestFixed.from_scores(fixed_scores(traces, objective))


def fit_best_static(train: Traces | pd.DataFrame, objective: Objective = "tokens_per_s"
                    ) -> BestStatic:
    """Replay plain decoding and ``fixed:1..8`` on the training records and keep, per
    compression, the best; near-ties go to plain, then the smaller γ."""
    traces = train if isinstance(train, Traces) else prepare(train)
    return BestStatic.from_scores(static_scores(traces, objective))


#: the match lengths a fitted lookup rule chooses from
LOOKUP_MATCHES = (1, 2, 3, 4)


def fit_lookup_rule(train: Traces, inner: Policy, objective: Objective = "tokens_per_s"
                    ) -> LookupRule:
    """The fixed rule over both sources: the context lookup's continuation when its match is
    at least ``m`` tokens, else ``inner`` (the best static choice), with ``m`` the best of
    :data:`LOOKUP_MATCHES` on the training records (ties: the shorter). Named
    ``lookup+best_static``."""
    target = train.target_time()
    scores = [float(metrics(replay(train, LookupRule(m, inner)).parts(target).sum(0))[objective])
              for m in LOOKUP_MATCHES]
    best = LOOKUP_MATCHES[int(np.argmax(scores))]
    rule = LookupRule(best, inner)
    rule.name = f"lookup+{inner.name}"
    rule.fitted_match = best
    return rule
