"""The evaluation pipeline: split by prompt, fit the baselines on train, replay every policy
on the held-out split, and summarize."""


from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from speckv import __version__
from speckv.evaluate.baselines import baseline_policies
from speckv.evaluate.replay import (
    BOUND,
    BOUND_DRAFTING,
    LEARNED,
    RESAMPLES,
    SPLIT_SEED,
    SPLIT_TEST,
    SPLIT_VAL,
    EvaluateError,
    Replay,
    Traces,
    prepare,
    replay,
    replay_bound,
    replayable_rows,
)
from speckv.evaluate.summary import summarize
from speckv.policies import (
    OBJECTIVES,
    BestFixed,
    BestStatic,
    LearnedLookup,
    Objective,
    Policy,
)
from speckv.records import sequence_ids, split_prompts

log = logging.getLogger(__name__)


def run(records: pd.DataFrame, learned: Policy | None = None, *,
        objective: Objective = "tokens_per_s", split: str = "test", seed: int = 0,
        resamples: int = RESAMPLES, extra: Sequence[str] = (),
        split_fractions: tuple[float, float, int] = (SPLIT_VAL, SPLIT_TEST, SPLIT_SEED),
        ) -> tuple[dict[str, Any], Traces, dict[str, Replay]]:
    """Split by prompt, fit best_static and best_fixed on train, replay every policy on
    ``split``, summarize."""
    if objective not in OBJECTIVES:
        raise EvaluateError(f"--objective must be one of {', '.join(OBJECTIVES)}.")
    if resamples < 1:
        raise EvaluateError("--resamples must be at least 1 (10000 for a reported p-value).")
    usable = replayable_rows(records)  # refuse before the split can complain
    val, test, split_seed = split_fractions
    assign = split_prompts(records, val=val, test=test, seed=split_seed)
    if not (usable & (assign == split)).any():
        raise EvaluateError(f"The {split!r} split holds no replayable prompts.")
    started = time.perf_counter()
    train = prepare(records.loc[usable & (assign == "train")])
    evaluated = prepare(records.loc[usable & (assign == split)])
    policies = baseline_policies(train, objective, extra)
    if learned is not None:
        learned.name = LEARNED
        policies.insert(0, learned)
        if evaluated.lookup is not None and getattr(learned, "chooses_lookup", False):
            policies.insert(1, LearnedLookup(learned))  # the controller chooses the source
    replays = {}
    for pol in policies:
        t0 = time.perf_counter()
        replays[pol.name] = replay(evaluated, pol)
        log.debug("replayed %s in %.2fs", pol.name, time.perf_counter() - t0)
    replays[BOUND] = replay_bound(evaluated, objective)
    replays[BOUND_DRAFTING] = replay_bound(evaluated, objective, plain_steps=False)
    replay_s = time.perf_counter() - started
    log.info("replayed %d policies on %d %s sequences (%d rows) and fitted the static "
             "baselines on %d train sequences in %.1fs", len(policies), evaluated.n_sequences,
             split, evaluated.n_rows, train.n_sequences, replay_s)
    t0 = time.perf_counter()
    result = summarize(evaluated, replays, objective, resamples, seed)
    best = next(p for p in policies if isinstance(p, BestFixed))
    static = next(p for p in policies if isinstance(p, BestStatic))
    keys = sequence_ids(records)
    result.update({
        "objective": objective,
        "split": {"name": split, "val": val, "test": test, "seed": split_seed,
                  "train_sequences": train.n_sequences,
                  "prompts": {s: int(keys[assign == s].nunique())
                              for s in ("train", "val", "test")}},
        "best_fixed_gamma": best.gammas,
        "best_static_choice": static.choices,  # 0 = plain decoding (the target alone)
        "lookup_rule_match": next((getattr(p, "fitted_match", None) for p in policies
                                   if getattr(p, "fitted_match", None)), None),
        "learned": {"status": "evaluated" if learned is not None else "skipped"},
        "replay_seconds": round(replay_s, 3),
        "bootstrap_seconds": round(time.perf_counter() - t0, 3),
        "speckv_version": __version__,
    })
    if result["bound_beaten_on_sequences"]:  # cannot happen unless replay is broken
        log.error("the exact upper bound is beaten on some sequences (%s): please report this",
                  result["bound_beaten_on_sequences"])
    return result, evaluated, replays


