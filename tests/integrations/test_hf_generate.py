"""speckv's controller inside Hugging Face ``generate`` (speckv.integrations.transformers).

Greedy output must equal the target's own greedy ``generate`` exactly (tiny float64 models of
two families, where a chunked and a one-token forward cannot flip a tie: see
tests/decode/test_decode.py's ``reference_greedy``); sampled output must keep the target's
distribution; Hugging Face's own features (streamers, stopping criteria,
``return_dict_in_generate``) must keep working through the candidate-generator door; the
features at every decision must equal a trace's; measured costs are cached and validated.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from goodness import chi2_pvalue
from locations import FIXTURES
from tiny_models import EOS, noisy_copy, tiny_feature_draft, tiny_llama
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.candidate_generator import AssistedCandidateGenerator
from transformers.generation.streamers import BaseStreamer

from speckv.decode.costs import CostModel
from speckv.decode.decoder import SpeculativeDecoder
from speckv.integrations import transformers as hf
from speckv.integrations.transformers import (
    IntegrationError,
    SpeckvCandidateGenerator,
    generate_with_speckv,
    pair_costs,
    speckv_assisted,
    step_costs_of,
)
from speckv.policies import PLAIN, ConfidenceStop, FixedGamma, Heuristic, Learned
from speckv.runtime import Controller
from speckv.runtime.features import (
    GAMMA_MAX,
    GAMMAS,
    N_PRE_FEATURES,
    history_arrays,
    token_stats,
)

PROMPT = [1, 5, 17, 33, 8, 90]
N_NEW = 40
#: hand-made costs (seconds): a draft token at a fifth of a target step, verify grows slowly.
COSTS = CostModel(0.002, [0.010 + 0.0008 * g for g in range(GAMMA_MAX + 1)], "fp16", "float64")


def tiny_qwen2(layers: int, seed: int, vocab: int = 128, hidden: int = 32,
               dtype: torch.dtype = torch.float64, init: float = 0.5):
    """A random Qwen2 causal LM (full attention: no sliding window), seeded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=init, bos_token_id=1,
                         eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True,
                         use_sliding_window=False)
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    """(name, target, drafts): drafts from always agreeing (a copy) to rarely (random)."""
    build = BUILDERS[request.param]
    target = build(2, seed=0)
    return request.param, target, {
        "copy": noisy_copy(target, 0.0, seed=1),
        "noisy": noisy_copy(target, 0.08, seed=1),
        "random": build(1, seed=7),
    }


@pytest.fixture(scope="module")
def llama():
    target = tiny_llama(2, seed=0)
    return target, noisy_copy(target, 0.08, seed=1)


@pytest.fixture(scope="module")
def controller():
    return Controller.load(FIXTURES / "controller_tiny.onnx")


def ids_of(prompt=PROMPT) -> torch.Tensor:
    return torch.tensor([prompt])


def hf_greedy(target, n: int = N_NEW, prompt=PROMPT, **kwargs) -> torch.Tensor:
    """The target's own greedy ``generate`` (no assistant): the reference."""
    return target.generate(ids_of(prompt), max_new_tokens=n, do_sample=False, **kwargs)


POLICIES = {
    "fixed:1": lambda c: FixedGamma(1),
    "fixed:8": lambda c: FixedGamma(8),
    "heuristic": lambda c: Heuristic(),
    "confidence:0.3": lambda c: ConfidenceStop(0.3),
    "onnx": lambda c: c,  # the runtime Controller itself, with COSTS
}


# --------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("draft_name", ["copy", "noisy", "random"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_greedy_output_equals_the_targets_own_generate(family, controller, draft_name,
                                                       policy_name):
    _, target, drafts = family
    ref = hf_greedy(target, eos_token_id=None)
    trace = []
    out = generate_with_speckv(target, drafts[draft_name], POLICIES[policy_name](controller),
                               COSTS, ids_of(), max_new_tokens=N_NEW, do_sample=False,
                               eos_token_id=None, trace=trace)
    assert torch.equal(out, ref)
    assert sum(s.emitted for s in trace) == N_NEW
    assert all(s.accepted <= s.drafted <= (s.gamma or 0) <= GAMMA_MAX for s in trace)
    assert all(s.emitted == s.accepted + 1 for s in trace)
    if draft_name == "copy" and policy_name == "fixed:8":
        assert [s.accepted for s in trace] == [8, 8, 8, 8, 3]  # the last: 4 tokens were left
    if draft_name == "copy":
        assert all(s.accepted == s.drafted for s in trace)


@pytest.fixture(scope="module")
def feature_llama():
    """The llama target with a feature-conditioned assistant (speckv.llm.feature_draft)."""
    target = tiny_llama(2, seed=0)
    return target, tiny_feature_draft(target, extra=(PROMPT,))


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_a_feature_conditioned_assistant_keeps_the_targets_greedy_output(feature_llama,
                                                                        controller,
                                                                        policy_name):
    target, draft = feature_llama
    ref = hf_greedy(target, eos_token_id=None)
    trace = []
    out = generate_with_speckv(target, draft, POLICIES[policy_name](controller), COSTS,
                               ids_of(), max_new_tokens=N_NEW, do_sample=False,
                               eos_token_id=None, trace=trace)
    assert torch.equal(out, ref)
    assert sum(s.emitted for s in trace) == N_NEW
    assert trace[0].gamma is None  # Hugging Face runs the target over the prompt only then
    if policy_name != "fixed:1":  # chains read the assistant's own states, and hold
        assert any(s.accepted >= 2 for s in trace)


def test_the_steps_equal_speckvs_own_decoder(llama, controller):
    """Same policy, same pair: the same γ, drafted and accepted counts at every step as
    speckv's decoder (whose steps the replay tests hold to the traces)."""
    target, draft = llama
    for make in (lambda: FixedGamma(3), Heuristic, lambda: ConfidenceStop(0.3),
                 lambda: Learned(controller)):
        own = SpeculativeDecoder(draft, target, make(), COSTS, eos_token_ids=[]).generate(
            PROMPT, N_NEW)
        trace = []
        out = generate_with_speckv(target, draft, make(), COSTS, ids_of(), max_new_tokens=N_NEW,
                                   do_sample=False, eos_token_id=None, trace=trace)
        assert out[0, len(PROMPT):].tolist() == own.token_ids
        assert [(s.position, s.gamma or 0, s.drafted, s.accepted) for s in trace] == [
            (r["position"], r["gamma"], r["drafted"], r["accept_len"]) for r in own.steps]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 9])
def test_max_new_tokens_is_exact(llama, max_new_tokens):
    target, draft = llama
    trace = []
    out = generate_with_speckv(target, draft, FixedGamma(8), None, ids_of(),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=None, trace=trace)
    assert torch.equal(out, hf_greedy(target, max_new_tokens, eos_token_id=None))
    for s in trace:  # γ never drafts past the last token but one (it comes from the target)
        left = max_new_tokens - s.position
        assert s.gamma == (min(GAMMA_MAX, left - 1) or None)


@pytest.mark.parametrize("draft_name", ["copy", "noisy"])
def test_eos_ends_the_answer_even_inside_an_accepted_run(family, draft_name):
    _, target, drafts = family
    ref = hf_greedy(target, eos_token_id=None)[0, len(PROMPT):].tolist()
    pos = next(i for i in range(5, N_NEW) if ref[i] not in ref[:i] and i % 9 != 8)
    eos = ref[pos]
    trace = []
    out = generate_with_speckv(target, drafts[draft_name], FixedGamma(8), None, ids_of(),
                               max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                               trace=trace)
    assert out[0, len(PROMPT):].tolist() == ref[: pos + 1]
    assert torch.equal(out, hf_greedy(target, eos_token_id=eos))
    if draft_name == "copy":  # the end token was a drafted, accepted token
        assert trace[-1].drafted > trace[-1].emitted - 1 >= 0


# ------------------------------------------------------------------ γ = 0: no speculation
class SkipEvery:
    """γ = 0 (a plain target step) at every ``period``-th decision, else a fixed γ."""

    name = "skip-every"

    def __init__(self, period: int, gamma: int) -> None:
        self.period, self.gamma, self.calls, self.observed = period, gamma, 0, []

    def reset(self) -> None:
        self.calls, self.observed = 0, []

    def choose(self, ctx) -> int:
        self.calls += 1
        return PLAIN if self.calls % self.period == 1 else self.gamma

    def keep_drafting(self, k, top1, entropy) -> bool:
        return True

    def observe(self, drafted, accepted) -> None:
        self.observed.append((drafted, accepted))


def test_a_gamma_of_zero_is_a_plain_target_step(family):
    _, target, drafts = family
    policy = SkipEvery(2, 3)
    trace = []
    out = generate_with_speckv(target, drafts["noisy"], policy, None, ids_of(),
                               max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                               trace=trace)
    assert torch.equal(out, hf_greedy(target, eos_token_id=None))
    skipped = [s for s in trace if s.gamma == PLAIN]
    assert len(skipped) >= 5
    assert all(s.drafted == 0 and s.accepted == 0 and s.emitted == 1 for s in skipped)
    # observe() only hears of steps that drafted
    assert policy.observed == [(s.drafted, s.accepted) for s in trace if s.drafted]


class PreDraftChooser:
    """A chooser with a pre-draft head, as the runtime Controller has (``speculate(
    pre_features, costs, plain_cost)``): it declines three steps in four, so plain steps come
    in runs that ``Learned``'s probe cuts after ``max_skip_run``."""

    gammas = GAMMAS
    max_skip_run = 2

    def __init__(self) -> None:
        self.asked = []

    def speculate(self, pre_features, costs, plain_cost) -> bool:
        assert len(pre_features) == N_PRE_FEATURES and len(costs) == len(GAMMAS)
        assert 0 < plain_cost < costs[0]
        self.asked.append(float(pre_features[3]))  # the unsettled feature
        return len(self.asked) % 4 == 0

    def choose(self, features, costs) -> int:
        assert np.isfinite(costs).all() and len(costs) == len(GAMMAS)
        return 2


def test_a_decision_before_drafting_skips_the_draft_entirely(family):
    _, target, drafts = family
    draft = drafts["noisy"]
    forwards = []
    handle = draft.register_forward_hook(lambda m, args, kwargs, out: forwards.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    trace, chooser = [], PreDraftChooser()
    try:
        out = generate_with_speckv(target, draft, chooser, COSTS, ids_of(),
                                   max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                                   trace=trace)
    finally:
        handle.remove()
    assert torch.equal(out, hf_greedy(target, eos_token_id=None))
    plain = [s.gamma == PLAIN for s in trace]
    assert sum(plain) >= 8
    assert "".join("p" if x else "d" for x in plain).count("ppp") == 0, "max_skip_run = 2"
    assert all(s.features is None and s.drafted == 0 for s in trace if s.gamma == PLAIN)
    # the draft ran only in drafting steps: a catch-up forward, then one per further token
    drafting = [s for s in trace if s.drafted]
    assert len(forwards) == sum(s.drafted for s in drafting)
    # after plain steps, one catch-up forward covers every token the draft has not seen, and
    # the pre-draft features counted them as unsettled
    assert max(forwards[1:]) >= 3
    assert max(chooser.asked) >= 2 / 16


def test_the_policy_sees_each_pre_draft_context(llama):
    target, draft = llama
    seen, answers = [], []

    class Declining(FixedGamma):
        def speculate(self, ctx) -> bool:
            seen.append(ctx)
            answers.append(len(seen) % 4 == 0)
            return answers[-1]

    trace = []
    out = generate_with_speckv(target, draft, Declining(2), COSTS, ids_of(), max_new_tokens=N_NEW,
                               do_sample=False, eos_token_id=None, trace=trace)
    assert torch.equal(out, hf_greedy(target, eos_token_id=None))
    decided = [s for s in trace if s.gamma is not None]
    assert [c.position for c in seen] == [s.position for s in decided]
    assert [s.gamma == PLAIN for s in decided] == [not a for a in answers]
    costs = step_costs_of(COSTS)
    skipped = 0
    for ctx, answer in zip(seen, answers, strict=True):
        assert ctx.compression == "fp16" and ctx.features.shape == (N_PRE_FEATURES,)
        assert ctx.plain_cost == pytest.approx(COSTS.cost_verify_s[0])
        np.testing.assert_allclose(ctx.costs, costs.drafting(ctx.unseen))
        assert ctx.skipped == skipped
        skipped = 0 if answer else skipped + 1
    assert max(c.unseen for c in seen) >= 4, "the draft falls behind over plain steps"


# ------------------------------------------------------------- features = a trace's
def _teacher_forced(target, draft, answer: list[int], temperature: float = 1.0):
    """Agreement, the target's probability of each answer token (at ``temperature``) and the
    draft's statistics at each answer position, from one forward over the final answer."""
    seq = torch.tensor([PROMPT + answer])
    with torch.inference_mode():
        d_logits = draft(input_ids=seq).logits[0, len(PROMPT) - 1 : -1]
        t_logits = target(input_ids=seq).logits[0, len(PROMPT) - 1 : -1]
    agree = (d_logits.argmax(-1) == torch.tensor(answer)).numpy()
    top1 = torch.softmax(t_logits / temperature, -1).gather(
        1, torch.tensor(answer)[:, None])[:, 0].numpy()
    return agree, top1, token_stats(d_logits.numpy())


@pytest.mark.parametrize("policy", ["fixed:1", "fixed:3", "heuristic", "skip", "pre-draft",
                                    "sampled"])
def test_features_at_every_decision_equal_the_trace(llama, policy):
    target, draft = llama
    make = {"fixed:1": lambda: FixedGamma(1), "fixed:3": lambda: FixedGamma(3),
            "heuristic": Heuristic, "skip": lambda: SkipEvery(3, 2),
            "pre-draft": lambda: Learned(PreDraftChooser()),
            "sampled": lambda: FixedGamma(3)}[policy]
    kwargs, temperature = {"do_sample": False}, 1.0
    if policy == "sampled":  # agreement stays "the draft's argmax", not "accepted"
        torch.manual_seed(5)
        temperature = 1.3
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": None}
    trace = []
    out = generate_with_speckv(target, draft, make(), COSTS, ids_of(), max_new_tokens=N_NEW,
                               eos_token_id=None, trace=trace, **kwargs)
    answer = out[0, len(PROMPT):].tolist()
    # under sampling the target's probabilities are those Hugging Face verifies with (after
    # its logits processors: here the temperature)
    agree, top1, dstats = _teacher_forced(target, draft, answer, temperature)
    assert 0 < agree.mean() < 1
    ema, run, prev = history_arrays(agree, top1)
    checked = 0
    for s in trace:
        if s.features is None:
            continue
        i = s.position
        f = s.features
        np.testing.assert_allclose(f[:3], dstats[i], rtol=1e-4, atol=1e-5)
        assert f[3] == pytest.approx(prev[i], abs=1e-6)
        assert f[4] == pytest.approx(ema[i], abs=1e-6)
        assert f[5] == pytest.approx(min(run[i], 16) / 16, abs=1e-6)
        assert f[6] == pytest.approx(np.log1p(i), abs=1e-6)
        assert f[7:].tolist() == [1.0, 0.0, 0.0]
        checked += 1
    assert checked >= 8


# --------------------------------------------------- Hugging Face's features, kept working
class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_a_streamer_sees_every_step_and_the_end(family):
    _, target, drafts = family
    streamer, trace = Recorder(), []
    out = generate_with_speckv(target, drafts["noisy"], Heuristic(), None, ids_of(),
                               max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                               streamer=streamer, trace=trace)
    assert streamer.ended == 1
    assert streamer.puts[0] == PROMPT
    assert [len(p) for p in streamer.puts[1:]] == [s.emitted for s in trace]
    assert [t for p in streamer.puts[1:] for t in p] == out[0, len(PROMPT):].tolist()


class StopAtToken(StoppingCriteria):
    def __init__(self, token: int, n_prompt: int) -> None:
        self.token, self.n_prompt, self.calls = token, n_prompt, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return (input_ids[:, self.n_prompt:] == self.token).any(-1)


def test_stopping_criteria_end_generation(family):
    _, target, drafts = family
    ref = hf_greedy(target, eos_token_id=None)[0, len(PROMPT):].tolist()
    token = ref[12]
    first = ref.index(token)
    criterion, trace = StopAtToken(token, len(PROMPT)), []
    out = generate_with_speckv(target, drafts["copy"], FixedGamma(4), None, ids_of(),
                               max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                               stopping_criteria=StoppingCriteriaList([criterion]),
                               trace=trace)
    new = out[0, len(PROMPT):].tolist()
    assert new == ref[: len(new)], "stopped early, on the target's own greedy path"
    # it stops at the end of the step that produced the token, as assisted generation does
    assert len(new) - trace[-1].emitted <= first < len(new)
    assert criterion.calls == len(trace)


def test_return_dict_in_generate_with_scores_logits_and_hidden_states(family):
    _, target, drafts = family
    ref = hf_greedy(target, eos_token_id=None)
    out = generate_with_speckv(target, drafts["noisy"], FixedGamma(3), None, ids_of(),
                               max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                               return_dict_in_generate=True, output_scores=True,
                               output_logits=True, output_hidden_states=True)
    assert torch.equal(out.sequences, ref)
    new = out.sequences[0, len(PROMPT):]
    assert len(out.scores) == len(out.logits) == N_NEW
    assert torch.equal(torch.stack([s[0].argmax() for s in out.scores]), new)
    assert torch.equal(torch.stack([x[0].argmax() for x in out.logits]), new)
    assert out.hidden_states is not None and len(out.hidden_states) > 0
    assert out.cache is not None and out.cache.get_seq_length() == len(PROMPT) + N_NEW - 1


# ------------------------------------------------------------------------------ sampling
def _joint(model, prompt: list[int], vocab: int, temperature: float) -> np.ndarray:
    """The model's exact distribution of its next two tokens at ``temperature``."""
    with torch.inference_mode():
        first = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1]
                              / temperature, -1)
        pairs = torch.tensor([[*prompt, t] for t in range(vocab)])
        second = torch.softmax(model(input_ids=pairs).logits[:, -1] / temperature, -1)
    return (first[:, None] * second).numpy().ravel()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sampling_keeps_the_targets_joint_distribution_of_two_tokens(name):
    """Sample (t1, t2) many times, seeded (so the test is deterministic); compare with the
    target's exact joint distribution, and show the test would catch the draft's."""
    vocab, prompt, n, temperature = 8, [5], 1000, 0.9
    build = BUILDERS[name]
    target = build(2, seed=0, vocab=vocab, hidden=16, init=0.2)
    draft = build(1, seed=1, vocab=vocab, hidden=16, init=0.2)
    counts = np.zeros(vocab * vocab)
    accepted = []
    for seed in range(n):
        torch.manual_seed(seed)
        trace = []
        out = generate_with_speckv(target, draft, FixedGamma(2), None, ids_of(prompt),
                                   max_new_tokens=3, do_sample=True, temperature=temperature,
                                   top_k=None, eos_token_id=None, trace=trace)
        t1, t2 = out[0, 1:3].tolist()
        counts[t1 * vocab + t2] += 1
        accepted.append(trace[0].accepted)
    assert set(accepted) == {0, 1, 2}, "every verification path should be exercised"
    assert chi2_pvalue(counts, _joint(target, prompt, vocab, temperature)) > 1e-3
    assert chi2_pvalue(counts, _joint(draft, prompt, vocab, temperature)) < 1e-6


# --------------------------------------------------------------------------------- costs
def test_costs_are_measured_once_cached_and_validated(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    target, draft = llama
    calls = []

    def measure(d, t, **kwargs):
        from speckv.decode.costs import measure_costs

        calls.append(kwargs)
        return measure_costs(d, t, context_len=16, repeats=2, warmup=1, **kwargs)

    first = pair_costs(target, draft, measure=measure)
    files = list((tmp_path / hf.COST_CACHE_DIR).glob("*.json"))
    assert len(calls) == 1 and len(files) == 1
    assert calls[0]["compression"] == "fp16"
    again = pair_costs(target, draft, measure=measure)
    assert len(calls) == 1 and again.to_json() == first.to_json()
    stored = json.loads(files[0].read_text())
    assert stored["identity"]["target"]["class"] == "LlamaForCausalLM"
    assert len(first.cost_catchup_s) >= 2, "the catch-up forwards are measured too"
    assert stored["machine"]["threads"] == torch.get_num_threads()
    # another assistant (same config, other weights) is another pair
    pair_costs(target, noisy_copy(target, 0.2, seed=3), measure=measure)
    assert len(calls) == 2 and len(list(files[0].parent.glob("*.json"))) == 2
    # a file whose machine no longer matches is measured again and replaced
    stored["machine"]["cpu"] = "another CPU"
    files[0].write_text(json.dumps(stored))
    pair_costs(target, draft, measure=measure)
    assert len(calls) == 3
    assert json.loads(files[0].read_text())["machine"]["cpu"] != "another CPU"
    # so is a damaged file, and refresh=True measures regardless
    files[0].write_text("{not json")
    pair_costs(target, draft, measure=measure)
    pair_costs(target, draft, measure=measure, refresh=True)
    assert len(calls) == 5


def test_a_controller_path_without_costs_measures_the_pair_once(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    target, draft = llama
    small = {"context_len": 16, "repeats": 2, "warmup": 1}
    ref = hf_greedy(target, eos_token_id=None)
    for _ in range(2):
        trace = []
        out = generate_with_speckv(target, draft, str(FIXTURES / "controller_tiny.onnx"), None,
                                   ids_of(), max_new_tokens=N_NEW, do_sample=False,
                                   eos_token_id=None, trace=trace, measure_kwargs=small)
        assert torch.equal(out, ref)
        assert all(0 <= s.gamma <= GAMMA_MAX for s in trace if s.gamma is not None)
    assert len(list((tmp_path / hf.COST_CACHE_DIR).glob("*.json"))) == 1


# ---------------------------------------------------------------------------- the hook
def test_the_hook_is_scoped_to_the_block_the_instance_and_the_thread(llama):
    target, draft = llama
    built = []
    original = SpeckvCandidateGenerator.__init__

    def spy(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    ref = hf_greedy(target, eos_token_id=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpeckvCandidateGenerator, "__init__", spy)
        with speckv_assisted(target, FixedGamma(2)) as policy:
            assert isinstance(policy, FixedGamma)
            assert "_get_candidate_generator" in vars(target)
            with speckv_assisted(target, FixedGamma(5)):  # nested: the inner block wins
                out = target.generate(ids_of(), assistant_model=draft, max_new_tokens=N_NEW,
                                      do_sample=False, eos_token_id=None)
                assert torch.equal(out, ref)
            seen = []
            thread = threading.Thread(target=lambda: seen.append(hf._active(target)))
            thread.start()
            thread.join()
            assert seen == [None], "another thread keeps Hugging Face's own generator"
            assert hf._active(draft) is None
        assert built == ["SpeckvCandidateGenerator"]
    assert "_get_candidate_generator" not in vars(target)
    # outside, Hugging Face's own assisted generation runs as before
    generators = []
    original_hf = AssistedCandidateGenerator.__init__

    def spy_hf(self, *args, **kwargs):
        generators.append(type(self).__name__)
        original_hf(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AssistedCandidateGenerator, "__init__", spy_hf)
        out = target.generate(ids_of(), assistant_model=draft, max_new_tokens=N_NEW,
                              do_sample=False, eos_token_id=None)
    assert generators == ["AssistedCandidateGenerator"] and torch.equal(out, ref)


def test_the_hook_is_removed_when_generate_fails(llama):
    target, draft = llama
    with pytest.raises(IntegrationError, match="batch"):
        generate_with_speckv(target, draft, FixedGamma(2), None, torch.tensor([PROMPT, PROMPT]),
                             max_new_tokens=4)
    with pytest.raises(ValueError), speckv_assisted(target, FixedGamma(2)):
        raise ValueError("boom")
    assert "_get_candidate_generator" not in vars(target)


def test_bad_inputs_are_refused_with_what_to_do(llama):
    target, draft = llama
    with pytest.raises(IntegrationError, match="controller must be"):
        generate_with_speckv(target, draft, 42, None, ids_of(), max_new_tokens=4)
    with pytest.raises(IntegrationError, match="max_gamma"):
        generate_with_speckv(target, draft, FixedGamma(2), None, ids_of(), max_new_tokens=4,
                             max_gamma=9)
    with pytest.raises(IntegrationError, match="padding"):
        generate_with_speckv(target, draft, FixedGamma(2), None, torch.tensor([[0, *PROMPT]]),
                             attention_mask=torch.tensor([[0] + [1] * len(PROMPT)]),
                             max_new_tokens=4)
    with pytest.raises(IntegrationError, match="assistant_model"), \
            speckv_assisted(target, FixedGamma(2)):
        hf._active(target).build(generation_config=None, input_ids=ids_of(),
                                 logits_processor=None, model_kwargs={})
    with pytest.raises(IntegrationError, match="vocabulary"), \
            speckv_assisted(target, FixedGamma(2)):
        hf._active(target).build(generation_config=None, input_ids=ids_of(),
                                 logits_processor=None, model_kwargs={}, assistant_model=draft,
                                 target_tokenizer=object(), assistant_tokenizer=object())
    with pytest.raises(Exception, match="does not exist"):
        generate_with_speckv(target, draft, "nowhere.onnx", None, ids_of(), max_new_tokens=4)


def test_compression_and_step_costs():
    target = tiny_llama(1, seed=0)
    assert hf.detect_compression(target) == "fp16"

    class Loaded:
        compression, model = "nf4", target

    assert hf.detect_compression(Loaded()) == "nf4"
    target.is_loaded_in_8bit = True
    assert hf.detect_compression(target) == "int8"
    # without a measured catch-up table, a step after one unseen token costs the v1 formula
    np.testing.assert_allclose(step_costs_of(COSTS).drafting(1), COSTS.step_costs(), rtol=1e-6)
    assert step_costs_of(None) is None


# ----------------------------------------------- the candidate-generator contract, per version
def _attributes_the_loop_reads() -> set[str]:
    """Every ``candidate_generator.NAME`` the installed transformers' generation code reads.

    transformers 5.25 began to ask for ``num_drafting_tokens`` before the first step (an
    AttributeError on every assisted call); a new name in a later release fails here, by name,
    before a user meets it (``make test-latest``).
    """
    import inspect
    import re

    from transformers.generation import utils

    source = inspect.getsource(utils)
    return set(re.findall(r"candidate_generator\.([A-Za-z_]\w*)", source))


def test_the_generator_answers_everything_the_installed_assisted_loop_asks():
    import transformers

    draft, target = tiny_llama(1, seed=1), tiny_llama(2, seed=0)
    config = target.generation_config
    config.max_length = 64
    gen = SpeckvCandidateGenerator(
        draft, FixedGamma(3), None, generation_config=config, logits_processor=None,
        compression="fp16", vocab_size=target.config.vocab_size)
    asked = _attributes_the_loop_reads()
    assert {"get_candidates", "update_candidate_strategy"} <= asked  # the parse still works
    # names read only behind a guard this generator does not pass: Hugging Face's own
    # heuristic schedule (an isinstance check on its AssistedCandidateGenerator), and the
    # target's outputs handed to generators that ask for them
    assert not gen.requires_model_outputs and not isinstance(gen, AssistedCandidateGenerator)
    guarded = {"assistant_model", "num_assistant_tokens", "model_kwargs_overrides"}
    missing = sorted(n for n in asked - guarded if not hasattr(gen, n))
    assert not missing, (f"transformers {transformers.__version__}'s assisted loop reads "
                         f"{missing} of a candidate generator; SpeckvCandidateGenerator lacks it")
    assert gen.num_drafting_tokens == GAMMA_MAX  # the most one step drafts
