"""The torch-free runtime controller, on the tiny committed ONNX fixture (no torch needed).

The fixture and its golden outputs come from ``scripts/make_runtime_fixture.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from locations import FIXTURES, ROOT

from speckv.runtime import (
    BadInputError,
    CandidateMismatchError,
    Controller,
    ControllerError,
    ControllerFormatError,
    ControllerNotFoundError,
    FeatureMismatchError,
    IncompatibleVersionError,
    NumpyController,
    StepCosts,
    costs_from,
    onnx_proto,
)
from speckv.runtime.contract import (
    FORMAT_VERSION,
    KEY_FEATURE_NAMES,
    KEY_FORMAT_VERSION,
    KEY_INPUTS,
    KEY_MAX_SKIP_RUN,
    KEY_PRE_FEATURE_NAMES,
    LOOKUP_INPUTS,
    LOOKUP_OUTPUTS,
    OUTPUT_NAMES,
    PRE_OUTPUTS,
    STEP_OUTPUTS,
    UNAVAILABLE_COST,
)
from speckv.runtime.features import (
    FEATURE_NAMES,
    GAMMAS,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
    History,
    lookup_features,
    pre_features,
    step_features,
)
from speckv.runtime.proposal import TREES

ONNX = FIXTURES / "controller_tiny.onnx"
EXPECTED = FIXTURES / "controller_tiny_expected.npz"
N, M, G = len(FEATURE_NAMES), len(PRE_FEATURE_NAMES), len(GAMMAS)
#: the controller's options: the chains, then speckv's trees (controller format 4)
C = G + len(TREES)


def unavailable_trees(chain_costs):
    """Option costs where no tree is priced (a decoder that cannot verify trees)."""
    return np.concatenate([chain_costs, np.full(len(TREES), UNAVAILABLE_COST, np.float32)])


@pytest.fixture(scope="module")
def controller() -> Controller:
    return Controller.load(ONNX)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(EXPECTED) as data:
        return dict(data)


def _variant(tmp_path: Path, **metadata: str | None) -> Path:
    """The fixture with some metadata entries replaced (None removes one)."""
    out = tmp_path / "variant.onnx"
    out.write_bytes(onnx_proto.replace_metadata(ONNX.read_bytes(), metadata))
    return out


# ----------------------------------------------------------------------------- packaging
def test_importing_the_runtime_pulls_in_no_training_stack():
    code = ("import sys, speckv.runtime; heavy = ('torch', 'lightning', 'pytorch_lightning', "
            "'transformers', 'onnx', 'pandas'); print([m for m in heavy if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_fixture_is_small_and_typed_package_ships_marker():
    assert ONNX.stat().st_size < 50_000
    assert (ROOT / "speckv" / "runtime" / "py.typed").is_file()


# ------------------------------------------------------------------------------- results
def test_metadata_is_read(controller):
    info = controller.info
    assert info.feature_names == FEATURE_NAMES
    assert info.pre_feature_names == PRE_FEATURE_NAMES
    assert info.gammas == GAMMAS
    assert info.max_skip_run == controller.max_skip_run == MAX_SKIP_RUN
    assert info.inputs == "features"
    assert info.format_version == FORMAT_VERSION
    assert info.data_fingerprint == "fixture:seed=0"
    assert info.objective == "tokens_per_s"


def test_matches_the_pytorch_golden_outputs(controller, golden):
    pred = controller.predict(golden["features"], golden["costs"])
    np.testing.assert_array_equal(pred.gamma, golden["gamma"])
    np.testing.assert_allclose(pred.expected_tokens, golden["expected_tokens"], atol=1e-5)
    np.testing.assert_allclose(pred.survival, golden["survival"], atol=1e-6)
    assert pred.gamma.dtype == np.int64 and pred.expected_tokens.dtype == np.float32


def test_the_pre_draft_decision_matches_the_pytorch_golden_outputs(controller, golden):
    args = golden["pre_features"], golden["costs"], golden["plain_cost"]
    pre = controller.predict_pre(*args)
    np.testing.assert_array_equal(pre.speculate, golden["speculate"].astype(bool))
    np.testing.assert_allclose(pre.expected_tokens, golden["pre_expected_tokens"], atol=1e-5)
    np.testing.assert_allclose(pre.survival, golden["pre_survival"], atol=1e-6)
    assert 0 < pre.speculate.mean() < 1  # the fixture takes plain steps and drafts
    np.testing.assert_array_equal(controller.speculate_batch(*args), pre.speculate)
    single = [controller.speculate(p, c, float(q[0])) for p, c, q in zip(*args, strict=True)]
    assert single == pre.speculate.tolist() and all(type(x) is bool for x in single)
    # the rule: speculate iff some γ beats a plain step's one token per plain_cost
    best = np.max(pre.expected_tokens / golden["costs"], axis=1)
    np.testing.assert_array_equal(pre.speculate, best * golden["plain_cost"][:, 0] > 1)


def _lookup_args(golden) -> tuple[np.ndarray, ...]:
    return (golden["lookup_features"], golden["lookup_cost"], golden["pre_features"],
            golden["costs"], golden["plain_cost"])


def test_the_lookup_decision_matches_the_pytorch_golden_outputs(controller, golden):
    args = _lookup_args(golden)
    got = controller.predict_lookup(*args)
    np.testing.assert_array_equal(got.lookup, golden["lookup"].astype(bool))
    np.testing.assert_allclose(got.expected_tokens, golden["lookup_expected_tokens"], atol=1e-5)
    np.testing.assert_allclose(got.survival, golden["lookup_survival"], atol=1e-6)
    assert 0 < got.lookup.mean() < 1  # the fixture takes the lookup on some rows only
    single = [controller.use_lookup(a, float(b[0]), d, e, float(f[0]))
              for a, b, d, e, f in zip(*args, strict=True)]
    assert single == got.lookup.tolist() and all(type(x) is bool for x in single)
    # the rule: the lookup's tokens per cost beat a plain step and every option before drafting
    pre = controller.predict_pre(*args[2:])
    other = np.maximum(np.max(pre.expected_tokens / golden["costs"], axis=1),
                       1 / golden["plain_cost"][:, 0])
    np.testing.assert_array_equal(
        got.lookup, got.expected_tokens[:, 0] / golden["lookup_cost"][:, 0] > other)
    # E = 1 + the curve up to the continuation's length (lookup_features[:, 0])
    length = golden["lookup_features"][:, 0].astype(int)
    within = np.arange(1, got.survival.shape[1] + 1)[None] <= length[:, None]
    np.testing.assert_allclose(got.expected_tokens[:, 0],
                               1 + (got.survival * within).sum(1), rtol=1e-5)
    ref = NumpyController.load(ONNX).predict_lookup(*args)
    np.testing.assert_array_equal(ref.lookup, got.lookup)
    np.testing.assert_allclose(ref.expected_tokens, got.expected_tokens, atol=1e-5)


def test_without_a_draft_the_lookup_is_weighed_against_plain_steps_alone(controller, golden):
    """A decoder with no draft model prices every option out (UNAVAILABLE_COST)."""
    from speckv.runtime.contract import UNAVAILABLE_COST

    lf, lc, p, c, q = (a[0] for a in _lookup_args(golden))
    none = np.full_like(c, UNAVAILABLE_COST)
    e = float(controller.predict_lookup(lf, lc, p, none, q).expected_tokens[0, 0])
    plain = float(q[0])
    # the lookup wins exactly when its tokens per second beat a plain step's
    assert controller.use_lookup(lf, 0.9 * e * plain, p, none, plain)
    assert not controller.use_lookup(lf, 1.1 * e * plain, p, none, plain)


def test_bad_lookup_inputs_are_refused(controller, golden):
    lf, lc, p, c, q = (a[0] for a in _lookup_args(golden))
    with pytest.raises(BadInputError, match="lookup"):
        controller.use_lookup(lf, -1.0, p, c, float(q[0]))
    bad = lf.copy()
    bad[2] = np.nan
    with pytest.raises(BadInputError, match="lookup_log_occurrences"):
        controller.use_lookup(bad, float(lc[0]), p, c, float(q[0]))
    with pytest.raises(BadInputError, match="lookup_features"):
        controller.use_lookup(lf[:-1], float(lc[0]), p, c, float(q[0]))
    for length in (0.0, 2.5, 9.0):  # no proposal, not whole, beyond lookup_max_tokens
        bad = lf.copy()
        bad[0] = length
        with pytest.raises(BadInputError, match="lookup_length"):
            controller.use_lookup(bad, float(lc[0]), p, c, float(q[0]))
        with pytest.raises(BadInputError, match="lookup_length"):
            NumpyController.load(ONNX).predict_lookup(bad, lc, p, c, q)
    assert controller.use_lookup(lf, float(lc[0]), p, c, float(q[0])) == bool(golden["lookup"][0])


def test_a_dear_plain_step_makes_it_speculate_and_a_cheap_one_not(controller, golden):
    p, c = golden["pre_features"][0], golden["costs"][0]
    assert controller.speculate(p, c, plain_cost=1e6)
    assert not controller.speculate(p, c, plain_cost=1e-6)


def test_each_decision_runs_its_own_part_of_the_graph():
    data = ONNX.read_bytes()
    full = onnx_proto.parse_model(data)
    assert [v.name for v in full.outputs] == list(OUTPUT_NAMES)
    pre = onnx_proto.parse_model(onnx_proto.extract(data, list(PRE_OUTPUTS)))
    step = onnx_proto.parse_model(onnx_proto.extract(data, list(STEP_OUTPUTS)))
    lookup = onnx_proto.parse_model(onnx_proto.extract(data, list(LOOKUP_OUTPUTS)))
    assert [v.name for v in pre.inputs] == ["pre_features", "costs", "plain_cost"]
    assert [v.name for v in step.inputs] == ["features", "costs"]
    assert sorted(v.name for v in lookup.inputs) == sorted(LOOKUP_INPUTS)
    assert [v.name for v in pre.outputs] == list(PRE_OUTPUTS)
    assert [v.name for v in lookup.outputs] == list(LOOKUP_OUTPUTS)
    def made(model) -> set[str]:
        return {name for node in model.nodes for name in node.outputs}

    assert not made(pre) & made(step)  # the lookup's part reuses the pre-draft network's
    assert made(pre) | made(step) | made(lookup) == made(full)  # no node is lost
    assert set(pre.initializers) | set(step.initializers) | set(lookup.initializers) == \
        set(full.initializers)
    assert not any("lookup_mlp" in name for name in (*pre.initializers, *step.initializers))
    assert not any("pre_mlp" in name for name in step.initializers)
    assert all("mlp" not in name or "pre_mlp" in name for name in pre.initializers)
    assert pre.metadata == full.metadata


def test_outputs_are_consistent_with_each_other(controller, golden):
    pred = controller.predict(golden["features"], golden["costs"])
    s = pred.survival
    assert ((s > 0) & (s <= 1)).all()
    # one curve for the chains (k = 1..8), then one per tree (k = 1..depth)
    info = controller.info
    assert info.trees and s.shape[1] == G + sum(t[1] for t in info.trees)
    expected, start = [*(1 + np.cumsum(s[:, :G], axis=1)).T], G
    for _, depth, _ in info.trees:
        curve = s[:, start : start + depth]
        assert (np.diff(curve, axis=1) <= 1e-7).all()  # survival never rises with depth
        expected.append(1 + curve.sum(1))
        start += depth
    assert (np.diff(s[:, :G], axis=1) <= 1e-7).all()
    np.testing.assert_allclose(pred.expected_tokens, np.stack(expected, 1), rtol=1e-6)
    codes = [*GAMMAS, *(G + 1 + i for i in range(len(info.trees)))]
    best = np.asarray(codes)[np.argmax(pred.expected_tokens / golden["costs"], axis=1)]
    np.testing.assert_array_equal(pred.gamma, best)
    assert (pred.gamma > G).any() and (pred.gamma <= G).any()  # trees and chains both chosen


def test_choose_batch_equals_choose_row_by_row(controller, golden):
    features, costs = golden["features"], golden["costs"]
    batch = controller.choose_batch(features, costs)
    single = [controller.choose(f, c) for f, c in zip(features, costs, strict=True)]
    assert batch.tolist() == single
    assert len(set(single)) >= 4  # the fixture's choices vary, so the comparison means something
    assert all(type(g) is int for g in single)


def test_numpy_reference_agrees_with_onnxruntime(controller, golden):
    reference = NumpyController.load(ONNX)
    pred = controller.predict(golden["features"], golden["costs"])
    ref = reference.predict(golden["features"], golden["costs"])
    np.testing.assert_array_equal(ref.gamma, pred.gamma)
    np.testing.assert_allclose(ref.expected_tokens, pred.expected_tokens, atol=1e-5)
    np.testing.assert_allclose(ref.survival, pred.survival, atol=1e-5)
    f, c = golden["features"][3], golden["costs"][3]
    assert reference.choose(f, c) == controller.choose(f, c)
    args = golden["pre_features"], golden["costs"], golden["plain_cost"]
    pre, ref_pre = controller.predict_pre(*args), reference.predict_pre(*args)
    np.testing.assert_array_equal(ref_pre.speculate, pre.speculate)
    np.testing.assert_allclose(ref_pre.expected_tokens, pre.expected_tokens, atol=1e-5)
    np.testing.assert_array_equal(reference.speculate_batch(*args), pre.speculate)
    p, q = golden["pre_features"][5], float(golden["plain_cost"][5, 0])
    assert reference.speculate(p, golden["costs"][5], q) == controller.speculate(
        p, golden["costs"][5], q)


def test_costs_decide_gamma(controller, golden):
    features = golden["features"][0]
    cheap_drafts = unavailable_trees(costs_from(1e-6, np.full(G + 1, 0.1)))  # the most
    dear_drafts = unavailable_trees(costs_from(10.0, np.full(G + 1, 0.1)))  # draft one
    assert controller.choose(features, cheap_drafts) == max(GAMMAS)
    assert controller.choose(features, dear_drafts) == min(GAMMAS)


def test_lists_and_other_dtypes_are_accepted(controller, golden):
    f, c = golden["features"][5], golden["costs"][5]
    want = controller.choose(f, c)
    assert controller.choose(f.tolist(), c.tolist()) == want
    assert controller.choose(f.astype(np.float64), c.astype(np.float64)) == want
    assert controller.choose_batch(golden["features"][:3], c).tolist() == [
        controller.choose(row, c) for row in golden["features"][:3]]  # costs shared by rows


def test_step_features_feed_the_controller(controller):
    logits = np.random.default_rng(1).standard_normal(50)
    history = History()
    for agreed in (True, True, False, True):
        history.settle(agreed, target_top1=0.8)
    gamma = controller.choose(step_features(logits, history, "int8"), unavailable_trees(
        costs_from(0.01, np.full(G + 1, 0.09))))
    assert gamma in controller.info.codes


def _histories():
    """Histories in several states: fresh, settled, with deferred tokens."""
    rng = np.random.default_rng(3)
    out = [History()]
    for n in (5, 40, 300):
        h = History()
        for _ in range(n):
            h.settle(bool(rng.random() < 0.6), float(rng.uniform(0.2, 1.0)))
        out.append(h)
        deferred = History(h.ema, h.run, h.position, h.target_top1_prev)
        for _ in range(int(rng.integers(1, 20))):
            deferred.defer(float(rng.uniform(0.2, 1.0)))
        out.append(deferred)
    return out


@pytest.mark.parametrize("vocab", [2, 50, 49_152])
def test_the_hot_paths_equal_the_plain_calls(controller, vocab):
    """speculate_for / choose_from_logits build exactly the vectors the plain calls get."""
    rng = np.random.default_rng(vocab)
    costs = StepCosts(0.01, 0.05 * (1 + 0.05 * np.arange(G + 1)),
                      0.01 * (1 + 0.2 * np.arange(6)),
                      [0.012 * t.draft_forwards for t in TREES],
                      [0.05 * (1 + 0.02 * t.size) for t in TREES])
    decisions = set()
    for history in _histories():
        for compression in ("fp16", "int8", "nf4"):
            unseen = history.unsettled + 1
            spec = controller.speculate_for(history, compression, costs)
            assert spec == controller.speculate(pre_features(history, compression),
                                                controller.option_costs(costs, unseen), costs.plain)
            decisions.add(spec)
            if history.pending:
                continue
            for scale in (0.1, 3.0, 30.0):
                logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
                got = controller.choose_from_logits(logits, history, compression,
                                                    controller.option_costs(costs, unseen))
                assert got == controller.choose(step_features(logits, history, compression),
                                                controller.option_costs(costs, unseen))
    assert decisions == {True, False}


def test_choose_from_logits_refuses_nan_logits_and_deferred_history(controller):
    costs = StepCosts(0.01, np.full(G + 1, 0.05))
    logits = np.zeros(100, np.float32)
    logits[3] = np.nan
    with pytest.raises(BadInputError, match="draft_entropy"):
        controller.choose_from_logits(logits, History(), "fp16", controller.option_costs(costs))
    history = History()
    history.defer(0.9)
    with pytest.raises(ValueError, match="deferred"):
        controller.choose_from_logits(np.zeros(100, np.float32), history, "fp16",
                                      controller.option_costs(costs))


def test_one_controller_serves_many_threads(controller, golden):
    """Each thread binds its own buffers: concurrent decisions are never mixed up."""
    import threading

    f, c, p, q = (golden[k] for k in ("features", "costs", "pre_features", "plain_cost"))
    want_gamma, want_spec = golden["gamma"].tolist(), golden["speculate"].astype(bool).tolist()
    wrong, done = [], []
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        order = np.random.default_rng(seed).integers(0, len(f), 2000)
        start.wait()
        for i in order:
            if controller.choose(f[i], c[i]) != want_gamma[i]:
                wrong.append(("gamma", i))
            if controller.speculate(p[i], c[i], float(q[i, 0])) != want_spec[i]:
                wrong.append(("speculate", i))
        done.append(seed)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == [0, 1, 2, 3]
    assert wrong == []


@pytest.mark.parametrize("value", [1e30, -1e30, 3.0e38, -3.0e38, 0.0, 1e-38])
def test_gamma_is_always_a_candidate_for_extreme_features(controller, value):
    features = np.full(N, value, np.float32)
    for costs in (np.full(C, 1.0), np.geomspace(1e-30, 1e30, C), np.geomspace(1e30, 1e-30, C),
                  np.full(C, 3.0e38), np.full(C, 1e-38)):
        assert controller.choose(features, costs) in controller.info.codes
        assert set(controller.choose_batch(features[None], costs).tolist()) <= set(
            controller.info.codes)


def test_gamma_is_always_a_candidate_for_random_inputs(controller):
    rng = np.random.default_rng(7)
    features = (rng.standard_normal((500, N)) * rng.choice([1e-3, 1, 1e3, 1e6], (500, 1)))
    costs = np.exp(rng.uniform(-20, 20, (500, C)))
    gammas = controller.choose_batch(features, costs)
    assert set(gammas.tolist()) <= set(controller.info.codes)


def test_empty_batch(controller):
    assert controller.choose_batch(np.empty((0, N)), np.empty((0, C))).shape == (0,)


def test_threads_option(golden):
    two = Controller.load(ONNX, threads=2)
    one = Controller.load(ONNX)
    f, c = golden["features"], golden["costs"]
    np.testing.assert_array_equal(two.choose_batch(f, c), one.choose_batch(f, c))
    with pytest.raises(ValueError, match="threads"):
        Controller.load(ONNX, threads=0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(N - 1,), (N + 1,), (1, N), (), (0,)])
def test_features_of_the_wrong_shape(controller, shape):
    with pytest.raises(BadInputError, match=rf"{N} values.*got shape {re_shape(shape)}"):
        controller.choose(np.zeros(shape, np.float32), np.ones(C))


def re_shape(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("shape", [(G,), (C - 1,), (C + 1,), (1, C), ()])
def test_costs_of_the_wrong_shape(controller, shape):
    with pytest.raises(BadInputError, match=rf"costs must be .*{C} values.*got shape"):
        controller.choose(np.zeros(N), np.ones(shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", range(N))
def test_non_finite_features_are_refused_wherever_they_are(controller, golden, bad, position):
    features = golden["features"][0].copy()
    features[position] = bad
    with pytest.raises(BadInputError, match=rf"finite.*{FEATURE_NAMES[position]}="):
        controller.choose(features, golden["costs"][0])
    with pytest.raises(BadInputError, match=FEATURE_NAMES[position]):
        controller.choose_batch(features[None], golden["costs"][0])


@pytest.mark.parametrize("bad", [0.0, -1.0, -np.inf, np.inf, np.nan])
@pytest.mark.parametrize("position", [0, C // 2, C - 1])
def test_bad_costs_are_refused(controller, golden, bad, position):
    costs = golden["costs"][0].copy()
    costs[position] = bad
    label = f"γ={position + 1}" if position < G else f"tree:{TREES[position - G].size}"
    with pytest.raises(BadInputError, match=rf"costs must be finite and > 0.*{label}"):
        controller.choose(golden["features"][0], costs)
    with pytest.raises(BadInputError, match=label):
        controller.predict(golden["features"][:2], np.stack([golden["costs"][0], costs]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_values_beyond_float32_are_refused(controller):
    with pytest.raises(BadInputError, match=r"float32|finite"):
        controller.choose(np.full(N, 1e300), np.ones(C))


def test_values_that_are_not_numbers(controller):
    with pytest.raises(BadInputError, match="numbers"):
        controller.choose(["x"] * N, np.ones(C))


def test_batch_of_the_wrong_width(controller):
    with pytest.raises(BadInputError, match=rf"\[batch, {N}\]"):
        controller.choose_batch(np.zeros((3, N + 2)), np.ones(C))
    with pytest.raises(BadInputError, match="costs must be"):
        controller.choose_batch(np.zeros((3, N)), np.ones((2, C)))


def test_a_refused_call_leaves_the_controller_working(controller, golden):
    f, c = golden["features"][9], golden["costs"][9]
    want = controller.choose(f, c)
    with pytest.raises(BadInputError):
        controller.choose(np.full(N, np.nan), c)
    with pytest.raises(BadInputError):
        controller.choose(f, -c)
    assert controller.choose(f, c) == want


def test_errors_belong_to_the_speckv_family():
    from speckv.errors import SpeckvError

    for cls in (BadInputError, FeatureMismatchError, CandidateMismatchError,
                IncompatibleVersionError, ControllerFormatError, ControllerNotFoundError):
        assert issubclass(cls, ControllerError) and issubclass(cls, SpeckvError)
    assert issubclass(BadInputError, ValueError)


# ------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path):
    with pytest.raises(ControllerNotFoundError, match="speckv export"):
        Controller.load(tmp_path / "nope.onnx")
    with pytest.raises(ControllerNotFoundError, match="directory"):
        Controller.load(tmp_path)


def test_a_file_that_is_not_onnx(tmp_path):
    for content in (b"this is not a model\n", b"\x00\x01\x02" * 40, b""):
        path = tmp_path / "bad.onnx"
        path.write_bytes(content)
        with pytest.raises(ControllerFormatError, match="not an ONNX model"):
            Controller.load(path)
        with pytest.raises(ControllerFormatError, match="not an ONNX model"):
            NumpyController.load(path)


def test_an_onnx_file_that_is_not_speckvs(tmp_path):
    path = tmp_path / "identity.onnx"
    path.write_bytes(onnx_proto.identity_model(N))
    with pytest.raises(ControllerFormatError, match=r"not a speckv controller.*speckv export"):
        Controller.load(path)


def test_a_speckv_file_with_another_signature(tmp_path):
    """speckv metadata on a graph that is not a controller (the Identity model)."""
    meta = onnx_proto.parse_model(ONNX.read_bytes(), graph=False).metadata
    path = tmp_path / "identity.onnx"
    path.write_bytes(onnx_proto.replace_metadata(onnx_proto.identity_model(N), dict(meta)))
    with pytest.raises(ControllerFormatError, match="signature"):
        Controller.load(path)


def test_other_feature_names_say_which_differ(tmp_path):
    renamed = list(FEATURE_NAMES)
    renamed[2] = "draft_gap"
    path = _variant(tmp_path, **{KEY_FEATURE_NAMES: json.dumps(renamed)})
    with pytest.raises(FeatureMismatchError, match=r"missing \['draft_margin'\].*"
                                                   r"not expected \['draft_gap'\]"):
        Controller.load(path)
    # the caller may accept the file's own names explicitly
    assert Controller.load(path, expected_features=renamed).feature_names == tuple(renamed)


def test_other_feature_order_says_where(tmp_path):
    swapped = list(FEATURE_NAMES)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    path = _variant(tmp_path, **{KEY_FEATURE_NAMES: json.dumps(swapped)})
    with pytest.raises(FeatureMismatchError, match="another order, first at position 0"):
        Controller.load(path)


def test_other_feature_count_is_a_format_error(tmp_path):
    path = _variant(tmp_path, **{KEY_FEATURE_NAMES: json.dumps(list(FEATURE_NAMES[:-1]))})
    with pytest.raises(FeatureMismatchError, match="compression_nf4"):
        Controller.load(path)
    with pytest.raises(ControllerFormatError, match="signature"):
        Controller.load(path, expected_features=None)


def test_other_candidate_gammas():
    with pytest.raises(CandidateMismatchError, match=r"among \[1, 2, 3, 4, 5, 6, 7, 8\]"):
        Controller.load(ONNX, expected_gammas=(1, 2, 3, 4))


@pytest.mark.parametrize("version, pattern", [
    (str(FORMAT_VERSION + 1), "upgrade speckv"),
    (str(FORMAT_VERSION - 1), r"speckv.train fit.*speckv export --out"),
])
def test_incompatible_format_version(tmp_path, version, pattern):
    path = _variant(tmp_path, **{KEY_FORMAT_VERSION: version})
    with pytest.raises(IncompatibleVersionError, match=rf"format {version}.*{pattern}"):
        Controller.load(path)


@pytest.mark.parametrize("metadata, pattern", [
    ({KEY_FORMAT_VERSION: "one"}, "no valid speckv.format_version"),
    ({KEY_FORMAT_VERSION: None}, "no valid speckv.format_version"),
    ({KEY_FEATURE_NAMES: "[draft_entropy"}, "must be a JSON list of str"),
    ({KEY_FEATURE_NAMES: None}, "lacks the metadata speckv.feature_names"),
    ({"speckv.gammas": "[3, 2, 1]"}, "not increasing"),
    ({"speckv.gammas": "[1, 2.5]"}, "JSON list of int"),
    ({KEY_PRE_FEATURE_NAMES: None}, "lacks the metadata speckv.pre_feature_names"),
    ({KEY_INPUTS: "logits"}, "takes 'logits' as input"),
    ({KEY_MAX_SKIP_RUN: "-3"}, "must be a count of steps"),
])
def test_damaged_metadata(tmp_path, metadata, pattern):
    with pytest.raises(ControllerFormatError, match=pattern):
        Controller.load(_variant(tmp_path, **metadata))


# ------------------------------------------------------------------------------ internals
def test_proto_reader_matches_the_onnx_package():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(ONNX)
    ours = onnx_proto.parse_model(ONNX.read_bytes())
    assert dict(ours.metadata) == {p.key: p.value for p in model.metadata_props}
    assert [n.op_type for n in ours.nodes] == [n.op_type for n in model.graph.node]
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(ours.initializers[tensor.name],
                                      numpy_helper.to_array(tensor))
    assert [i.name for i in ours.inputs] == ["features", "pre_features", "costs", "plain_cost",
                                             "lookup_features", "lookup_cost"]
    assert ours.inputs[0].shape == ("batch", N) and ours.inputs[1].shape == ("batch", M)


def test_identity_model_echoes_its_input():
    session = ort.InferenceSession(onnx_proto.identity_model(N), providers=["CPUExecutionProvider"])
    x = np.arange(3 * N, dtype=np.float32).reshape(3, N)
    np.testing.assert_array_equal(session.run(None, {"features": x})[0], x)


def test_replace_metadata_keeps_the_graph():
    data = onnx_proto.replace_metadata(ONNX.read_bytes(), {"speckv.objective": "x", "extra": "y"})
    model = onnx_proto.parse_model(data)
    assert model.metadata["speckv.objective"] == "x" and model.metadata["extra"] == "y"
    original = onnx_proto.parse_model(ONNX.read_bytes())
    assert [n.op_type for n in model.nodes] == [n.op_type for n in original.nodes]


# ---------------------------------------------------------------------- bench-controller
def test_bench_controller_json(capsys):
    from speckv.cli.bench_controller import main

    assert main(["--controller", str(ONNX), "--json", "--iters", "300",
                 "--target-step-ms", "50", "--vocab", "1000", "--check-threads", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    for method in ("end_to_end", "statistics", "speculate", "onnx", "graph", "locked", "numpy",
                   "floor"):
        stats = report["batch1_us"][method]
        assert 0 < stats["p50"] <= stats["p99"], method
    for method in ("onnx", "numpy", "floor"):
        assert report["batch64_per_row_us"][method]["p99"] > 0
    assert report["end_to_end_us"] == report["batch1_us"]["end_to_end"]
    assert report["mlp_us"] == report["batch1_us"]["onnx"]
    assert report["graph_us"] == report["batch1_us"]["graph"]
    assert report["floor_us"] == report["batch1_us"]["floor"]
    assert report["format_version"] == FORMAT_VERSION and report["vocab"] == 1000
    check = report["thread_check"]
    assert check == {**check, "threads": 3, "calls": 3 * 2000, "wrong": 0}
    assert report["target_step_ms"] == 50
    per_step = report["end_to_end_us"]["p50"] + report["speculate_us"]["p50"]
    assert report["ratio_p50_to_target_step"] == pytest.approx(per_step / 50_000, rel=1e-3)


def test_bench_controller_text(capsys):
    from speckv.cli.bench_controller import main

    assert main(["--controller", str(ONNX), "--iters", "100", "--vocab", "100",
                 "--check-threads", "2", "--target-step-ms", "50"]) == 0
    out = capsys.readouterr().out
    assert "logits [100] -> γ (end to end)" in out and "0 wrong γ in 4000 calls" in out


def test_bench_controller_refuses_a_format_1_file(tmp_path, capsys):
    from speckv.__main__ import main

    old = _variant(tmp_path, **{KEY_FORMAT_VERSION: "1"})
    assert main(["bench-controller", "--controller", str(old)]) == 2
    err = capsys.readouterr().err
    assert "format 1" in err and "speckv.train fit" in err and "speckv export" in err


def test_bench_controller_reads_the_target_step_from_records(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from speckv.cli.bench_controller import target_step_ms

    frame = pd.DataFrame({
        "compression": ["fp16", "fp16", "fp16", "nf4"],
        "cost_verify_s": [[0.08, 0.09], [0.10, 0.11], [0.30, 0.31], [0.5, 0.6]],
    })
    frame.to_parquet(tmp_path / "run.parquet")
    ms, source = target_step_ms(tmp_path)
    assert ms == pytest.approx(100.0)
    assert "3 fp16" in source
    assert target_step_ms(tmp_path / "empty")[0] is None


def test_bench_controller_without_a_controller(tmp_path, capsys):
    from speckv.__main__ import main

    assert main(["bench-controller", "--controller", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err
    assert "speckv export" in err and "--controller" in err


# -------------------------------------------------------------------- docs/EMBEDDING.md
def _python_blocks(title: str) -> list[str]:
    """The ```python blocks of a section of docs/EMBEDDING.md."""
    text = (ROOT / "docs" / "EMBEDDING.md").read_text()
    section = text.split(f"## {title}")[1].split("\n## ")[0]
    return [block.split("```")[0] for block in section.split("```python\n")[1:]]


def test_the_guides_onnxruntime_only_example_decides_like_the_runtime(controller, golden):
    code = _python_blocks("6. Calling it from Python")[-1]
    code = code.replace('"export/speckv.onnx"', repr(str(ONNX)))
    for i in (0, 7, 21):
        plain = float(golden["plain_cost"][i, 0])
        t_verify = [plain * (1 + 0.04 * g) for g in range(9)]
        scope = {"features": golden["features"][i], "pre": golden["pre_features"][i],
                 "costs": golden["costs"][i], "plain_cost": plain, "t_verify": t_verify}
        exec(code, scope)
        assert int(scope["gamma"][0]) == controller.choose(golden["features"][i],
                                                           golden["costs"][i])
        look = lookup_features(golden["pre_features"][i], 3, 2, 3, 2)  # the block's proposal
        assert bool(scope["lookup"][0]) == controller.use_lookup(
            look, t_verify[3], golden["pre_features"][i], golden["costs"][i], plain)
        assert bool(scope["speculate"][0]) == controller.speculate(
            golden["pre_features"][i], golden["costs"][i], float(golden["plain_cost"][i, 0]))
        assert scope["names"] == list(FEATURE_NAMES)


def test_the_guides_split_files_run_one_decision_each(tmp_path, controller, golden):
    code = _python_blocks("7. Calling it from C or C++")[0]
    code = code.replace('"export/speckv.onnx"', repr(str(ONNX)))
    code = code.replace('"speckv.pre.onnx"', repr(str(tmp_path / "pre.onnx")))
    code = code.replace('"speckv.step.onnx"', repr(str(tmp_path / "step.onnx")))
    code = code.replace('"speckv.lookup.onnx"', repr(str(tmp_path / "lookup.onnx")))
    exec(code, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lookup.onnx", "pre.onnx", "step.onnx"]
    lookup = ort.InferenceSession(str(tmp_path / "lookup.onnx"),
                                  providers=["CPUExecutionProvider"])
    took = lookup.run(["lookup"], {"lookup_features": golden["lookup_features"],
                                   "pre_features": golden["pre_features"],
                                   "lookup_cost": golden["lookup_cost"], "costs": golden["costs"],
                                   "plain_cost": golden["plain_cost"]})[0]
    np.testing.assert_array_equal(took, golden["lookup"])
    pre = ort.InferenceSession(str(tmp_path / "pre.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    speculate = pre.run(["speculate"], {"pre_features": golden["pre_features"],
                                        "costs": golden["costs"],
                                        "plain_cost": golden["plain_cost"]})[0]
    gamma = step.run(["gamma"], {"features": golden["features"], "costs": golden["costs"]})[0]
    np.testing.assert_array_equal(speculate, golden["speculate"])
    np.testing.assert_array_equal(gamma, golden["gamma"])


def test_use_lookup_for_builds_both_vectors_from_the_history(controller):
    """The convenience form equals :meth:`use_lookup` on vectors built by hand, over
    histories and proposals that make it take and decline the lookup."""
    from speckv.runtime import History, StepCosts
    from speckv.runtime.features import lookup_features, pre_features
    from speckv.runtime.lookup import LookupProposal

    costs = StepCosts(0.004, [0.02 * (1 + 0.05 * k) for k in range(9)],
                      [0.004 * (1 + 0.3 * k) for k in range(8)])
    said = []
    for agreed in (True, False):
        history = History()
        for _ in range(6):
            history.settle(agreed, 0.9)
        history.defer(0.8)
        for n, match, occ, agree in ((1, 1, 1, 0), (8, 4, 3, 3), (4, 2, 2, 1)):
            prop = LookupProposal(tuple(range(10, 10 + n)), match, occ, agree)
            pre = pre_features(history, "fp16")
            by_hand = controller.use_lookup(
                lookup_features(pre, n, match, occ, agree), costs.t_verify[n], pre,
                controller.option_costs(costs, len(history.pending) + 1), costs.plain)
            got = controller.use_lookup_for(history, "fp16", costs, prop)
            assert got == by_hand
            said.append(got)
    assert any(said) and not all(said)
