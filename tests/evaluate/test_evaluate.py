"""Replay, statistics and the ``speckv evaluate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from locations import FIXTURES, PAPER_CSV
from synthetic import (
    add_trees_and_lookup,
    fit_survival_mlp,
    make_records,
    save_checkpoint,
    sequence_rows,
)

import speckv.paths
from speckv.__main__ import main as speckv_main
from speckv.evaluate.baselines import (
    baseline_policies,
    fit_best_fixed,
    fit_best_static,
    fixed_scores,
    static_scores,
)
from speckv.evaluate.pipeline import run
from speckv.evaluate.replay import (
    BEST_FIXED,
    BEST_STATIC,
    BOUND_DRAFTING,
    COMPARISONS,
    LEARNED,
    EvaluateError,
    metrics,
    prepare,
    replay,
    replay_bound,
)
from speckv.evaluate.statistics import MIN_DRAWS, sign_flip_test
from speckv.evaluate.summary import bootstrap_weights, compare
from speckv.policies import (
    PLAIN,
    ConfidenceStop,
    FixedGamma,
    Heuristic,
    Learned,
    Oracle,
    Plain,
    PreContext,
    StepContext,
)
from speckv.records import split_prompts, validate, write_records
from speckv.runtime.features import GAMMA_MAX, GAMMAS
from speckv.runtime.proposal import N_OPTIONS
from speckv.train.chooser import TorchChooser

REQUIRED = ["learned", "best_static", "best_fixed", *(f"fixed:{g}" for g in GAMMAS), "heuristic",
            "confidence:0.4", "entropy:2", "ema", "oracle"]


# ----------------------------------------------------------------------- hand-built traces
def hand_trace(agree: list[int], prompt_id: str = "p0", compression: str = "fp16",
               top1: dict[int, list[float]] | None = None,
               budget: int | None = None, catchup: list[float] | None = None) -> pd.DataFrame:
    """One answer whose draft agrees at the positions marked 1, decoded with ``budget`` new
    tokens at most (default: the answer's length); costs are round numbers: 1 s per draft
    token, 10 + g s to verify g tokens (a step drafting g costs 10 + 2g), and, with
    ``catchup``, that many seconds for a catch-up forward over 1, 2, ... tokens."""
    n = len(agree)
    budget = n if budget is None else budget
    df = sequence_rows("code", prompt_id, compression, n, np.random.default_rng(0), budget)
    run = np.zeros(n + 1, int)
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if agree[i] else 0
    cap = np.minimum(np.minimum(GAMMA_MAX, budget - 1 - np.arange(n)), n - np.arange(n))
    df["accept_len"] = np.minimum(run[:-1], cap).astype(np.int16)
    df["accept_cap"] = cap.astype(np.int16)
    rows = [np.full(GAMMA_MAX, 0.9, np.float32) for _ in range(n)]
    for pos, values in (top1 or {}).items():
        rows[pos][: len(values)] = values
    df["draft_top1_k"] = rows
    df["draft_entropy_k"] = [np.full(GAMMA_MAX, 0.5, np.float32) for _ in range(n)]
    df["cost_draft_s"] = np.float32(1.0)
    df["cost_verify_s"] = [np.arange(10, 10 + GAMMA_MAX + 1, dtype=np.float32)] * n
    df = validate(df)
    if catchup is not None:
        df["cost_catchup_s"] = [np.asarray(catchup, np.float32)] * n
    return df


AGREE = [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]  # accept_len = [2, 1, 0, 4, 3, 2, 1, 0, 1, 0]


def totals(df: pd.DataFrame, policy) -> tuple[int, int, int, int, float]:
    r = replay(prepare(df), policy)
    return (int(r.tokens[0]), int(r.steps[0]), int(r.drafted[0]), int(r.accepted[0]),
            float(r.time_s[0]))


def test_hand_trace_has_the_intended_accept_lengths():
    assert hand_trace(AGREE)["accept_len"].tolist() == [2, 1, 0, 4, 3, 2, 1, 0, 1, 0]


def test_replay_fixed_gamma_by_hand():
    df = hand_trace(AGREE)
    # γ=2: p0 acc 2 -> p3 acc 2 -> p6 acc 1 -> p8 (1 left: γ=1) acc 1 -> p10
    assert totals(df, FixedGamma(2)) == (10, 4, 7, 6, 3 * 14 + 12)
    # γ=1: p0 +2, p2 +1, p3 +2, p5 +2, p7 +1, p8 +2
    assert totals(df, FixedGamma(1)) == (10, 6, 6, 4, 6 * 12)


def test_replay_heuristic_by_hand():
    # γ 4 at p0 (acc 2 of 4: γ->3), 3 at p3 (acc 3 of 3: γ->5), capped to 2 at p7 (acc 0),
    # then 1 at p8 (acc 1)
    assert totals(hand_trace(AGREE), Heuristic()) == (10, 4, 10, 6, 18 + 16 + 14 + 12)


def test_replay_confidence_stop_by_hand():
    df = hand_trace(AGREE, top1={0: [0.9, 0.3], 3: [0.9, 0.9, 0.9, 0.9, 0.35]})
    # p0: stops after token 2 (top1 0.3 < 0.4; it stays drafted), acc 2 -> p3;
    # p3: max_gamma 6, stops after token 5, acc 4 -> p8; p8: γ=1, acc 1 -> p10
    assert totals(df, ConfidenceStop(0.4)) == (10, 3, 8, 7, 14 + 20 + 12)


def test_replay_oracle_by_hand():
    df = hand_trace(AGREE)
    # p0 L=2: γ=2 (3 tokens / 14 s) -> p3 L=4: γ=4 (5/18) -> p8 L=1: γ=1
    assert totals(df, Oracle()) == (10, 3, 7, 7, 14 + 18 + 12)
    assert totals(df, Oracle("tokens_per_step")) == (10, 3, 7, 7, 14 + 18 + 12)


def test_replay_an_answer_that_ended_with_eos_by_hand():
    # 4 tokens, the last one EOS, decoded with a budget of 10: the decoder cannot see the end
    right = hand_trace([1, 1, 1, 1], budget=10)  # the draft proposes the EOS too
    assert right["accept_len"].tolist() == [4, 3, 2, 1]
    # γ=2: p0 acc 2 (+3) -> p3, still drafts 2 (max_gamma 6): acc 1 = the EOS, no bonus
    assert totals(right, FixedGamma(2)) == (4, 2, 4, 3, 14 + 14)
    # γ=8 drafts past the end; all 4 accepted, the EOS ends the answer: one 26 s step
    assert totals(right, FixedGamma(8)) == (4, 1, 8, 4, 26)
    # the oracle knows drafting the EOS gains nothing: γ=3, and the target emits the EOS
    assert totals(right, Oracle()) == (4, 1, 3, 3, 16)
    assert float(replay_bound(prepare(right)).time_s[0]) == 16
    wrong = hand_trace([1, 1, 1, 0], budget=10)  # the draft misses the EOS
    assert totals(wrong, FixedGamma(8)) == (4, 1, 8, 3, 26)
    assert totals(wrong, Oracle()) == (4, 1, 3, 3, 16)


class Spy:
    """Wraps a policy; records every decision and checks drafted <= max_gamma."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name
        self.max_gammas: list[int] = []
        self.max_drafted_over_max_gamma = 0

        self.pre: list[PreContext] = []

    def reset(self) -> None:
        self.inner.reset()

    def speculate(self, ctx: PreContext) -> bool:
        self.pre.append(ctx)
        inner = getattr(self.inner, "speculate", None)
        return True if inner is None else inner(ctx)

    def choose(self, ctx: StepContext) -> int:
        self.max_gammas.append(ctx.max_gamma)
        return self.inner.choose(ctx)

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return self.inner.keep_drafting(k, top1, entropy)

    def observe(self, drafted: int, accepted: int) -> None:
        self.max_drafted_over_max_gamma = max(self.max_drafted_over_max_gamma,
                                              drafted - self.max_gammas[-1])
        assert 0 <= accepted <= drafted
        self.inner.observe(drafted, accepted)


def test_last_token_is_a_plain_target_step_without_a_decision():
    df = hand_trace([0, 0, 0])
    spy = Spy(FixedGamma(2))
    # p0: γ=2 acc 0 (14 s); p1: one left to draft, γ=1 acc 0 (12 s); p2: plain step (10 s)
    assert totals(df, spy) == (3, 3, 3, 0, 14 + 12 + 10)
    assert spy.max_gammas == [2, 1]


class PlainFirst:
    """Plain steps before position ``until`` (decided before the draft), then fixed γ;
    records what it observes and the catch-up sizes it is offered."""

    name = "plain_first"

    def __init__(self, until: int, gamma: int) -> None:
        self.until, self.gamma = until, gamma
        self.observed: list[tuple[int, int]] = []
        self.unseen: list[int] = []

    def reset(self) -> None:
        pass

    def speculate(self, ctx: PreContext) -> bool:
        self.unseen.append(ctx.unseen)
        return ctx.position >= self.until

    def choose(self, ctx: StepContext) -> int:
        return self.gamma

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return True

    def observe(self, drafted: int, accepted: int) -> None:
        self.observed.append((drafted, accepted))


class PlainAfterDraft(PlainFirst):
    """The same, but the plain steps are decided after the draft's forward (choose -> 0)."""

    name = "plain_after_draft"

    def speculate(self, ctx: PreContext) -> bool:
        self.unseen.append(ctx.unseen)
        return True

    def choose(self, ctx: StepContext) -> int:
        return PLAIN if ctx.position < self.until else self.gamma


def test_replay_plain_steps_by_hand():
    pol = PlainFirst(until=3, gamma=2)
    # p0, p1, p2 plain (10 s each); p3 γ=2 acc 2 (+3, 14 s) -> p6 γ=2 acc 1 (+2, 14 s) -> p8
    # one left to draft: γ=1 acc 1 (+2, 12 s)
    assert totals(hand_trace(AGREE), pol) == (10, 6, 5, 4, 30 + 14 + 14 + 12)
    assert pol.observed == [(2, 2), (2, 1), (1, 1)]  # plain steps are not observed
    # the catch-up after three plain steps covers four tokens, after a full acceptance two
    assert pol.unseen == [1, 2, 3, 4, 2, 1]
    rep = replay(prepare(hand_trace(AGREE)), PlainFirst(until=3, gamma=2))
    assert rep.chosen[0].tolist() == ([3, 0, 3, 0, 0, 0, 0, 0, 0]
                                           + [0] * (N_OPTIONS - GAMMA_MAX - 1))


class Declines(PlainFirst):
    """Declines every step but the probes: after ``max_skip_run`` plain steps in a row it
    drafts γ = 1, as the learned controller does."""

    name = "declines"
    max_skip_run = 2

    def __init__(self) -> None:
        super().__init__(until=0, gamma=1)

    def speculate(self, ctx: PreContext) -> bool:
        return ctx.skipped >= self.max_skip_run


def test_llamacpp_records_are_replayed_with_llamacpps_probe_interval():
    """Records whose draft is a GGUF file come from llama.cpp, whose loop probes after the
    interval its costs price (speckv.engines.llamacpp.loop_probe_interval): on these costs
    (a probe's extra second is 10% of a 10 s plain step, so ~20 steps) a ten-token answer
    is decoded without a probe, where the contract's own rule probes after every 2 plain
    steps."""
    hf = replay(prepare(hand_trace(AGREE)), Declines())
    assert hf.chosen[0][1] == 2  # probes at positions 2 and 5 (the last token has no decision)
    gguf = hand_trace(AGREE)
    gguf["draft_model"] = "runs/draft.gguf"
    rep = replay(prepare(gguf), Declines())
    assert rep.chosen[0][1] == 0 and rep.chosen[0][0] == len(AGREE) - 1  # no probe: all plain
    assert int(rep.steps[0]) == len(AGREE) and float(rep.time_s[0]) == 10.0 * len(AGREE)


def test_a_plain_step_after_the_draft_pays_for_the_draft_forward():
    pol = PlainAfterDraft(until=3, gamma=2)
    # as above, but each of p0..p2 also runs the draft's forward (1 s): 3 x 11 s
    assert totals(hand_trace(AGREE), pol) == (10, 6, 5, 4, 33 + 14 + 14 + 12)
    assert pol.unseen == [1, 1, 1, 1, 2, 1]  # the draft kept up: nothing left to catch up on


def test_the_catchup_forward_is_priced_by_its_size():
    # a catch-up over n tokens costs 1, 1.5, 2, 2.5, ... s (one draft token is 1 s)
    df = hand_trace(AGREE, catchup=[1.0, 1.5, 2.0])
    # p0..p2 plain (30 s); p3 γ=2 after a 4-token catch-up (2.5 + 1 + 12 s) acc 2;
    # p6 γ=2 after the bonus (2 tokens: 1.5 + 1 + 12) acc 1; p8 γ=1 (1 + 11)
    assert totals(df, PlainFirst(until=3, gamma=2)) == (10, 6, 5, 4, 30 + 15.5 + 14.5 + 12)
    # without plain steps only one- and two-token catch-ups occur
    # γ=2: p0 acc 2 (14 s) -> p3 after the bonus (14.5) acc 2 -> p6 (14.5) acc 1 -> p8 (12)
    assert totals(df, FixedGamma(2)) == (10, 4, 7, 6, 14 + 14.5 + 14.5 + 12)
    # the bound's path of the uniform case, now with two two-token catch-ups (p3 and p8, each
    # after a full acceptance): 14 + 18.5 + 12.5
    assert float(replay_bound(prepare(df)).time_s[0]) == 14 + 18.5 + 12.5


def test_pre_draft_features_are_the_trace_history_where_the_draft_stopped(traces):
    """In a run of plain steps the settled history stays where the draft last ran."""
    from speckv.runtime.features import pre_from_step_features

    spy = Spy(PlainFirst(until=5, gamma=3))
    replay(traces, spy)
    start = int(traces.starts[0])
    first = [ctx for ctx in spy.pre][:6]
    assert [ctx.unseen for ctx in first] == [1, 2, 3, 4, 5, 6]
    for p, ctx in enumerate(first):
        u = ctx.unseen - 1
        want = pre_from_step_features(traces.features[start + p], traces.features[start + p - u],
                                      u)[0]
        np.testing.assert_array_equal(ctx.features, want)
        assert ctx.skipped == p and ctx.plain_cost == pytest.approx(traces.verify0[start + p])
        np.testing.assert_allclose(ctx.costs, traces.costs_for(ctx.unseen)[start + p])


def test_replay_of_plain_is_the_target_alone(traces):
    rep = replay(traces, Plain())
    np.testing.assert_array_equal(rep.tokens, traces.lengths)
    np.testing.assert_array_equal(rep.steps, traces.lengths)
    assert rep.drafted.sum() == 0 and rep.accepted.sum() == 0
    np.testing.assert_allclose(rep.time_s, traces.target_time(), rtol=1e-9)
    # every step is a plain choice, but for the budget's last token (no decision there)
    np.testing.assert_array_equal(rep.chosen[:, 0],
                                  traces.lengths - (traces.lengths == traces.budgets))


def test_replay_refuses_a_choice_outside_plain_and_gamma_max():
    class Bad(PlainFirst):
        name = "bad"

        def choose(self, ctx):
            return -1

    with pytest.raises(EvaluateError, match="plain target step"):
        replay(prepare(hand_trace(AGREE)), Bad(0, 1))


class RandomPolicy:
    """Random γ and random early stops: a stress test for the bounds."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def choose(self, ctx: StepContext) -> int:
        return int(self.rng.integers(1, GAMMA_MAX + 1))

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        return bool(self.rng.random() < 0.8)

    def observe(self, drafted: int, accepted: int) -> None:
        pass


@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    return make_records(prompts_per_task=6, min_len=20, max_len=90, seed=0)


@pytest.fixture(scope="module")
def traces(synthetic):
    return prepare(synthetic)


class RandomPlainPolicy(RandomPolicy):
    """Random γ, random early stops, and a plain step after the draft one time in three."""

    name = "random_plain"

    def choose(self, ctx: StepContext) -> int:
        return PLAIN if self.rng.random() < 1 / 3 else super().choose(ctx)


class RandomSkipPolicy(RandomPolicy):
    """Random γ, random early stops, and runs of plain steps before the draft."""

    name = "random_skip"

    def speculate(self, ctx: PreContext) -> bool:
        return bool(self.rng.random() < (0.3 if ctx.skipped else 0.6))


def all_policies(traces):
    return [*baseline_policies(traces, "tokens_per_s"), RandomPolicy(), RandomPlainPolicy(),
            RandomSkipPolicy()]


def test_policies_never_draft_more_than_max_gamma(traces):
    for pol in all_policies(traces):
        spy = Spy(pol)
        rep = replay(traces, spy)
        assert spy.max_drafted_over_max_gamma <= 0, pol.name
        assert (rep.tokens == traces.lengths).all(), pol.name  # every token, exactly once
        assert (rep.accepted <= rep.drafted).all()


def test_exact_bound_beats_every_policy_on_every_sequence(traces):
    bound = replay_bound(traces)
    assert (bound.tokens == traces.lengths).all()
    bound_tps = bound.tokens / bound.time_s
    for pol in [*all_policies(traces), Oracle(), Plain()]:
        rep = replay(traces, pol)
        worst = np.max((rep.tokens / rep.time_s) / bound_tps)
        assert worst <= 1 + 1e-9, f"{pol.name} beats the bound by {worst - 1:.2%}"
    drafting = replay_bound(traces, plain_steps=False)
    assert drafting.name == BOUND_DRAFTING
    assert (drafting.time_s >= bound.time_s * (1 - 1e-12)).all()
    assert drafting.chosen[:, 0].sum() == 0  # never a plain step by choice
    drafting_tps = drafting.tokens / drafting.time_s
    for pol in [FixedGamma(g) for g in GAMMAS] + [Heuristic(), RandomPolicy()]:
        rep = replay(traces, pol)
        assert np.max((rep.tokens / rep.time_s) / drafting_tps) <= 1 + 1e-9, pol.name


@pytest.fixture(scope="module")
def traces_with_catchup(synthetic):
    """The synthetic traces with a measured catch-up that grows faster than one draft token."""
    df = synthetic.copy()
    draft = float(df["cost_draft_s"].iat[0])
    df["cost_catchup_s"] = [np.asarray(draft * (1 + 0.4 * np.arange(6)) ** 1.3, np.float32)
                            ] * len(df)
    traces = prepare(df)
    assert traces.catchup_measured
    return traces


def test_exact_bound_beats_every_policy_with_a_measured_catchup(traces_with_catchup, traces):
    cheap, traces = traces, traces_with_catchup
    bound = replay_bound(traces)
    bound_tps = bound.tokens / bound.time_s
    policies = [*all_policies(traces), Oracle(), Plain(), PlainFirst(until=7, gamma=3)]
    for pol in policies:
        rep = replay(traces, pol)
        assert (rep.tokens == traces.lengths).all(), pol.name
        worst = np.max((rep.tokens / rep.time_s) / bound_tps)
        assert worst <= 1 + 1e-9, f"{pol.name} beats the bound by {worst - 1:.2%}"
    # skipping policies pay for their long catch-ups: the same policy costs more than
    # where a catch-up of any size costs one draft token
    plain_first = PlainFirst(until=7, gamma=3)
    assert (replay(traces, plain_first).time_s > replay(cheap, plain_first).time_s).all()
    assert (replay_bound(traces).time_s >= replay_bound(cheap).time_s * (1 - 1e-12)).all()


def test_bound_takes_plain_steps_where_the_draft_is_wrong():
    # the draft never agrees: a plain step (10 s) beats any drafting step (12 s or more)
    df = hand_trace([0] * 6)
    assert float(replay_bound(prepare(df)).time_s[0]) == 60
    assert float(replay_bound(prepare(df), plain_steps=False).time_s[0]) == 5 * 12 + 10
    # here the best steps never land on a mistake: p0 d=2 (14 s), p3 d=4 (18 s), p8 d=1
    assert float(replay_bound(prepare(hand_trace(AGREE))).time_s[0]) == 14 + 18 + 12
    # accept_len [2, 1, 0, 0, 1, 0]: p0 d=2 (+3, 14 s), p3 plain (10 s) where the draft is
    # wrong, p4 d=1 (its accepted token ends the answer, 12 s): 36 s; drafting at p3 instead
    # costs 12 s, so the drafting-only bound is 38 s
    trace = prepare(hand_trace([1, 1, 0, 0, 1, 1]))
    bound = replay_bound(trace)
    assert float(bound.time_s[0]) == 14 + 10 + 12
    assert bound.chosen[0].tolist() == ([1, 1, 1, 0, 0, 0, 0, 0, 0]
                                             + [0] * (N_OPTIONS - GAMMA_MAX - 1))
    assert float(replay_bound(trace, plain_steps=False).time_s[0]) == 14 + 12 + 12


def test_per_step_oracle_is_exact_unless_a_step_is_capped_at_gamma_max():
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(40):
        agree = (rng.random(int(rng.integers(5, 30))) < 0.6).astype(int).tolist()
        df = hand_trace(agree, prompt_id=f"p{i}")
        if (df["accept_len"] == GAMMA_MAX).any():
            continue  # a capped run: the greedy oracle may land on the draft's mistake
        checked += 1
        oracle = totals(df, Oracle())
        bound = replay_bound(prepare(df))  # the oracle may take plain steps too
        assert oracle[4] == pytest.approx(float(bound.time_s[0]))
        for pol in [FixedGamma(g) for g in GAMMAS] + [Heuristic(), ConfidenceStop(0.95)]:
            assert oracle[4] <= totals(df, pol)[4] + 1e-9, pol.name
    assert checked >= 20


def test_per_step_oracle_after_a_capped_step():
    # a run of 9 agreements, then the draft's mistake at position 9, then one more token
    df = hand_trace([1] * 9 + [0, 1])
    # oracle: γ=8 (26 s) lands on position 9, where the draft is wrong: a plain step (10 s)
    # rather than a γ=1 step (12 s) for the same one token, then the last token is a plain
    # step (10 s); fixed:4 takes two 4-token steps and the plain one. With plain steps
    # available, landing on the mistake costs the oracle no more than the exact bound here.
    assert totals(df, Oracle())[4] == 26 + 10 + 10
    assert totals(df, FixedGamma(4))[4] == 18 + 18 + 10
    assert float(replay_bound(prepare(df)).time_s[0]) == 46


def test_best_fixed_takes_the_best_gamma_per_compression_on_train():
    always = hand_trace([1] * 36, "a", "fp16")  # always right: γ=8 takes 4 steps, γ=7 5
    never = hand_trace([0] * 30, "b", "nf4")  # the draft is always wrong
    best = fit_best_fixed(pd.concat([always, never], ignore_index=True))
    assert best.gammas == {"fp16": 8, "nf4": 1}


def test_best_fixed_matches_a_brute_force_search(synthetic, traces):
    best = fit_best_fixed(synthetic)
    for comp, g in best.gammas.items():
        scores = []
        for cand in GAMMAS:
            rep = replay(traces, FixedGamma(cand))
            mask = traces.compression == comp
            scores.append(rep.tokens[mask].sum() / rep.time_s[mask].sum())
        assert g == GAMMAS[int(np.argmax(scores))]
    assert set(fixed_scores(traces)) == {"fp16", "int8", "nf4"}


def test_best_static_takes_plain_where_speculation_never_pays():
    always = hand_trace([1] * 36, "a", "fp16")
    never = hand_trace([0] * 30, "b", "nf4")  # plain: 10 s a token, γ=1: 12 s a token
    both = pd.concat([always, never], ignore_index=True)
    assert fit_best_static(both).choices == {"fp16": 8, "nf4": PLAIN}
    assert fit_best_fixed(both).gammas == {"fp16": 8, "nf4": 1}
    # tokens per step: a plain step and a failed γ=1 step both make one token: the tie goes
    # to plain
    assert fit_best_static(both, "tokens_per_step").choices == {"fp16": 8, "nf4": PLAIN}


def test_best_static_matches_a_brute_force_search(synthetic, traces):
    best = fit_best_static(synthetic)
    scores = static_scores(traces)
    for comp, choice in best.choices.items():
        mask = traces.compression == comp
        found = []
        for pol in [Plain(), *(FixedGamma(g) for g in GAMMAS)]:
            rep = replay(traces, pol)
            found.append(rep.tokens[mask].sum() / rep.time_s[mask].sum())
        np.testing.assert_allclose(scores[comp], found)
        assert choice == int(np.argmax(found))
        assert found[0] == pytest.approx(traces.lengths[mask].sum()
                                         / traces.target_time()[mask].sum())
        np.testing.assert_allclose(fixed_scores(traces)[comp], found[1:])


def test_best_static_is_never_worse_than_best_fixed_on_the_data_it_was_fitted_on(synthetic,
                                                                                traces):
    static, fixed = fit_best_static(traces), fit_best_fixed(traces)
    a, b = replay(traces, static), replay(traces, fixed)
    for comp in ("fp16", "int8", "nf4"):
        mask = traces.compression == comp
        assert a.tokens[mask].sum() / a.time_s[mask].sum() >= \
            b.tokens[mask].sum() / b.time_s[mask].sum() * (1 - 1e-12)


def test_run_fits_best_fixed_on_the_train_split_only(synthetic):
    result, _, _ = run(synthetic, resamples=50)
    assign = split_prompts(synthetic)
    assert result["best_fixed_gamma"] == fit_best_fixed(synthetic[assign == "train"]).gammas
    assert result["best_static_choice"] == fit_best_static(synthetic[assign == "train"]).choices
    assert result["split"]["name"] == "test"
    assert result["n_prompts"] == result["split"]["prompts"]["test"]


@pytest.fixture(scope="module")
def tiny_mlp(synthetic):
    """A survival MLP fitted (briefly) on the synthetic train prompts."""
    pytest.importorskip("torch")
    return fit_survival_mlp(synthetic[split_prompts(synthetic) == "train"], steps=150)


@pytest.fixture(scope="module")
def tiny_pre_mlp(synthetic):
    """The pre-draft network, fitted the same way."""
    pytest.importorskip("torch")
    return fit_survival_mlp(synthetic[split_prompts(synthetic) == "train"], steps=150, pre=True)


@pytest.fixture
def one_torch_thread():
    """Batch-1 inference in one thread (two threads crawl on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learned_batch_and_step_by_step_replays_agree(tiny_mlp, tiny_pre_mlp, traces,
                                                     one_torch_thread):
    from speckv.train.network import ControllerGraph

    learned = Learned(TorchChooser(ControllerGraph(tiny_mlp, GAMMAS, tiny_pre_mlp)))
    batched = replay(traces, learned)
    spy = Spy(learned)  # the spy hides choose_batch: one choose() per decision
    stepwise = replay(traces, spy)
    np.testing.assert_array_equal(batched.steps, stepwise.steps)
    np.testing.assert_allclose(batched.time_s, stepwise.time_s)
    np.testing.assert_array_equal(batched.chosen, stepwise.chosen)
    assert batched.chosen[:, 1:].sum() == len(spy.max_gammas)
    assert batched.chosen[:, 0].sum() > 0  # the pre-draft network declines some steps
    assert len(set(np.flatnonzero(batched.chosen[:, 1:].sum(0)))) > 1  # it does vary γ


def test_learned_onnx_controller_replays_like_its_step_by_step_calls(traces):
    pytest.importorskip("onnxruntime")
    onnx = FIXTURES / "controller_tiny.onnx"
    if not onnx.is_file():
        pytest.skip("the runtime's tiny ONNX fixture is absent")
    from speckv.policies import from_spec

    learned = from_spec(f"onnx:{onnx}")
    assert isinstance(learned, Learned)
    batched = replay(traces, learned)
    spy = Spy(learned)
    stepwise = replay(traces, spy)
    np.testing.assert_array_equal(batched.chosen, stepwise.chosen)
    np.testing.assert_allclose(batched.time_s, stepwise.time_s)
    # the fixture's pre-draft head declines to speculate at some steps, and drafts at others
    assert batched.chosen[:, 0].sum() > 0 and batched.chosen[:, 1:].sum() > 0
    assert max(ctx.skipped for ctx in spy.pre) <= learned.max_skip_run  # probes happen


# -------------------------------------------------------------------------------- statistics
def test_metrics_are_ratios_of_sums():
    parts = np.array([[10, 4, 7, 6, 54, 100], [30, 10, 20, 10, 46, 300]], float)
    m = metrics(parts.sum(0))
    assert m["tokens_per_s"] == pytest.approx(40 / 100)
    assert m["tokens_per_step"] == pytest.approx(40 / 14)
    assert m["acceptance_rate"] == pytest.approx(16 / 27)
    assert m["speedup"] == pytest.approx(400 / 100)


def test_bootstrap_weights_resample_within_strata():
    strata = np.array(["a", "a", "a", "b", "b"])
    w = bootstrap_weights(np.arange(5), strata, resamples=500, seed=1)
    assert w.shape == (500, 5)
    np.testing.assert_array_equal(w[:, :3].sum(1), 3)
    np.testing.assert_array_equal(w[:, 3:].sum(1), 2)
    assert np.array_equal(w, bootstrap_weights(np.arange(5), strata, 500, seed=1))
    assert not np.array_equal(w, bootstrap_weights(np.arange(5), strata, 500, seed=2))


@pytest.fixture(scope="module")
def compared(synthetic):
    """A run with a stand-in "learned" policy (the heuristic), on the train prompts (16)."""
    return run(synthetic, Heuristic(), split="train", resamples=200)


def _per_prompt_time(traces, rep, mask):
    prompts, idx = np.unique(traces.prompt[mask], return_inverse=True)
    return np.bincount(idx, weights=rep.time_s[mask], minlength=len(prompts))


def test_p_values_are_sign_flip_tests_of_the_seconds_saved_per_prompt(compared):
    result, traces, replays = compared
    groups = [("overall", None, np.ones(traces.n_sequences, bool))]
    groups += [("per_compression", c, traces.compression == c) for c in ("fp16", "nf4")]
    groups += [("per_task", "code", traces.task == "code"),
               ("per_compression_task", "int8/math",
                (traces.compression == "int8") & (traces.task == "math"))]
    for kind, name, mask in groups:
        entries = result["p_values"][kind] if name is None else result["p_values"][kind][name]
        assert set(entries) == {key for key, _ in COMPARISONS}
        for key, base in COMPARISONS:
            saved = (_per_prompt_time(traces, replays[base], mask)
                     - _per_prompt_time(traces, replays[LEARNED], mask))
            expected = sign_flip_test(saved)
            entry = entries[key]
            assert entry["p"] == pytest.approx(expected.p), (kind, name, key)
            assert entry["n_prompts"] == len(saved) == len(np.unique(traces.prompt[mask]))
            assert entry["method"] == f"exact sign-flip, 2^{len(saved)} patterns"
            assert entry["resolution"] == pytest.approx(2.0 ** -len(saved))
            assert entry["resolution"] <= entry["p"] <= 1
            # the statistic's sign is the pooled ratio's: learned ÷ baseline > 1
            assert (entry["statistic"] > 0) == (entry["ratio"] > 1), (kind, name, key)
            lo, hi = entry["ratio_ci95"]
            assert lo <= hi
    assert result["p_value_vs_best_static"] == result["p_values"]["overall"]["vs_best_static"]
    assert result["p_values"]["overall"]["vs_best_static"]["n_prompts"] == 16


def test_p_values_use_steps_for_the_tokens_per_step_objective(synthetic):
    result, traces, replays = run(synthetic, Heuristic(), objective="tokens_per_step",
                                  split="train", resamples=50)
    steps = np.bincount(np.unique(traces.prompt, return_inverse=True)[1],
                        weights=replays[FIXED4_NAME].steps - replays[LEARNED].steps)
    assert result["p_values"]["overall"]["vs_fixed4"]["p"] == \
        pytest.approx(sign_flip_test(steps).p)
    assert "steps saved" in result["p_value_test"]


FIXED4_NAME = "fixed:4"


def test_compare_falls_back_to_monte_carlo_above_sixteen_prompts():
    rng = np.random.default_rng(0)
    n = 40  # a random pattern reaches the all-positive sum with chance 2^-40 per draw
    tokens = rng.integers(50, 100, n).astype(float)
    parts = np.zeros((n, 2, 6))
    parts[:, :, 0] = tokens[:, None]
    parts[:, 0, 4] = tokens / 20 * rng.uniform(0.9, 1.0, n)  # policy 0: a little faster
    parts[:, 1, 4] = tokens / 20
    entry = compare(parts, 0, 1, "tokens_per_s", seed=1)
    assert entry["method"].startswith("Monte Carlo")
    assert entry["draws"] == MIN_DRAWS
    assert entry["resolution"] == pytest.approx(1 / (MIN_DRAWS + 1))
    assert entry["p"] == pytest.approx(1 / (MIN_DRAWS + 1))  # faster on every prompt
    parts[3, 0, 0] += 1  # different tokens: replay is broken, refuse to compare
    with pytest.raises(EvaluateError, match="tokens"):
        compare(parts, 0, 1, "tokens_per_s")


# -------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def records_file(tmp_path_factory, synthetic) -> Path:
    return write_records(synthetic, tmp_path_factory.mktemp("records") / "syn.parquet")


def test_cli_json_prints_one_object_and_writes_the_report(records_file, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # no export/speckv.onnx here: the learned policy is skipped
    monkeypatch.setattr(speckv.paths, "REPO", tmp_path)  # nor in the checkout
    rc = speckv_main(["evaluate", "--records", str(records_file), "--json", "--resamples",
                      "300", "--report", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert rc == 0
    result = json.loads(out)
    assert out.strip().count("\n") == 0
    assert set(REQUIRED) - {"learned"} <= set(result["policies"])
    assert "learned" not in result["policies"]
    assert result["learned"]["status"] == "skipped"
    assert result["p_value_vs_fixed4"] is None
    assert result["p_value_vs_best_static"] is None
    for name, entry in result["policies"].items():
        lo, hi = entry["ci95"]
        assert lo <= entry["tokens_per_s"] <= hi, name
        assert set(entry["per_compression"]) == {"fp16", "int8", "nf4"}
        assert entry["speedup"] == pytest.approx(
            entry["tokens_per_s"] / result["target_alone"]["tokens_per_s"])
    assert "skipped" in err
    bound = result["upper_bound"]["tokens_per_s"]
    assert all(e["tokens_per_s"] <= bound * (1 + 1e-9) for e in result["policies"].values())
    assert result["upper_bound_drafting"]["tokens_per_s"] <= bound * (1 + 1e-9)
    assert result["bound_beaten_on_sequences"] == {}
    report = tmp_path / "report"
    assert "# speckv evaluation" in (report / "report.md").read_text()
    for png in ("policy_comparison.png", "regret_to_oracle.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(report.glob(".*"))  # no temporary files left behind


def test_cli_with_a_checkpoint_reports_learned_and_p_values(records_file, tiny_mlp, tiny_pre_mlp,
                                                            tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save_checkpoint(tiny_mlp, tiny_pre_mlp, tmp_path / "tiny.ckpt")
    rc = speckv_main(["evaluate", "--records", str(records_file), "--ckpt", str(ckpt),
                      "--json", "--resamples", "1000", "--report", str(tmp_path / "rep")])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(REQUIRED) <= set(result["policies"])
    for key in ("p_value_vs_fixed4", "p_value_vs_best_fixed", "p_value_vs_best_static"):
        entry = result[key]
        assert {"p", "method", "resolution", "n_prompts"} <= set(entry)
        assert entry["resolution"] == pytest.approx(2.0 ** -result["n_prompts"])
        assert entry["resolution"] <= entry["p"] <= 1
    assert set(result["p_values"]["per_compression"]) == {"fp16", "int8", "nf4"}
    assert all("vs_best_static" in v for v in result["p_values"]["per_compression_task"].values())
    assert set(result["best_static_choice"]) == {"fp16", "int8", "nf4"}
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "vs best_static" in report and "sign-flip" in report
    assert "upper bound (exact DP)" in report and "not an upper bound" in report
    hist = result["gamma_chosen"]["learned"]
    assert sum(map(sum, hist.values())) > 0
    # a controller fitted on these data beats drafting 4 tokens blindly
    assert result["policies"]["learned"]["tokens_per_s"] > \
        result["policies"]["fixed:4"]["tokens_per_s"]
    assert (tmp_path / "rep" / "learned_gamma.png").is_file()


def test_cli_without_records_says_how_to_make_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(speckv.paths, "REPO", tmp_path)
    assert speckv_main(["evaluate"]) == 2
    assert "speckv profile" in capsys.readouterr().err


def test_evaluate_refuses_the_papers_non_replayable_rows(tmp_path, capsys):
    if not PAPER_CSV.is_file():
        pytest.skip("the seed paper's CSV is not in ../shared/paper")
    from speckv.records import import_paper

    df = import_paper(PAPER_CSV)
    with pytest.raises(EvaluateError, match="replayable"):
        run(df)
    path = write_records(df, tmp_path / "paper.parquet")
    assert speckv_main(["evaluate", "--records", str(path), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "replayable" in err and "speckv profile --mode trace" in err


def test_incomplete_traces_are_refused(synthetic):
    first = synthetic[(synthetic["prompt_id"] == synthetic["prompt_id"].iloc[0])
                      & (synthetic["compression"] == "fp16")]
    with pytest.raises(EvaluateError, match="incomplete"):
        prepare(first.drop(first.index[3]))


def test_run_marks_best_fixed_and_reports_target_alone(synthetic):
    result, traces, replays = run(synthetic, resamples=100)
    assert BEST_FIXED in replays and BEST_STATIC in replays
    alone = result["target_alone"]["tokens_per_s"]
    tokens = traces.lengths.sum()
    assert alone == pytest.approx(tokens / traces.target_time().sum())


# ------------------------------------------------------------------- trees and the lookup
def test_a_tree_step_and_a_lookup_step_by_hand():
    from speckv.policies import FixedTree, LookupRule
    from speckv.runtime.proposal import TREES

    df = add_trees_and_lookup(hand_trace(AGREE))
    df["tree_accept_len"] = [np.asarray([a + 1] * len(TREES), np.float32) if a < c
                             else np.asarray([a] * len(TREES), np.float32)
                             for a, c in zip(df["accept_len"], df["accept_cap"], strict=True)]
    df["tree_accept_len"] = [np.minimum(v, [min(t.depth, c) for t in TREES]).astype(np.float32)
                             for v, c in zip(df["tree_accept_len"], df["accept_cap"],
                                             strict=True)]
    # tree:4 (depth 2): p0 accepts min(3, 2) = 2 (+1) -> p3 accepts 2 (+1) -> p6 accepts 2
    # (+1) -> p9: one token left, a plain step; each tree step costs a one-token catch-up
    # (1 s), one level of growth (1 s) and a verify of 10 * 1.12 s
    got = totals(df, FixedTree(4))
    assert got[:4] == (10, 4, 12, 6)
    assert got[4] == pytest.approx(3 * (1 + 1 + 11.2) + 10, rel=1e-6)
    # the lookup alone: no draft cost, verify over its tokens; a plain step where it has none
    df["lookup_length"] = pd.array([2] * 10, dtype="Int16")
    df["lookup_accept"] = pd.array([1] * 10, dtype="Int16")
    df["lookup_match"] = pd.array([2] * 10, dtype="Int16")
    got = totals(df, LookupRule(1))
    assert got[:4] == (10, 5, 10, 5) and got[4] == pytest.approx(5 * 12)
    assert totals(df, LookupRule(3))[:2] == (10, 10)  # a match of 2 < 3: plain steps


def test_evaluate_replays_trees_and_the_lookup_beside_the_chains():
    df = add_trees_and_lookup(make_records(prompts_per_task=6, max_len=40))
    result, _, replays = run(df, resamples=50)
    names = set(result["policies"])
    assert {"tree:4", "tree:64", "lookup:1", "lookup+best_static"} <= names
    assert result["lookup_rule_match"] in (1, 2, 3, 4)
    bound = replays["upper_bound"]
    for name, rep in replays.items():  # the exact bound now covers trees and lookups too
        if name not in ("upper_bound", "oracle"):
            assert (rep.time_s / rep.tokens >= bound.time_s / bound.tokens - 1e-9).all(), name
    assert replays["tree:16"].chosen[:, GAMMA_MAX + 3].sum() > 0
