"""The speculative decoder must be lossless, roll its caches back exactly, and keep the
feature history exactly as a trace of the same answer would (speckv.runtime.features)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from goodness import chi2_pvalue
from locations import FIXTURES
from tiny_models import EOS, VOCAB, reference_greedy, save_with_tokenizer, tiny_llama

from speckv.decode.costs import CostModel, measure_costs
from speckv.decode.decoder import (
    DecodeError,
    SpeculativeDecoder,
    TargetForward,
    measure_catchup,
    records_frame,
    verify_sampled,
    with_catchup,
)
from speckv.decode.invariant import explain_difference, first_difference, greedy_invariant
from speckv.policies import (
    PLAIN,
    BestStatic,
    ConfidenceStop,
    FixedGamma,
    Heuristic,
    Learned,
    PreContext,
    probe_due,
)
from speckv.records import read_records, validate, write_records
from speckv.runtime.costs import CATCHUP_MAX, step_costs
from speckv.runtime.features import GAMMA_MAX, history_arrays
from speckv.runtime.proposal import TREE_SIZES

PROMPT = [1, 5, 17, 33, 8, 90]


class StopAfter:
    """A per-token stopping rule: draft up to γmax, stop after token k when k % period == 0."""

    name = "stop-after"

    def __init__(self, period: int) -> None:
        self.period = period
        self.calls: list[int] = []

    def reset(self) -> None:
        self.calls.clear()

    def choose(self, ctx) -> int:
        return GAMMA_MAX

    def keep_drafting(self, k: int, top1: float, entropy: float) -> bool:
        self.calls.append(k)
        return k % self.period != 0

    def observe(self, drafted: int, accepted: int) -> None:
        pass


class SkipRuns(StopAfter):
    """Declines to speculate (before the draft) in runs: 3 plain steps, then drafting while
    the settled agreement EMA is high; γmax with a per-token stop every ``period``."""

    name = "skip-runs"

    def speculate(self, ctx: PreContext) -> bool:
        if ctx.position < 3:
            return False
        return probe_due(ctx.skipped, 2) or bool(ctx.features[1] >= 0.5)


class PlainAfterDraft(StopAfter):
    """Drafts once, then a plain step where the first proposal looks unsure."""

    name = "plain-after-draft"

    def choose(self, ctx) -> int:
        return PLAIN if ctx.features[1] < 0.5 else 3


POLICIES = {
    "fixed:1": lambda: FixedGamma(1),
    "fixed:3": lambda: FixedGamma(3),
    "fixed:8": lambda: FixedGamma(8),
    "heuristic": Heuristic,
    "confidence:0.3": lambda: ConfidenceStop(0.3),
    "stop-after:2": lambda: StopAfter(2),
    "skip-runs": lambda: SkipRuns(3),
    "plain-after-draft": lambda: PlainAfterDraft(3),
    "best_static:plain": lambda: BestStatic({"fp16": PLAIN}),
}


# ------------------------------------------------------------------------- losslessness
@pytest.mark.parametrize("draft_name", ["copy", "noisy", "random"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_greedy_output_equals_plain_greedy(target, drafts, draft_name, policy_name):
    ref = reference_greedy(target, PROMPT, 40)
    decoder = SpeculativeDecoder(drafts[draft_name], target, POLICIES[policy_name](),
                                 eos_token_ids=[])
    result = decoder.generate(PROMPT, 40)
    assert result.token_ids == ref
    assert greedy_invariant(target, PROMPT, result) == []
    assert result.stop == "length"
    assert sum(s["accept_len"] + 1 for s in result.steps) == 40
    if policy_name in ("skip-runs", "plain-after-draft", "best_static:plain"):
        assert any(not s["drafted"] for s in result.steps[:-1]), "the policy should skip"
    if draft_name == "copy" and policy_name == "fixed:8":
        assert [s["accept_len"] for s in result.steps] == [8, 8, 8, 8, 3]


def test_target_alone_equals_plain_greedy(target):
    result = SpeculativeDecoder(None, target, None, eos_token_ids=[]).generate(PROMPT, 30)
    assert result.token_ids == reference_greedy(target, PROMPT, 30)
    assert greedy_invariant(target, PROMPT, result) == []
    assert [s["gamma"] for s in result.steps] == [0] * 30
    assert result.mean_accepted == 0.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 9, 10, 17])
@pytest.mark.parametrize("draft_name", ["copy", "noisy"])
def test_max_new_tokens_is_exact_and_gamma_respects_it(target, drafts, draft_name,
                                                       max_new_tokens):
    decoder = SpeculativeDecoder(drafts[draft_name], target, FixedGamma(8), eos_token_ids=[])
    result = decoder.generate(PROMPT, max_new_tokens)
    assert result.token_ids == reference_greedy(target, PROMPT, max_new_tokens)
    for s in result.steps:
        left = max_new_tokens - s["position"]
        assert s["gamma"] == min(GAMMA_MAX, left - 1)  # 0: a plain target step, no drafting
        assert s["drafted"] == s["gamma"] and s["accept_len"] <= s["drafted"]


def test_prompt_of_one_token(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedGamma(3), eos_token_ids=[])
    assert decoder.generate([7], 12).token_ids == reference_greedy(target, [7], 12)


@pytest.mark.parametrize("draft_name", ["copy", "noisy", "random"])
def test_eos_ends_the_answer_even_inside_an_accepted_run(target, drafts, draft_name):
    ref = reference_greedy(target, PROMPT, 40)
    # an end token that first appears mid-answer (with the copy draft: inside a drafted run)
    pos = next(i for i in range(5, 40) if ref[i] not in ref[:i] and i % 9 != 8)
    eos = ref[pos]
    decoder = SpeculativeDecoder(drafts[draft_name], target, FixedGamma(8), eos_token_ids=[eos])
    result = decoder.generate(PROMPT, 40)
    assert result.token_ids == ref[: pos + 1]
    assert greedy_invariant(target, PROMPT, result) == []
    assert result.stop == "eos"
    assert all(r["seq_len"] == pos + 1 for r in result.steps)


def test_the_decoder_honours_a_plain_choice_before_the_draft(target, drafts):
    """BestStatic's plain choice: the target decodes alone and the draft never runs."""
    calls = []
    draft = drafts["noisy"]
    handle = draft.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = SpeculativeDecoder(draft, target, BestStatic({"fp16": PLAIN}),
                                    eos_token_ids=[]).generate(PROMPT, 20)
    finally:
        handle.remove()
    assert result.token_ids == reference_greedy(target, PROMPT, 20)
    assert [s["gamma"] for s in result.steps] == [0] * 20
    assert len(calls) == 1  # the prefill only
    assert all(s["t_draft_s"] == 0 for s in result.steps)


def test_the_catchup_forward_scores_every_skipped_token(target, drafts):
    """After a run of plain steps the next draft forward covers all of them at once."""
    seen = []
    decoder = SpeculativeDecoder(drafts["noisy"], target, SkipRuns(3), eos_token_ids=[])
    result = decoder.generate(PROMPT, 30, on_step=lambda v: seen.append(
        len(v.tokens) - v.draft_seen))
    first_draft = next(i for i, s in enumerate(result.steps) if s["drafted"])
    assert first_draft == 3 and seen[:3] == [2, 3, 4]  # three tokens behind, plus the last
    assert max(seen) <= 2 + 2  # the policy probes after two plain steps in a row


def test_default_eos_comes_from_the_model(target):
    decoder = SpeculativeDecoder(None, target, None)
    assert decoder.eos == frozenset({EOS})


# ------------------------------------------------------------ the exact greedy invariant
class ChunkSkewed(torch.nn.Module):
    """A target whose numerics depend on the chunk, as bfloat16, LLM.int8 and even float32
    ones do on a CPU, made large: a forward over more than one token swaps each row's top two
    logits when they lie within ``margin``. One-token decoding and speculative decoding then
    part at near-ties, and both stay lossless by the invariant."""

    def __init__(self, model, margin: float) -> None:
        super().__init__()
        self.model, self.margin = model, margin
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:
            logits = out.logits
            top = logits.topk(2, -1)
            swapped = logits.clone()
            swapped.scatter_(-1, top.indices[..., :1], top.values[..., 1:])
            swapped.scatter_(-1, top.indices[..., 1:], top.values[..., :1])
            close = (top.values[..., 0] - top.values[..., 1] < self.margin)[..., None]
            out.logits = torch.where(close, swapped, logits)
        return out


def test_the_forward_log_describes_every_target_forward(target, drafts):
    decoder = SpeculativeDecoder(drafts["copy"], target, FixedGamma(8), eos_token_ids=[])
    result = decoder.generate(PROMPT, 20)
    prefill, *verify = result.target_forwards
    assert prefill == TargetForward(0, tuple(PROMPT[:-1]), 1, 0)
    full = PROMPT + result.token_ids
    start = len(PROMPT) - 1
    for fwd, step in zip(verify, result.steps, strict=True):
        assert fwd.start == start and fwd.keep == len(fwd.ids) == step["drafted"] + 1
        assert fwd.emitted == step["accept_len"] + 1
        assert list(fwd.ids[: fwd.emitted]) == full[start : start + fwd.emitted]
        start += fwd.emitted
    assert start == len(full) - 1
    ar = SpeculativeDecoder(None, target, None, eos_token_ids=[]).generate(PROMPT, 5)
    assert ar.target_forwards[1:] == [TargetForward(len(PROMPT) - 1 + i, (tok,), 1, 1)
                                      for i, tok in enumerate([PROMPT[-1], *ar.token_ids[:-1]])]
    one = SpeculativeDecoder(None, target, None, eos_token_ids=[]).generate([7], 2)
    assert one.target_forwards == [TargetForward(0, (7,), 1, 1),
                                   TargetForward(1, (one.token_ids[0],), 1, 1)]


def test_the_invariant_catches_a_token_that_is_not_the_argmax(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedGamma(3), eos_token_ids=[])
    result = decoder.generate(PROMPT, 30)
    true = result.token_ids[7]
    result.token_ids[7] = (true + 1) % VOCAB
    found = greedy_invariant(target, PROMPT, result)
    assert found[0].position == 7 and found[0].argmax == true
    assert found[0].emitted == (true + 1) % VOCAB and "argmax" in found[0].reason
    # the later tokens were verified after the true token, not after the altered one
    assert all(v.position > 7 and "true prefix" in v.reason for v in found[1:])


def test_the_invariant_catches_an_inconsistent_log(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedGamma(3), eos_token_ids=[])
    result = decoder.generate(PROMPT, 20)
    log = result.target_forwards
    # a rollback that kept one token too many (a rejected drafted token stays in the cache)
    fwd = log[3]
    assert log[2].emitted < log[2].keep, "step 2 should have rejected a drafted token"
    result.target_forwards = [*log[:3], TargetForward(fwd.start + 1, fwd.ids, fwd.keep,
                                                      fwd.emitted), *log[4:]]
    found = greedy_invariant(target, PROMPT, result)
    skipped = fwd.start + 1 - len(PROMPT)  # the answer position the forward emitted
    assert found[0].position == skipped + 1 and "true prefix" in found[0].reason
    assert any(v.position == skipped and "no target forward" in v.reason for v in found)
    # a forward that starts past anything the cache could hold
    result.target_forwards = [*log[:3], TargetForward(fwd.start + 50, fwd.ids, fwd.keep,
                                                      fwd.emitted), *log[4:]]
    found = greedy_invariant(target, PROMPT, result)
    assert any("past what the cache holds" in v.reason for v in found)
    # a forward lost: the tokens it emitted were verified by no forward at all
    result.target_forwards = [*log[:3], *log[4:]]
    found = greedy_invariant(target, PROMPT, result)
    missing = [v.position for v in found if "no target forward" in v.reason]
    assert missing == list(range(log[3].start + 1 - len(PROMPT),
                                 log[3].start + 1 - len(PROMPT) + log[3].emitted))
    result.target_forwards = log
    assert greedy_invariant(target, PROMPT, result) == []


def test_the_invariant_is_for_greedy_results(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedGamma(3), eos_token_ids=[])
    result = decoder.generate(PROMPT, 8, temperature=0.8, seed=1)
    assert result.temperature == 0.8 and len(result.target_forwards) == len(result.steps) + 1
    with pytest.raises(DecodeError, match="greedy"):
        greedy_invariant(target, PROMPT, result)


def test_a_chunk_dependent_target_parts_from_one_token_decoding_and_stays_lossless(target,
                                                                                    drafts):
    """The real pairs' situation, exaggerated: the outputs differ, the invariant holds, and
    the difference is the target's own (one-token vs chunked forward), not the decoder's."""
    skewed = ChunkSkewed(target, margin=0.1)
    ar = SpeculativeDecoder(None, skewed, None, eos_token_ids=[]).generate(PROMPT, 30)
    assert ar.token_ids == reference_greedy(target, PROMPT, 30)  # one-token steps: unskewed
    parted = 0
    for name in ("copy", "noisy", "random"):
        result = SpeculativeDecoder(drafts[name], skewed, FixedGamma(3),
                                    eos_token_ids=[]).generate(PROMPT, 30)
        assert greedy_invariant(skewed, PROMPT, result) == []
        why = explain_difference(skewed, PROMPT, result, ar.token_ids)
        if why is None:
            continue
        parted += 1
        at = first_difference(ar.token_ids, result.token_ids)
        assert why.position == at
        assert (why.reference, why.emitted) == (ar.token_ids[at], result.token_ids[at])
        assert why.explained
        assert why.one_token_argmax == ar.token_ids[at]
        assert why.chunked_argmax == result.token_ids[at]
        assert 0 < why.one_token_gap < 0.1 and 0 < why.chunked_gap < 0.1
        # checked against another target (the unskewed one), the same output is not lossless
        assert greedy_invariant(target, PROMPT, result)
        assert not explain_difference(target, PROMPT, result, ar.token_ids).explained
    assert parted >= 2, "the skew should make most outputs part from one-token decoding"
    assert greedy_invariant(skewed, PROMPT, ar) == []
    assert explain_difference(skewed, PROMPT, ar, ar.token_ids) is None


# ---------------------------------------------------------------------------- KV caches
@pytest.mark.parametrize("policy_name", ["fixed:3", "fixed:8", "stop-after:2", "skip-runs",
                                         "plain-after-draft"])
@pytest.mark.parametrize("draft_name", ["copy", "noisy", "random"])
def test_caches_hold_exactly_the_emitted_prefix_after_every_step(target, drafts, draft_name,
                                                                 policy_name):
    draft = drafts[draft_name]
    views = []
    behind = 2 if policy_name != "skip-runs" else 2 + 3  # a bonus token, plus plain steps

    def check(view):
        n = len(view.tokens)
        assert view.target_cache.get_seq_length() == n - 1
        assert view.draft_cache.get_seq_length() == view.draft_seen
        assert 1 <= n - view.draft_seen <= behind
        # the cached keys are those of a fresh forward over the same prefix
        for model, cache, length in ((target, view.target_cache, n - 1),
                                     (draft, view.draft_cache, view.draft_seen)):
            fresh = model(input_ids=torch.tensor([view.tokens[:length]]), use_cache=True).cache
            for layer, fresh_layer in zip(cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(layer.keys, fresh_layer.keys)
                torch.testing.assert_close(layer.values, fresh_layer.values)
        views.append(n)

    decoder = SpeculativeDecoder(draft, target, POLICIES[policy_name](), eos_token_ids=[])
    with torch.inference_mode():
        result = decoder.generate(PROMPT, 30, on_step=check)
    assert len(views) == len(result.steps)


def test_per_token_stopping_is_consulted_after_each_drafted_token(target, drafts):
    policy = StopAfter(3)
    decoder = SpeculativeDecoder(drafts["copy"], target, policy, eos_token_ids=[])
    result = decoder.generate(PROMPT, 25)
    spec_steps = [s for s in result.steps if s["drafted"]]
    assert all(s["gamma"] == min(GAMMA_MAX, 25 - s["position"] - 1) for s in spec_steps)
    assert [s["drafted"] for s in spec_steps[:-1]] == [3] * (len(spec_steps) - 1)
    assert policy.calls[:3] == [1, 2, 3]


# -------------------------------------------------------------------- features / history
@pytest.mark.parametrize("policy_name", ["fixed:1", "fixed:3", "heuristic", "stop-after:2",
                                         "skip-runs", "plain-after-draft"])
def test_live_history_equals_the_trace_at_every_decision(target, drafts, policy_name):
    """Features at each live decision equal the trace's features at the same position."""
    from speckv.profile.profiler import trace_prompt

    draft = drafts["noisy"]
    n = 40
    tr = trace_prompt(draft, target, PROMPT, max_new_tokens=n, eos=None, pad=0)
    assert 0.2 < tr.agree.mean() < 0.95, "the noisy draft should agree often, not always"
    ema, run, prev = history_arrays(tr.agree, tr.target_top1)
    result = SpeculativeDecoder(draft, target, POLICIES[policy_name](),
                                eos_token_ids=[]).generate(PROMPT, n)
    assert result.token_ids == tr.answer.tolist()
    checked = 0
    for s in result.steps:
        if s["draft_entropy"] is None:  # no γ decision: the draft did not run
            continue
        i = s["position"]
        assert s["agree_ema"] == pytest.approx(ema[i], abs=1e-6)
        assert s["agree_run"] == run[i]
        assert s["target_top1_prev"] == pytest.approx(prev[i], abs=1e-6)
        assert s["draft_entropy"] == pytest.approx(tr.stats[i, 0], abs=1e-4)
        assert s["draft_top1"] == pytest.approx(tr.stats[i, 1], abs=1e-5)
        # the accepted length of a live step is the trace's, cut at what was drafted
        assert s["accept_len"] == min(int(tr.accept_len[i]), s["drafted"])
        checked += 1
    assert checked >= 10


def test_sampled_history_uses_the_drafts_greedy_token_on_the_true_prefix(target, drafts):
    """Under sampling, agreement is still "draft's argmax given the true prefix equals the
    emitted token" (not "the sampled draft token was accepted"); check it against
    teacher-forced forwards over the final answer."""
    draft = drafts["noisy"]
    n = 40
    result = SpeculativeDecoder(draft, target, FixedGamma(3), eos_token_ids=[]).generate(
        PROMPT, n, temperature=1.3, seed=5)
    answer = result.token_ids
    seq = torch.tensor([PROMPT + answer])
    with torch.inference_mode():
        d_logits = draft(input_ids=seq).logits[0, len(PROMPT) - 1 : -1]
        t_logits = target(input_ids=seq).logits[0, len(PROMPT) - 1 : -1]
    agree = (d_logits.argmax(-1) == torch.tensor(answer)).numpy()
    top1 = torch.softmax(t_logits, -1).gather(1, torch.tensor(answer)[:, None])[:, 0].numpy()
    assert 0 < agree.mean() < 1
    ema, run, prev = history_arrays(agree, top1)
    steps = [s for s in result.steps if s["drafted"]]
    # sampled draft tokens get rejected even where the draft's argmax agreed: the two rules
    # differ on this answer, so the test tells them apart
    assert any(s["accept_len"] < s["drafted"] and agree[s["position"] + s["accept_len"]]
               for s in steps)
    for s in steps:
        i = s["position"]
        assert s["agree_ema"] == pytest.approx(ema[i], abs=1e-6)
        assert s["agree_run"] == run[i]
        assert s["target_top1_prev"] == pytest.approx(prev[i], abs=1e-6)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_yields_the_target_distribution(k):
    gen = torch.Generator().manual_seed(0)
    vocab, n = 12, 20000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen, dtype=torch.float64) * 1.5, -1)
    firsts = np.zeros(vocab)
    drafts_first = np.zeros(vocab)
    accepted_all = 0
    for _ in range(n):
        drafted = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(k)]
        accepted, token, probs = verify_sampled(p, q, drafted, gen)
        first = drafted[0] if accepted >= 1 else token
        firsts[first] += 1
        drafts_first[drafted[0]] += 1
        accepted_all += accepted == k
        assert len(probs) == k and all(0 <= x <= 1 for x in probs)
    assert chi2_pvalue(firsts, p[0].numpy()) > 1e-3
    # the test has power: the draft's own distribution is told apart from the target's
    assert chi2_pvalue(drafts_first, p[0].numpy()) < 1e-6
    assert 0 < accepted_all < n


def test_sampling_bonus_token_after_full_acceptance_follows_the_target():
    """When q == p every token is accepted; the bonus token must still come from p[k]."""
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 6, generator=gen, dtype=torch.float64), -1)
    counts = np.zeros(6)
    for _ in range(6000):
        x = int(torch.multinomial(p[0], 1, generator=gen))
        accepted, token, _ = verify_sampled(p, p[:1], [x], gen)
        assert accepted == 1
        counts[token] += 1
    assert chi2_pvalue(counts, p[1].numpy()) > 1e-3


class SkipFirst(FixedGamma):
    """A plain step first (sampled from the target alone), then speculation."""

    def speculate(self, ctx) -> bool:
        return ctx.position > 0


@pytest.mark.parametrize("temperature, make_policy", [(0.9, lambda: FixedGamma(2)),
                                                      (0.9, lambda: SkipFirst(2))])
def test_speculative_sampling_preserves_the_joint_distribution_of_two_tokens(temperature,
                                                                            make_policy):
    """Sample (t1, t2) many times; compare with the target's exact joint distribution."""
    vocab, prompt, n = 8, [5], 1200
    target = tiny_llama(2, seed=0, vocab=vocab, hidden=16, init=0.2)
    draft = tiny_llama(1, seed=1, vocab=vocab, hidden=16, init=0.2)
    with torch.inference_mode():
        first = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1]
                              / temperature, -1)
        pairs = torch.tensor([[prompt[0], t] for t in range(vocab)])
        second = torch.softmax(target(input_ids=pairs).logits[:, -1] / temperature, -1)
    joint = (first[:, None] * second).numpy().ravel()
    decoder = SpeculativeDecoder(draft, target, make_policy(), eos_token_ids=[])
    counts = np.zeros(vocab * vocab)
    accepted = []
    for seed in range(n):
        result = decoder.generate(prompt, 3, temperature=temperature, seed=seed)
        t1, t2 = result.token_ids[:2]
        counts[t1 * vocab + t2] += 1
        accepted.append(next(s["accept_len"] for s in result.steps if s["drafted"]))
    assert set(accepted) >= {0, 1}, "the verification paths should be exercised"
    assert chi2_pvalue(counts, joint) > 1e-3
    # the same seed gives the same sample
    again = decoder.generate(prompt, 3, temperature=temperature, seed=3).token_ids
    assert again == decoder.generate(prompt, 3, temperature=temperature, seed=3).token_ids


def test_target_alone_sampling_follows_the_target():
    vocab, prompt, n = 8, [5], 1500
    target = tiny_llama(2, seed=0, vocab=vocab, hidden=16, init=0.2)
    with torch.inference_mode():
        p = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1] / 0.7, -1)
    decoder = SpeculativeDecoder(None, target, None, eos_token_ids=[])
    counts = np.zeros(vocab)
    for seed in range(n):
        counts[decoder.generate(prompt, 1, temperature=0.7, seed=seed).token_ids[0]] += 1
    assert chi2_pvalue(counts, p.numpy()) > 1e-3


# ------------------------------------------------------------------------------- records
def test_live_records_validate_and_round_trip(target, drafts, tmp_path):
    decoder = SpeculativeDecoder(drafts["noisy"], target, Heuristic(), eos_token_ids=[])
    greedy = decoder.generate(PROMPT, 20, task="code", prompt_id="p0")
    sampled = decoder.generate(PROMPT, 20, temperature=0.8, seed=3, task="math",
                               prompt_id="p1")
    steps = greedy.steps + sampled.steps
    df = records_frame(steps)
    assert (df["mode"] == "live").all() and not df["replayable"].any()
    assert (df["step"].to_numpy() == np.r_[np.arange(len(greedy.steps)),
                                           np.arange(len(sampled.steps))]).all()
    spec = df[df["drafted"] > 0]
    assert (spec["accept_cap"] == spec["drafted"]).all()
    assert (spec["draft_entropy_k"].map(len) == spec["drafted"]).all()
    assert df.loc[df["temperature"] > 0, "accept_prob_k"].dropna().map(len).gt(0).all()
    assert (df["t_step_s"] > 0).all()
    read = read_records(write_records(df, tmp_path / "live.parquet"))
    assert len(read) == len(df)
    # the profiler's path: a plain frame of the step dicts, identity columns overwritten
    plain = pd.DataFrame(greedy.steps)
    plain["run_id"] = "r"
    validate(plain)


# --------------------------------------------------------------------------------- costs
class CostRecorder:
    """A chooser that records the costs it is given and always answers γ = 2."""

    def __init__(self):
        self.seen = []

    def choose(self, features, costs):
        self.seen.append(np.asarray(costs))
        return 2


def test_measured_costs_round_trip_and_feed_the_policy(target, drafts, tmp_path):
    costs = measure_costs(drafts["noisy"], target, context_len=16, repeats=2, warmup=1)
    assert len(costs.cost_verify_s) == GAMMA_MAX + 1
    assert costs.cost_draft_s > 0 and min(costs.cost_verify_s) > 0
    assert costs.compute_dtype == "float64"
    again = CostModel.load(costs.save(tmp_path / "costs.json"))
    assert again == costs
    assert CostModel.from_json(json.dumps(costs.to_json())) == costs
    np.testing.assert_allclose(costs.step_costs(),
                               step_costs(costs.cost_draft_s, costs.cost_verify_s))
    with pytest.raises(Exception, match="9 values"):
        CostModel(0.01, [0.02] * 3, "fp16", "float32")

    chooser = CostRecorder()
    decoder = SpeculativeDecoder(drafts["noisy"], target, Learned(chooser), costs,
                                 eos_token_ids=[])
    result = decoder.generate(PROMPT, 12)
    assert result.token_ids == reference_greedy(target, PROMPT, 12)
    np.testing.assert_allclose(chooser.seen[0], costs.step_costs())
    assert result.steps[0]["cost_draft_s"] == costs.cost_draft_s


def test_catchup_costs_are_measured_and_priced(target, drafts, tmp_path):
    draft = drafts["noisy"]
    catchup = measure_catchup(draft, context_len=16, repeats=2, warmup=1)
    assert len(catchup) == CATCHUP_MAX and all(t > 0 for t in catchup)
    costs = measure_costs(draft, target, context_len=16, repeats=2, warmup=1)
    assert costs.cost_catchup_s is None
    measured = with_catchup(costs, draft, repeats=2, warmup=1)
    assert len(measured.cost_catchup_s) == CATCHUP_MAX and costs.cost_catchup_s is None
    assert CostModel.load(measured.save(tmp_path / "c.json")) == measured  # round trip

    chooser = CostRecorder()
    result = SpeculativeDecoder(draft, target, Learned(chooser), measured,
                                eos_token_ids=[]).generate(PROMPT, 12)
    from speckv.runtime.costs import drafting_costs

    first = drafting_costs(measured.cost_draft_s, measured.cost_verify_s,
                           measured.cost_catchup_s, 1)
    np.testing.assert_allclose(chooser.seen[0], first)
    np.testing.assert_allclose(result.steps[0]["cost_catchup_s"], measured.cost_catchup_s,
                               rtol=1e-6)


def test_steps_are_timed_by_part(target, drafts):
    result = SpeculativeDecoder(drafts["noisy"], target, SkipRuns(3),
                                eos_token_ids=[]).generate(PROMPT, 25)
    for s in result.steps:
        parts = s["t_draft_s"] + s["t_verify_s"] + s["t_decision_s"]
        assert s["t_verify_s"] > 0 and parts <= s["t_step_s"] + 1e-9
        assert (s["t_draft_s"] > 0) == bool(s["drafted"])
    assert any(s["t_decision_s"] > 0 for s in result.steps)


def test_token_statistics_are_computed_only_for_the_rules_that_read_them(target, drafts):
    fixed = SpeculativeDecoder(drafts["copy"], target, FixedGamma(4),
                               eos_token_ids=[]).generate(PROMPT, 20)
    step = next(s for s in fixed.steps if s["drafted"] == 4)
    assert np.isfinite(step["draft_top1_k"][0]) and np.isnan(step["draft_top1_k"][1:]).all()
    full = SpeculativeDecoder(drafts["copy"], target, FixedGamma(4), eos_token_ids=[],
                              record_token_stats=True).generate(PROMPT, 20)
    assert full.token_ids == fixed.token_ids
    step = next(s for s in full.steps if s["drafted"] == 4)
    assert np.isfinite(step["draft_top1_k"]).all() and np.isfinite(step["draft_entropy_k"]).all()
    confident = SpeculativeDecoder(drafts["copy"], target, ConfidenceStop(0.3),
                                   eos_token_ids=[]).generate(PROMPT, 20)
    step = next(s for s in confident.steps if s["drafted"] > 1)
    assert np.isfinite(step["draft_top1_k"]).all()


def test_learned_policy_without_costs_is_refused(target, drafts):
    with pytest.raises(DecodeError, match="costs"):
        SpeculativeDecoder(drafts["noisy"], target, Learned(FixedGamma(2)), None)


def test_bad_inputs_are_refused(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedGamma(2))
    with pytest.raises(DecodeError, match="empty"):
        decoder.generate([], 4)
    with pytest.raises(DecodeError, match="max_new_tokens"):
        decoder.generate(PROMPT, 0)
    with pytest.raises(DecodeError, match="draft"):
        SpeculativeDecoder(None, target, FixedGamma(2))


# ----------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, target, drafts):
    root = tmp_path_factory.mktemp("pair")
    return (save_with_tokenizer(drafts["noisy"], root / "draft"),
            save_with_tokenizer(target, root / "target"))


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from speckv.__main__ import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cli_json_is_lossless(capsys, saved_pair, tmp_path):
    draft_dir, target_dir = saved_pair
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"task": "code", "prompt": "w5 w17 w33"}\n'
                       '{"task": "chat", "prompt": "w9 w4 w4 w70"}\n')
    common = ["--prompts", str(prompts), "--target", str(target_dir), "--draft",
              str(draft_dir), "--dtype", "float64", "--max-new-tokens", "14", "--json"]
    code, out, _ = _cli(capsys, ["generate", *common, "--policy", "ar"])
    assert code == 0
    ar = json.loads(out)["outputs"]
    code, out, _ = _cli(capsys, ["generate", *common, "--policy", "fixed:3",
                                 "--records", str(tmp_path / "r.parquet")])
    assert code == 0
    spec = json.loads(out)
    assert [o["token_ids"] for o in spec["outputs"]] == [o["token_ids"] for o in ar]
    first = spec["outputs"][0]
    assert set(first) == {"prompt", "token_ids", "text", "steps", "mean_accepted",
                          "tokens_per_s"}
    assert first["prompt"] == "w5 w17 w33" and first["steps"] < 14
    assert first["text"] == " ".join(f"w{t}" for t in first["token_ids"] if t != EOS)
    assert len(read_records(tmp_path / "r.parquet")) == sum(o["steps"] for o in spec["outputs"])


def test_generate_cli_with_an_onnx_controller_measures_costs(capsys, saved_pair, tmp_path):

    controller = FIXTURES / "controller_tiny.onnx"
    draft_dir, target_dir = saved_pair
    common = ["--prompt", "w5 w17 w33", "--target", str(target_dir), "--draft", str(draft_dir),
              "--dtype", "float64", "--max-new-tokens", "40", "--json"]
    code, out, _ = _cli(capsys, ["generate", *common, "--policy", "ar"])
    assert code == 0
    ar = json.loads(out)["outputs"][0]["token_ids"]
    costs = tmp_path / "costs.json"
    code, out, _ = _cli(capsys, ["generate", *common, "--policy", f"onnx:{controller}",
                                 "--save-costs", str(costs), "--records",
                                 str(tmp_path / "r.parquet")])
    assert code == 0
    assert json.loads(out)["outputs"][0]["token_ids"] == ar
    measured = CostModel.load(costs)
    records = read_records(tmp_path / "r.parquet")
    assert records["cost_draft_s"].iloc[0] == pytest.approx(measured.cost_draft_s)
    # whether and how far to draft depend on the measured costs; the controller may decline
    # to speculate, but drafts at least every max_skip_run + 1 steps (a probe)
    # (a chain of γ, or, where the measured costs make one pay, a tree of the file's)
    spec = records[records["drafted"] > 0]
    chains = spec["tree_size"].isna()
    assert len(spec) and spec.loc[chains, "gamma"].between(1, GAMMA_MAX).all()
    assert spec.loc[~chains, "tree_size"].isin(TREE_SIZES).all()
    assert spec.loc[~chains, "gamma"].isna().all()
    plain = records[records["drafted"] == 0]
    assert (plain["gamma"] == 0).all() and plain["draft_entropy_k"].isna().all()
    # a cost file given on the command line is used as is, nothing is measured
    code, out, _ = _cli(capsys, ["generate", *common, "--policy", f"onnx:{controller}",
                                 "--costs", str(costs)])
    assert code == 0 and json.loads(out)["outputs"][0]["token_ids"] == ar


def test_generate_cli_streams_one_prompt(capsys, saved_pair):
    draft_dir, target_dir = saved_pair
    code, out, _ = _cli(capsys, ["generate", "--prompt", "w5 w17", "--target", str(target_dir),
                                 "--draft", str(draft_dir), "--dtype", "float64",
                                 "--policy", "heuristic", "--max-new-tokens", "6"])
    assert code == 0
    words = out.split()
    assert len(words) <= 6 and all(w.startswith("w") and int(w[1:]) < VOCAB for w in words)


def test_generate_cli_explains_a_missing_demo_draft(capsys, saved_pair, tmp_path, monkeypatch):
    import speckv.paths

    monkeypatch.setattr(speckv.paths, "DRAFT_DIR", tmp_path / "nowhere")
    _, target_dir = saved_pair
    code, _, err = _cli(capsys, ["generate", "--prompt", "w5", "--target", str(target_dir),
                                 "--dtype", "float64", "--policy", "fixed:2"])
    assert code == 2
    assert "speckv draft distill" in err and "--draft" in err


# ------------------------------------------------------------------------ real demo pair
@pytest.mark.slow
@pytest.mark.parametrize("compression,dtype", [("fp16", "float32"), ("fp16", "bfloat16"),
                                               ("int8", "float32"), ("nf4", "bfloat16")])
def test_real_pair_greedy_matches_the_target(compression, dtype):
    """The demo target with an untrained draft: greedy speculative decoding is lossless.

    Asserted exactly, on any CPU: every token of the speculative output (and of one-token
    decoding) is the argmax of the target's logits in the forward that verified it; and
    where the speculative output parts from one-token decoding, the target's own one-token
    forward gives the one-token token there while the chunked forward that verified the
    emitted token gives that one. Both are recomputed independently from fresh caches.

    Not asserted: that the two outputs are equal, not even for the unquantized float32
    target. That would need the target to give a position bit-identical logits alone and
    inside a chunk of tokens, and nothing on a CPU promises it: a one-token forward is a
    matrix-vector product and a chunk a matrix product, whose kernels block and reduce in an
    order chosen by shape and by instruction set (AVX2, AVX-512, AMX), so float32 logits can
    differ by a few ulps, and no bound on how close a tie the prompts hold would make that
    safe. bfloat16 (nf4 computes in it) differs by a bfloat16 step, and LLM.int8 picks its
    outlier columns per forward. An AVX2 machine parted at int8/float32 with a relative gap
    of 0.019, which a tolerance tuned on another CPU had called "not a near-tie".
    """
    from speckv.llm.load import load_draft_for, load_model
    from speckv.policies import from_spec
    from speckv.prompts import chat_ids, suites

    target = load_model("smollm2-135m-instruct", compression, dtype=dtype)
    draft = load_draft_for("untrained", target, "bfloat16")
    for prompt in suites(("code", "chat"), n=1):
        ids = chat_ids(target.tokenizer, prompt.text)
        ref = SpeculativeDecoder(None, target, None).generate(ids, 24)
        out = SpeculativeDecoder(draft, target, from_spec("fixed:4")).generate(ids, 24)
        assert any(f.keep > 1 for f in out.target_forwards), "verification forwards are chunks"
        for result in (ref, out):
            broken = greedy_invariant(target, ids, result)
            assert not broken, f"{prompt.prompt_id}: {'; '.join(map(str, broken))}"
        why = explain_difference(target, ids, out, ref.token_ids)
        if why is not None:
            assert why.explained, f"{prompt.prompt_id}: {why}"
