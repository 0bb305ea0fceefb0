"""Policies: spec parsing, each rule's schedule, the oracle, and the learned controller."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from speckv.errors import SpeckvError
from speckv.policies import (
    PLAIN,
    BestFixed,
    BestStatic,
    ConfidenceStop,
    EmaRule,
    EntropyStop,
    FixedGamma,
    Heuristic,
    Learned,
    Oracle,
    Plain,
    PolicyError,
    PreContext,
    StepContext,
    from_spec,
    probe_due,
)
from speckv.runtime.costs import step_costs
from speckv.runtime.features import (
    FEATURE_NAMES,
    GAMMA_MAX,
    GAMMAS,
    MAX_SKIP_RUN,
    N_FEATURES,
    N_PRE_FEATURES,
)
from speckv.runtime.proposal import LOOKUP_CODE, tree_code
from speckv.train.chooser import TorchChooser

COSTS = step_costs(1.0, [10.0 + g for g in range(GAMMA_MAX + 1)])  # a step drafting g: 10 + 2g


def ctx(max_gamma: int = GAMMA_MAX, accept: int | None = None, compression: str = "fp16",
        costs: np.ndarray = COSTS) -> StepContext:
    return StepContext(np.zeros(N_FEATURES, np.float32), compression, 0, max_gamma, costs,
                       oracle_accept_len=accept)


def pre_ctx(plain_cost: float = 10.0, skipped: int = 0, accept: int | None = None,
            compression: str = "fp16", max_gamma: int = GAMMA_MAX) -> PreContext:
    return PreContext(np.zeros(N_PRE_FEATURES, np.float32), compression, 0, max_gamma, COSTS,
                      plain_cost, skipped + 1, skipped, oracle_accept_len=accept)


def test_policies_module_stays_torch_and_pandas_free():
    code = ("import sys, speckv.policies; bad = {'torch', 'pandas'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("spec", "kind", "name"), [
    ("fixed:3", FixedGamma, "fixed:3"),
    ("heuristic", Heuristic, "heuristic"),
    ("confidence:0.4", ConfidenceStop, "confidence:0.4"),
    ("confidence", ConfidenceStop, "confidence:0.4"),
    ("entropy:1.5", EntropyStop, "entropy:1.5"),
    ("entropy", EntropyStop, "entropy:2"),
    ("ema", EmaRule, "ema"),
    ("oracle", Oracle, "oracle"),
    (" Fixed:8 ", FixedGamma, "fixed:8"),
])
def test_from_spec_builds_each_policy(spec, kind, name):
    policy = from_spec(spec)
    assert isinstance(policy, kind)
    assert policy.name == name


def test_from_spec_ar_means_no_speculation():
    assert from_spec("ar") is None


@pytest.mark.parametrize("spec", ["fixed", "fixed:0", "fixed:9", "fixed:x", "fixed:2.5",
                                  "confidence:abc", "confidence:1.5", "entropy:-1",
                                  "heuristic:3", "ar:1", "bogus", "", "onnx:", "ckpt:"])
def test_from_spec_rejects_bad_specs_clearly(spec):
    with pytest.raises(PolicyError, match=r"^Policy ") as info:
        from_spec(spec)
    assert isinstance(info.value, SpeckvError)
    assert repr(spec) in str(info.value)


def test_from_spec_missing_files_are_speckv_errors(tmp_path):
    with pytest.raises(SpeckvError, match="does not exist"):
        from_spec(f"onnx:{tmp_path / 'none.onnx'}")
    with pytest.raises(SpeckvError):
        from_spec(f"ckpt:{tmp_path / 'none.ckpt'}")


def test_fixed_gamma_is_a_policy_error_subclass_of_value_error():
    with pytest.raises(ValueError):
        FixedGamma(0)
    assert FixedGamma(5).choose(ctx()) == 5


def test_heuristic_grows_by_two_and_shrinks_by_one_within_bounds():
    h = Heuristic()
    seen = []
    for drafted, accepted in [(4, 4), (6, 6), (8, 8), (8, 3), (7, 0), (6, 6), (8, 0)]:
        seen.append(h.choose(ctx()))
        h.observe(drafted, accepted)
    seen.append(h.choose(ctx()))
    assert seen == [4, 6, 8, 8, 7, 6, 8, 7]
    for _ in range(10):
        h.observe(5, 0)
    assert h.choose(ctx()) == 1  # floor
    h.reset()
    assert h.choose(ctx()) == 4


def test_confidence_stop_keeps_the_low_confidence_token_and_stops_after_it():
    pol = ConfidenceStop(0.4)
    assert pol.choose(ctx()) == GAMMA_MAX
    assert pol.keep_drafting(1, 0.41, 9.0)
    assert pol.keep_drafting(2, 0.40, 9.0)  # not below the threshold
    assert not pol.keep_drafting(3, 0.39, 0.1)


def test_entropy_stop_uses_entropy_only():
    pol = EntropyStop()
    assert pol.threshold == 2.0
    assert pol.keep_drafting(1, 0.01, 2.0)
    assert not pol.keep_drafting(1, 0.99, 2.01)


def test_ema_rule_follows_accepted_lengths():
    pol = EmaRule(rate=0.5, start=3.0)
    seen = []
    for accepted in [5, 7, 0, 0, 0]:
        seen.append(pol.choose(ctx()))
        pol.observe(8, accepted)
    seen.append(pol.choose(ctx()))
    # ema: 3 -> 4 -> 5.5 -> 2.75 -> 1.375 -> 0.6875 ; γ = floor(ema + .5) + 1, within 1..8
    assert seen == [4, 5, 7, 4, 2, 2]
    pol.reset()
    assert pol.choose(ctx()) == 4


def test_oracle_picks_the_best_ratio_and_respects_max_gamma():
    oracle = Oracle()
    # cost(γ) = 10 + 2γ: tokens per second rises with γ up to L, then falls
    assert oracle.choose(ctx(accept=3)) == 3
    assert oracle.choose(ctx(accept=0)) == 1
    assert oracle.choose(ctx(max_gamma=2, accept=6)) == 2
    steep = step_costs(10.0, [1.0] * (GAMMA_MAX + 1))  # drafting dominates: cost 1 + 10γ
    assert oracle.choose(ctx(accept=5, costs=steep)) == 1  # 2/11 > 3/21 > ...


def test_oracle_breaks_ties_to_the_smaller_gamma():
    flat = np.full(GAMMA_MAX, 1.0, np.float32)
    assert Oracle().choose(ctx(accept=2, costs=flat)) == 2  # γ >= 2 all give 3 tokens
    assert Oracle("tokens_per_step").choose(ctx(accept=5)) == 5
    assert Oracle("tokens_per_step").choose(ctx(accept=0)) == 1


def test_oracle_refuses_to_run_live():
    with pytest.raises(PolicyError, match="replay"):
        Oracle().choose(ctx(accept=None))
    with pytest.raises(PolicyError, match="replay"):
        Oracle().speculate(pre_ctx(accept=None))


def test_oracle_takes_a_plain_step_where_no_draft_pays():
    # L=0: every γ makes one token at 12 s or more, a plain step makes it at 10 s
    assert not Oracle().speculate(pre_ctx(accept=0))
    # L=1: γ=1 makes two tokens in 12 s (1/6 per s) against 1/10 per s
    assert Oracle().speculate(pre_ctx(accept=1))
    # a tie goes to the plain step; per step, a plain step ties a failed draft
    assert not Oracle().speculate(pre_ctx(accept=1, plain_cost=6.0))
    assert not Oracle("tokens_per_step").speculate(pre_ctx(accept=0))
    assert Oracle("tokens_per_step").speculate(pre_ctx(accept=1))


def test_the_rules_always_speculate_and_ask_only_for_the_statistics_they_read():
    for policy, stats in ((FixedGamma(2), set()), (Heuristic(), set()), (EmaRule(), set()),
                          (ConfidenceStop(), {"top1"}), (EntropyStop(), {"entropy"})):
        assert policy.speculate(pre_ctx())
        assert set(policy.token_stats) == stats, policy.name


def test_probe_after_max_skip_run_plain_steps():
    assert not probe_due(MAX_SKIP_RUN - 1) and probe_due(MAX_SKIP_RUN)





class RecordingChooser:
    def __init__(self, gamma: int) -> None:
        self.gamma, self.costs = gamma, []

    def choose(self, features: np.ndarray, costs: np.ndarray) -> int:
        assert features.shape == (N_FEATURES,)
        self.costs.append(np.array(costs))
        return self.gamma


def test_learned_passes_costs_or_ones_by_objective():
    chooser = RecordingChooser(3)
    assert Learned(chooser).choose(ctx()) == 3
    np.testing.assert_allclose(chooser.costs[-1], COSTS)
    Learned(chooser, objective="tokens_per_step").choose(ctx())
    np.testing.assert_allclose(chooser.costs[-1], np.ones(len(GAMMAS)))
    batch = Learned(chooser).choose_batch(np.zeros((4, N_FEATURES), np.float32),
                                          np.tile(COSTS, (4, 1)))
    assert batch.tolist() == [3, 3, 3, 3]
    with pytest.raises(PolicyError):
        Learned(chooser, objective="latency")
    with pytest.raises(PolicyError):
        Learned(object())


class SkippingChooser(RecordingChooser):
    """A chooser whose pre-draft head never speculates."""

    max_skip_run = 3

    def __init__(self) -> None:
        super().__init__(2)
        self.plain: list[float] = []

    def speculate(self, pre_features, costs, plain_cost) -> bool:
        assert pre_features.shape == (N_PRE_FEATURES,)
        self.costs.append(np.array(costs))
        self.plain.append(plain_cost)
        return False

    def speculate_batch(self, pre_features, costs, plain_cost):
        return np.zeros(len(pre_features), bool)


def test_learned_declines_to_speculate_until_a_probe_is_due():
    chooser = SkippingChooser()
    policy = Learned(chooser)
    assert policy.max_skip_run == 3
    assert [policy.speculate(pre_ctx(skipped=k)) for k in range(5)] == [False] * 3 + [True] * 2
    assert chooser.plain == [10.0] * 3  # a probe does not ask the chooser
    np.testing.assert_allclose(chooser.costs[-1], COSTS)
    Learned(chooser, objective="tokens_per_step").speculate(pre_ctx())
    assert chooser.plain[-1] == 1.0
    np.testing.assert_allclose(chooser.costs[-1], np.ones(len(GAMMAS)))
    rows = policy.speculate_batch(np.zeros((4, N_PRE_FEATURES)), np.tile(COSTS, (4, 1)),
                                  np.full(4, 10.0))
    assert rows.tolist() == [False] * 4
    # a chooser without a pre-draft head always speculates
    assert Learned(RecordingChooser(2)).speculate(pre_ctx())
    assert not hasattr(Learned(RecordingChooser(2)), "speculate_batch")


def _constant_mlp(bias: float, n_features: int = N_FEATURES):
    """A SurvivalMLP whose continuation logits are ``bias`` whatever the input."""
    import torch

    from speckv.train.network import SurvivalMLP

    mlp = SurvivalMLP(n_features, GAMMA_MAX, hidden=(4,))
    with torch.no_grad():
        for p in mlp.parameters():
            p.zero_()
        mlp.net[-1].bias.fill_(bias)
    return mlp.eval()


def test_learned_with_a_torch_survival_mlp():
    pytest.importorskip("torch")
    from speckv.train.network import ControllerGraph

    sure = TorchChooser(ControllerGraph(_constant_mlp(8.0), GAMMAS,  # s_k ≈ 1
                                        _constant_mlp(8.0, N_PRE_FEATURES)))
    hopeless = TorchChooser(ControllerGraph(_constant_mlp(-8.0), GAMMAS,  # s_k ≈ 0
                                            _constant_mlp(-8.0, N_PRE_FEATURES)))
    # every draft survives: E[tokens] = 1 + γ; per second (10 + 2γ) the longest γ still wins
    assert Learned(sure).choose(ctx()) == 8
    assert Learned(sure, objective="tokens_per_step").choose(ctx()) == 8
    # nothing survives: E[tokens] ≈ 1 for every γ, the cheapest step (γ=1) wins
    assert Learned(hopeless).choose(ctx()) == 1
    feats = np.random.default_rng(0).normal(size=(5, N_FEATURES)).astype(np.float32)
    assert Learned(hopeless).choose_batch(feats, np.tile(COSTS, (5, 1))).tolist() == [1] * 5
    # before the draft: 9 tokens in 26 s (γ=8, all surviving) beat a plain step's one in
    # 10 s; with nothing surviving the best is one token in 12 s (γ=1), and a plain step wins
    assert Learned(sure).speculate(pre_ctx()) and not Learned(hopeless).speculate(pre_ctx())
    pre = np.zeros((3, N_PRE_FEATURES), np.float32)
    assert sure.speculate_batch(pre, np.tile(COSTS, (3, 1)), np.full(3, 10.0)).tolist() == \
        [True] * 3
    assert hopeless.speculate_batch(pre, np.tile(COSTS, (3, 1)), np.full(3, 10.0)).tolist() == \
        [False] * 3


def test_torch_chooser_loads_checkpoints_and_checks_features(tmp_path):
    pytest.importorskip("torch")
    from synthetic import save_checkpoint

    from speckv.train.chooser import policy_from_spec

    path = save_checkpoint(_constant_mlp(8.0), _constant_mlp(-8.0, N_PRE_FEATURES),
                           tmp_path / "sure.ckpt", hidden=(4,))
    policy = policy_from_spec(f"ckpt:{path}")
    assert isinstance(policy, Learned)
    assert policy.choose(ctx()) == 8
    assert not policy.speculate(pre_ctx())  # the checkpoint's pre-draft network decides
    assert policy.speculate(pre_ctx(skipped=policy.max_skip_run))  # unless a probe is due
    assert isinstance(policy_from_spec(f"ckpt:{tmp_path}"), Learned)  # newest .ckpt in a run
    # the torch-free policies module refuses a checkpoint and says what to do instead
    with pytest.raises(PolicyError, match=r"policy_from_spec|export"):
        from_spec(f"ckpt:{path}")

    import torch

    ckpt = torch.load(path, weights_only=False)
    ckpt["speckv"]["feature_names"] = ["paper_mean_entropy", *FEATURE_NAMES[1:]]
    torch.save(ckpt, tmp_path / "paper.ckpt")
    with pytest.raises(PolicyError, match="features"):
        TorchChooser.load(tmp_path / "paper.ckpt")


def test_best_fixed_uses_the_gamma_of_the_step_compression():
    pol = BestFixed({"fp16": 2, "int8": 5})
    assert pol.choose(ctx(compression="int8")) == 5
    assert pol.choose(ctx(compression="fp16")) == 2
    with pytest.raises(PolicyError, match="nf4"):
        pol.choose(ctx(compression="nf4"))
    with pytest.raises(PolicyError):
        BestFixed({"fp16": 9})


def test_best_fixed_from_scores_breaks_near_ties_to_the_smaller_gamma():
    scores = np.array([10.0, 12.0, 12.0 * (1 + 1e-12), 11.0, 9, 8, 7, 6])
    assert BestFixed.from_scores({"fp16": scores}).gammas == {"fp16": 2}
    assert BestFixed.from_scores({"fp16": np.r_[99.0, scores]}).gammas == {"fp16": 2}  # plain
    assert BestFixed.from_scores({"int8": np.arange(8.0)}).gammas == {"int8": 8}
    with pytest.raises(PolicyError):
        BestFixed.from_scores({"fp16": np.ones(5)})


def test_plain_always_chooses_a_plain_step():
    assert PLAIN == 0
    assert not Plain().speculate(pre_ctx())
    assert Plain().speculate_batch(np.zeros((3, N_PRE_FEATURES)), None, None).tolist() == \
        [False] * 3
    assert Plain().choose(ctx()) == PLAIN
    assert Plain().choose(ctx(max_gamma=1, compression="nf4")) == PLAIN


def test_best_static_chooses_plain_or_gamma_by_compression():
    pol = BestStatic({"fp16": 3, "nf4": PLAIN})
    assert pol.name == "best_static"
    # the plain choice is made before the draft runs, so the decoder never pays for it
    assert pol.speculate(pre_ctx(compression="fp16"))
    assert not pol.speculate(pre_ctx(compression="nf4"))
    assert pol.choose(ctx(compression="fp16")) == 3
    assert pol.choose(ctx(compression="nf4")) == PLAIN
    with pytest.raises(PolicyError, match="int8"):
        pol.choose(ctx(compression="int8"))
    assert BestStatic({"fp16": tree_code(1)}).choose(ctx()) == tree_code(1)  # trees too
    for bad in ({"fp16": LOOKUP_CODE}, {"fp16": -1}, {"fp32": 1}):
        with pytest.raises(PolicyError):
            BestStatic(bad)


def test_best_static_from_scores_takes_the_best_and_breaks_ties_to_the_simpler():
    clear = np.array([10.0, 11.0, 12.5, 12.0, 9, 8, 7, 6, 5])  # γ=2 wins
    plain_wins = np.array([25.0, 23.0, 20, 18, 15, 13, 12, 11, 10])
    tie_plain = np.array([14.0, 14.0, 13, 12, 11, 10, 9, 8, 7])  # plain ties γ=1
    tie_gammas = np.array([13.0, 14.0, 14.0 * (1 + 1e-12), 12, 11, 10, 9, 8, 7])
    best = BestStatic.from_scores({"fp16": clear, "int8": tie_plain, "nf4": plain_wins})
    assert best.choices == {"fp16": 2, "int8": PLAIN, "nf4": PLAIN}
    assert BestStatic.from_scores({"fp16": tie_gammas}).choices == {"fp16": 1}
    # a real (if small) lead is not a tie: plain loses to a γ 0.1% faster
    assert BestStatic.from_scores({"fp16": np.r_[14.0, 14.014, np.zeros(7)]}).choices == \
        {"fp16": 1}
    assert BestStatic.from_scores({"fp16": np.r_[np.nan, 1.0, np.zeros(7)]}).choices == \
        {"fp16": 1}
    with pytest.raises(PolicyError, match="9 scores"):
        BestStatic.from_scores({"fp16": np.ones(8)})
