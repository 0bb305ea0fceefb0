"""``speckv export``: small step, pre-draft and lookup SurvivalMLPs in tmp_path -> ONNX
(controller format 4), checked against PyTorch."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
from locations import FIXTURES, ROOT

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import speckv  # noqa: E402
from speckv.export import graph as export_mod  # noqa: E402
from speckv.export.graph import ExportError, export_controller, find_checkpoint  # noqa: E402
from speckv.runtime import Controller, NumpyController, check_sidecar  # noqa: E402
from speckv.runtime.contract import FORMAT_VERSION  # noqa: E402
from speckv.runtime.features import (  # noqa: E402
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMA_MAX,
    GAMMAS,
    LOOKUP_FEATURE_NAMES,
    LOOKUP_MAX_TOKENS,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
    lookup_features,
)
from speckv.train.network import ControllerGraph, SurvivalMLP  # noqa: E402

N, M, G = len(FEATURE_NAMES), len(PRE_FEATURE_NAMES), len(GAMMAS)
K = len(LOOKUP_FEATURE_NAMES)


def small_mlp(seed: int = 0, mean: np.ndarray | None = None,
              std: np.ndarray | None = None) -> SurvivalMLP:
    torch.manual_seed(seed)
    mlp = SurvivalMLP(N, GAMMA_MAX, hidden=(16, 16), dropout=0.1)
    with torch.no_grad():
        mlp.net[-1].bias.add_(1.5)
    rng = np.random.default_rng(seed)
    mlp.set_scaling(torch.as_tensor(rng.uniform(0, 3, N) if mean is None else mean),
                    torch.as_tensor(rng.uniform(0.2, 2, N) if std is None else std))
    return mlp


def small_pre_mlp(seed: int = 0) -> SurvivalMLP:
    torch.manual_seed(100 + seed)
    mlp = SurvivalMLP(M, GAMMA_MAX, hidden=(16, 16), dropout=0.1)
    rng = np.random.default_rng(100 + seed)
    mlp.set_scaling(torch.as_tensor(rng.uniform(0, 1, M)), torch.as_tensor(rng.uniform(0.2, 1, M)))
    return mlp


def small_lookup_mlp(seed: int = 0) -> SurvivalMLP:
    torch.manual_seed(200 + seed)
    mlp = SurvivalMLP(K, LOOKUP_MAX_TOKENS, hidden=(16, 16), dropout=0.1)
    rng = np.random.default_rng(200 + seed)
    mean = np.concatenate([[4.0, 2.0, 1.0, 0.5], rng.uniform(0, 1, M)])
    mlp.set_scaling(torch.as_tensor(mean), torch.as_tensor(rng.uniform(0.3, 2, K)))
    return mlp


def lookup_rows(seed: int, pre: np.ndarray, plain: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Lookup vectors over ``pre`` (proposals of 1..8 tokens) and their verify costs around
    the other choices' break-even."""
    rng = np.random.default_rng(seed + 2000)
    n = len(pre)
    occurrences = rng.integers(1, 6, n)
    x = lookup_features(pre, rng.integers(1, LOOKUP_MAX_TOKENS + 1, n), rng.integers(1, 5, n),
                        occurrences, rng.integers(0, occurrences + 1))
    return x, (plain[:, 0] * rng.uniform(0.8, 3.0, n)).astype(np.float32)[:, None]


def rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(1.0, 1.5, (n, N)).astype(np.float32)
    draft = rng.uniform(0.002, 0.05, (n, 1))
    costs = (0.08 + draft * np.arange(1, G + 1)).astype(np.float32)
    return features, costs


def pre_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-draft features and plain-step costs around the draft's break-even."""
    rng = np.random.default_rng(seed + 1000)
    pre = rng.normal(0.5, 0.6, (n, M)).astype(np.float32)
    plain = rng.uniform(0.03, 0.12, (n, 1)).astype(np.float32)
    return pre, plain


def small_meta(n_rows: int = 128, seed: int = 0) -> dict:
    features, costs = rows(1, n_rows)
    pre, plain = pre_rows(1, n_rows)
    look, look_cost = lookup_rows(1, pre, plain)
    return {"feature_names": list(FEATURE_NAMES), "pre_feature_names": list(PRE_FEATURE_NAMES),
            "gammas": list(GAMMAS), "compressions": list(COMPRESSIONS),
            "feature_set": "decision", "objective": "tokens_per_s",
            "data_fingerprint": "sha256:test", "max_skip_run": MAX_SKIP_RUN,
            "pre_mlp": small_pre_mlp(seed), "lookup_mlp": small_lookup_mlp(seed),
            "lookup_feature_names": list(LOOKUP_FEATURE_NAMES),
            "parity_features": features, "parity_costs": costs,
            "parity_pre_features": pre, "parity_plain_costs": plain,
            "parity_lookup_features": look, "parity_lookup_costs": look_cost}


def torch_outputs(mlp: SurvivalMLP, features: np.ndarray, costs: np.ndarray):
    graph = ControllerGraph(mlp.eval(), GAMMAS).eval()
    with torch.inference_mode():
        return [t.numpy() for t in graph(torch.from_numpy(features), torch.from_numpy(costs))]


def torch_lookup_outputs(pre_mlp: SurvivalMLP, lookup_mlp: SurvivalMLP, look, look_cost, pre,
                         costs, plain):
    graph = ControllerGraph(small_mlp().eval(), GAMMAS, pre_mlp.eval(), (),
                            lookup_mlp.eval()).eval()
    with torch.inference_mode():
        _, pre_expected, _ = graph.pre(*(torch.from_numpy(a) for a in (pre, costs, plain)))
        return [t.numpy() for t in graph.lookup(
            torch.from_numpy(look), torch.from_numpy(look_cost), pre_expected,
            torch.from_numpy(costs), torch.from_numpy(plain))]


def torch_pre_outputs(pre_mlp: SurvivalMLP, pre: np.ndarray, costs: np.ndarray,
                      plain: np.ndarray):
    graph = ControllerGraph(small_mlp().eval(), GAMMAS, pre_mlp.eval()).eval()
    with torch.inference_mode():
        return [t.numpy() for t in graph.pre(*(torch.from_numpy(a) for a in (pre, costs, plain)))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "nested" / "speckv.onnx"
    mlp = small_mlp()
    meta = small_meta()
    report = export_controller(mlp, meta, out, latency_calls=200)
    return mlp, out, report, meta["pre_mlp"], meta["lookup_mlp"]


# ---------------------------------------------------------------------------------- graph
def test_the_metadata_is_also_written_beside_the_file_as_json(exported, tmp_path):
    """For clients whose onnxruntime has no metadata API: the same speckv.* entries, and the
    file's digest, so a JSON left beside another file is caught."""
    import hashlib
    import shutil

    from speckv.runtime import ControllerFormatError
    from speckv.runtime.sidecar import sidecar_path

    _, out, report, _, _ = exported
    assert report["sidecar"] == str(sidecar_path(out)) == str(out.with_suffix(".json"))
    written = json.loads(Path(report["sidecar"]).read_text())
    assert written["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert written["metadata_props"] == report["metadata"] == check_sidecar(out)
    # the JSON of one file beside another file is refused
    other = tmp_path / "speckv.onnx"
    other.write_bytes((FIXTURES / "controller_tiny.onnx").read_bytes())
    shutil.copy(report["sidecar"], sidecar_path(other))
    with pytest.raises(ControllerFormatError, match="sha256"):
        check_sidecar(other)
    sidecar_path(other).unlink()
    with pytest.raises(ControllerFormatError, match="Cannot read"):
        check_sidecar(other)


def test_report_says_parity_holds(exported):
    _, out, report, _, _ = exported
    parity = report["parity"]
    assert parity["rows"] == 128 and parity["source"] == "checkpoint"
    assert parity["gamma_mismatches"] == 0 and parity["speculate_mismatches"] == 0
    assert 0 < parity["speculate_share"] < 1  # the parity rows exercise both answers
    assert parity["lookup_mismatches"] == 0 and 0 < parity["lookup_share"] < 1
    for key in ("expected_tokens", "survival", "pre_expected_tokens", "pre_survival",
                "lookup_expected_tokens", "lookup_survival"):
        assert parity[f"max_abs_diff_{key}"] < 1e-4
    assert report["latency"]["p50_us"] > 0 and report["latency"]["speculate_p50_us"] > 0
    assert report["latency"]["lookup_p50_us"] > 0
    assert report["format_version"] == FORMAT_VERSION
    assert report["bytes"] == out.stat().st_size


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_matches_torch(exported, batch):
    mlp, out, _, _, _ = exported
    features, costs = rows(100 + batch, batch)
    controller = Controller.load(out)
    pred = controller.predict(features, costs)
    gamma, expected, survival = torch_outputs(mlp, features, costs)
    assert pred.gamma.shape == (batch,)
    np.testing.assert_array_equal(pred.gamma, gamma)
    np.testing.assert_allclose(pred.expected_tokens, expected, atol=1e-5)
    np.testing.assert_allclose(pred.survival, survival, atol=1e-5)
    assert [controller.choose(f, c) for f, c in zip(features, costs, strict=True)] == \
        gamma.tolist()


@pytest.mark.parametrize("batch", [1, 9])
def test_the_pre_draft_decision_matches_torch(exported, batch):
    _, out, _, pre_mlp, _ = exported
    _, costs = rows(200 + batch, batch)
    pre, plain = pre_rows(200 + batch, batch)
    controller = Controller.load(out)
    got = controller.predict_pre(pre, costs, plain)
    speculate, expected, survival = torch_pre_outputs(pre_mlp, pre, costs, plain)
    np.testing.assert_array_equal(got.speculate, speculate.astype(bool))
    np.testing.assert_allclose(got.expected_tokens, expected, atol=1e-5)
    np.testing.assert_allclose(got.survival, survival, atol=1e-5)
    ref = NumpyController.load(out).predict_pre(pre, costs, plain)
    np.testing.assert_array_equal(ref.speculate, speculate.astype(bool))


@pytest.mark.parametrize("batch", [1, 9])
def test_the_lookup_decision_matches_torch(exported, batch):
    _, out, _, pre_mlp, lookup_mlp = exported
    _, costs = rows(300 + batch, batch)
    pre, plain = pre_rows(300 + batch, batch)
    look, look_cost = lookup_rows(300 + batch, pre, plain)
    controller = Controller.load(out)
    got = controller.predict_lookup(look, look_cost, pre, costs, plain)
    take, expected, survival = torch_lookup_outputs(pre_mlp, lookup_mlp, look, look_cost, pre,
                                                    costs, plain)
    np.testing.assert_array_equal(got.lookup, take.astype(bool))
    np.testing.assert_allclose(got.expected_tokens, expected, atol=1e-5)
    np.testing.assert_allclose(got.survival, survival, atol=1e-5)
    one = [controller.use_lookup(a, float(b[0]), d, e, float(f[0]))
           for a, b, d, e, f in zip(look, look_cost, pre, costs, plain, strict=True)]
    np.testing.assert_array_equal(one, take.astype(bool))
    ref = NumpyController.load(out).predict_lookup(look, look_cost, pre, costs, plain)
    np.testing.assert_array_equal(ref.lookup, take.astype(bool))
    np.testing.assert_allclose(ref.expected_tokens, expected, atol=1e-5)


def test_the_lookup_sums_its_survival_up_to_the_continuations_length(exported):
    """E[tokens | lookup] = 1 + the first n entries of its curve, n = lookup_length (the
    graph reads it from the raw vector), for every n."""
    _, out, _, _, _ = exported
    _, costs = rows(7, 1)
    pre, plain = pre_rows(7, 1)
    controller = Controller.load(out)
    for n in range(1, LOOKUP_MAX_TOKENS + 1):
        look = lookup_features(pre, n, 2, 3, 2)
        got = controller.predict_lookup(look, plain * 1.5, pre, costs, plain)
        assert 0 < got.survival[0, n - 1] < 1
        np.testing.assert_allclose(got.expected_tokens[0, 0], 1 + got.survival[0, :n].sum(),
                                   rtol=1e-5)


def test_gammas_vary_on_the_test_rows(exported):
    """Otherwise the γ parity above would prove little."""
    mlp, _, _, _, _ = exported
    features, costs = rows(5, 200)
    assert len(np.unique(torch_outputs(mlp, features, costs)[0])) >= 3


def test_metadata(exported):
    _, out, _, _, _ = exported
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["speckv.format_version"] == str(FORMAT_VERSION)
    assert props["speckv.version"] == speckv.__version__
    assert json.loads(props["speckv.feature_names"]) == list(FEATURE_NAMES)
    assert json.loads(props["speckv.gammas"]) == list(GAMMAS)
    assert json.loads(props["speckv.compressions"]) == list(COMPRESSIONS)
    assert props["speckv.feature_set"] == "decision"
    assert props["speckv.objective"] == "tokens_per_s"
    assert props["speckv.data_fingerprint"] == "sha256:test"
    assert json.loads(props["speckv.pre_feature_names"]) == list(PRE_FEATURE_NAMES)
    assert json.loads(props["speckv.lookup_feature_names"]) == list(LOOKUP_FEATURE_NAMES)
    assert props["speckv.lookup_max_tokens"] == str(LOOKUP_MAX_TOKENS)
    assert props["speckv.inputs"] == "features"
    assert props["speckv.max_skip_run"] == str(MAX_SKIP_RUN)


def _consumers(model, name: str) -> list[str]:
    return [n.op_type for n in model.graph.node if name in n.input]


def test_graph_is_valid_and_float32(exported):
    """What a runtime relies on. The exact op list is not pinned: it is the exporter's
    (torch.onnx, onnxscript, onnx), and an upgrade of any of them may reorder or swap ops."""
    _, out, report, _, _ = exported
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    ops = [n.op_type for n in model.graph.node]
    assert "Dropout" not in ops
    # scaling folded: the raw features go straight into the first layer of each network
    assert _consumers(model, "features") == ["Gemm"]
    assert _consumers(model, "pre_features") == ["Gemm"]
    # and the lookup vector also to the slice that reads its length
    assert sorted(_consumers(model, "lookup_features")) == ["Gemm", "Slice"]
    assert report["rewrites"]["scaling"] == {"features": "folded into the first Gemm",
                                             "pre_features": "folded into the first Gemm",
                                             "lookup_features": "folded into the first Gemm"}
    # the simplification left nothing it would rewrite (whatever the exporter emitted)
    again = onnx.ModelProto()
    again.CopyFrom(model)
    assert export_mod.drop_identity_ops(again) == []
    assert export_mod.fold_scaling(again).startswith("not applied")
    assert export_mod.fold_scaling(again, "pre_features").startswith("not applied")
    assert export_mod.fold_scaling(again, "lookup_features").startswith("not applied")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.type.tensor_type.elem_type
             for v in (*inferred.input, *inferred.output, *inferred.value_info)}
    types |= {t.data_type for t in inferred.initializer}
    assert onnx.TensorProto.DOUBLE not in types
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [v.name for v in model.graph.input] == ["features", "pre_features", "costs",
                                                   "plain_cost", "lookup_features",
                                                   "lookup_cost"]
    assert [v.name for v in model.graph.output] == ["speculate", "gamma", "expected_tokens",
                                                    "survival", "pre_expected_tokens",
                                                    "pre_survival", "lookup",
                                                    "lookup_expected_tokens", "lookup_survival"]


def test_gamma_is_picked_in_the_graph(exported):
    """The ``gamma`` output is an integer candidate computed by the graph itself: the argmax
    of its own expected tokens per unit cost, whatever costs come in."""
    import onnxruntime as ort

    _, out, _, _, _ = exported
    model = onnx.load(out)
    gamma_out = next(v for v in model.graph.output if v.name == "gamma")
    assert gamma_out.type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    features, costs = rows(11, 200)
    pre, plain = pre_rows(11, 200)
    chosen = []
    for cost in (costs, costs[:, ::-1].copy(), np.ones_like(costs)):
        look, look_cost = lookup_rows(11, pre, plain)
        gamma, expected = session.run(["gamma", "expected_tokens"], {
            "features": features, "costs": cost, "pre_features": pre, "plain_cost": plain,
            "lookup_features": look, "lookup_cost": look_cost})
        assert set(gamma.tolist()) <= set(GAMMAS)
        # the graph may divide differently (a reciprocal, another order): compare on the rows
        # that float32 rounding cannot tip
        decided = decided_rows(expected, cost)
        assert decided.mean() >= 0.9
        best = np.asarray(GAMMAS)[np.argmax(expected.astype(np.float64) / cost, 1)]
        np.testing.assert_array_equal(gamma[decided], best[decided])
        chosen.append(gamma)
    assert not np.array_equal(chosen[0], chosen[1]), "the costs input should move γ"


def test_exported_file_has_ordinary_permissions(exported):
    _, out, _, _, _ = exported
    plain = out.parent / "plain"
    plain.write_bytes(b"")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_export_leaves_the_torch_module_alone(tmp_path):
    mlp = small_mlp(seed=3).train()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    export_controller(mlp, small_meta(16), tmp_path / "x.onnx", latency_calls=0)
    assert mlp.training
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, before[key])


def test_degenerate_scaling_keeps_the_mean_out_of_the_bias(tmp_path):
    """A feature constant in training (std clamped to 1e-6, mean 1) must not be folded into
    the bias, where float32 cancellation would cost accuracy."""
    mean = np.linspace(0, 2, N)
    mean[-1] = 1.0
    std = np.ones(N)
    std[-1] = 1e-6
    mlp = small_mlp(seed=4, mean=mean, std=std)
    meta = small_meta(64)
    meta["parity_features"][:, -1] = 1.0  # as in training: the feature never moves
    report = export_controller(mlp, meta, tmp_path / "c.onnx", latency_calls=0)
    assert report["rewrites"]["scaling"]["features"].startswith("std folded")
    model = onnx.load(tmp_path / "c.onnx")
    assert _consumers(model, "features") == ["Sub"]
    sub = next(n for n in model.graph.node if "features" in n.input)
    assert _consumers(model, sub.output[0]) == ["Gemm"]  # the Div is folded all the same
    assert report["parity"]["max_abs_diff_expected_tokens"] < 1e-4


def test_relu_networks_export_lean_and_match_torch_and_numpy(tmp_path):
    """ReLU (the default of training) exports as Relu nodes that onnxruntime fuses into their
    Gemm, the survival head has no CumSum (products with triangular constants), and the
    graph, PyTorch and the numpy reference agree on both decisions."""
    import onnxruntime as ort

    torch.manual_seed(7)
    mlp = SurvivalMLP(N, GAMMA_MAX, hidden=(16, 16), activation="relu")
    pre_mlp = SurvivalMLP(M, GAMMA_MAX, hidden=(16, 16), activation="relu")
    lookup_mlp = SurvivalMLP(K, LOOKUP_MAX_TOKENS, hidden=(16, 16), activation="relu")
    with torch.no_grad():
        mlp.net[-1].bias.add_(1.5)
    meta = {**small_meta(64), "pre_mlp": pre_mlp, "lookup_mlp": lookup_mlp}
    out = tmp_path / "relu.onnx"
    report = export_controller(mlp, meta, out, latency_calls=0)
    assert report["parity"]["max_abs_diff_expected_tokens"] < 1e-4
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("Relu") == 6 and "Gelu" not in ops and "CumSum" not in ops
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert "Relu" not in fused and len(fused) < len(ops)
    features, costs = rows(12, 64)
    gamma, expected, _ = torch_outputs(mlp, features, costs)
    ref = NumpyController.load(out).predict(features, costs)
    got = Controller.load(out).predict(features, costs)
    np.testing.assert_allclose(ref.expected_tokens, expected, atol=1e-5)
    np.testing.assert_allclose(got.expected_tokens, expected, atol=1e-5)
    decided = decided_rows(expected, costs)
    np.testing.assert_array_equal(ref.gamma[decided], gamma[decided])
    np.testing.assert_array_equal(got.gamma[decided], gamma[decided])


def test_a_checkpoint_without_an_activation_loads_as_gelu():
    """Checkpoints from before ``activation`` existed were GELU networks."""
    mlp = SurvivalMLP(N, GAMMA_MAX, hidden=(4,))
    assert isinstance(mlp.net[1], torch.nn.GELU)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        SurvivalMLP(N, GAMMA_MAX, activation="tanh")


def test_synthetic_parity_rows_without_checkpoint_rows(tmp_path):
    meta = {"feature_names": list(FEATURE_NAMES), "gammas": list(GAMMAS),
            "pre_mlp": small_pre_mlp(5), "lookup_mlp": small_lookup_mlp(5)}
    report = export_controller(small_mlp(seed=5), meta, tmp_path / "c.onnx", latency_calls=0)
    assert report["parity"]["source"] == "synthetic"
    assert report["metadata"]["speckv.data_fingerprint"] == "unknown"


def test_numpy_reference_reads_the_exported_graph(exported):
    mlp, out, _, _, _ = exported
    features, costs = rows(9, 50)
    ref = NumpyController.load(out).predict(features, costs)
    gamma, expected, _ = torch_outputs(mlp, features, costs)
    np.testing.assert_array_equal(ref.gamma, gamma)
    np.testing.assert_allclose(ref.expected_tokens, expected, atol=1e-5)


@pytest.mark.parametrize("change, pattern", [
    ({"feature_names": list(FEATURE_NAMES[:-1])}, "9 feature names"),
    ({"gammas": [0, 1, 2]}, "increasing positive integers"),
    ({"gammas": list(range(1, 10))}, "need 9"),
    ({"parity_costs": np.ones((3, G), np.float32)}, "parity rows have shapes"),
    ({"pre_feature_names": list(PRE_FEATURE_NAMES[:-1])}, "7 pre-draft feature names"),
    ({"pre_mlp": None}, r"no pre-draft network.*speckv.train fit.*speckv export"),
    ({"lookup_mlp": None}, r"no lookup network.*speckv.train fit.*speckv export"),
    ({"lookup_feature_names": list(LOOKUP_FEATURE_NAMES[1:])}, "lookup features"),
])
def test_inconsistent_metadata_is_refused(tmp_path, change, pattern):
    meta = {**small_meta(16), **change}
    with pytest.raises(ExportError, match=pattern):
        export_controller(small_mlp(), meta, tmp_path / "c.onnx", latency_calls=0)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- atomic write
def _corrupting_simplify(model):
    """The real simplification, then a silent bug: the first layer's weights doubled."""
    report = real_simplify(model)
    first = next(n for n in model.graph.node if n.op_type == "Gemm")
    from onnx import numpy_helper

    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == first.input[1]:
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(2 * numpy_helper.to_array(tensor), tensor.name))
    return report


real_simplify = export_mod.simplify


def test_a_wrong_graph_fails_parity_and_keeps_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "speckv.onnx"
    export_controller(small_mlp(), small_meta(64), out, latency_calls=0)
    good = out.read_bytes()
    monkeypatch.setattr(export_mod, "simplify", _corrupting_simplify)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_controller(small_mlp(seed=1), small_meta(64), out, latency_calls=0)
    assert out.read_bytes() == good
    # no temporary left, and the JSON beside the file still describes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speckv.json", "speckv.onnx"]
    check_sidecar(out)


class _Float32Drift(torch.nn.Module):
    """The export graph, but its float32 evaluation is off by ``drift`` on expected tokens
    (as PyTorch's float32 CPU kernels once were, 1.6e-4, in one of many identical runs);
    in float64 it is exact."""

    def __init__(self, graph, drift: float, in_float64: bool = False) -> None:
        super().__init__()
        self.graph, self.drift, self.in_float64 = graph, drift, in_float64

    def forward(self, *inputs):
        out = list(self.graph(*inputs))
        if out[2].dtype == torch.float32 or self.in_float64:
            out[2] = out[2] + self.drift
        return tuple(out)


def test_parity_is_judged_against_float64_not_pytorchs_float32(tmp_path):
    mlp, meta = small_mlp(), small_meta(64)
    info = export_mod.controller_info(mlp, meta)
    graph = export_mod.torch_graph(mlp, info, meta["pre_mlp"], meta["lookup_mlp"])
    path = tmp_path / "c.onnx"
    model = export_mod.to_onnx(graph, info)
    export_mod.annotate(model, info)
    path.write_bytes(model.SerializeToString())
    parity_rows = export_mod.parity_rows(mlp, meta, info)
    report = export_mod.check_parity(_Float32Drift(graph, 5e-4), path, parity_rows, info)
    assert report["reference"] == "torch float64"
    assert report["max_abs_diff_expected_tokens"] < 1e-5
    assert report["torch_float32_max_abs_diff_expected_tokens"] == pytest.approx(5e-4, rel=0.05)
    # the file off by as much from the exact function still fails
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_mod.check_parity(_Float32Drift(graph, 5e-4, in_float64=True), path, parity_rows,
                                info)


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "speckv.onnx"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export_controller(small_mlp(), small_meta(16), out, latency_calls=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ CLI
def _checkpoint(path: Path, mlp: SurvivalMLP, meta: dict) -> Path:
    """A file shaped like a Lightning checkpoint of speckv.train.module.SpeckvModule
    (without a pre-draft or lookup network when ``meta`` has None or none: one written before
    it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    pre_mlp = meta.pop("pre_mlp")
    lookup_mlp = meta.pop("lookup_mlp", None)
    state = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    config = {"gamma_max": GAMMA_MAX, "hidden": [16, 16], "dropout": 0.1}
    meta["mlp_config"] = {"n_features": N, **config}
    if pre_mlp is not None:
        state |= {f"pre_mlp.{k}": v for k, v in pre_mlp.state_dict().items()}
        meta["pre_mlp_config"] = {"n_features": M, **config}
    if lookup_mlp is not None:
        state |= {f"lookup_mlp.{k}": v for k, v in lookup_mlp.state_dict().items()}
        meta["lookup_mlp_config"] = {**config, "n_features": K, "gamma_max": LOOKUP_MAX_TOKENS}
    torch.save({"state_dict": state, "speckv": meta}, path)
    return path


def test_cli_exports_the_newest_checkpoint(tmp_path, capsys, monkeypatch):
    from speckv.__main__ import main

    monkeypatch.chdir(tmp_path)
    old = _checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/a.ckpt",
                      small_mlp(seed=7), small_meta(32))
    new = _checkpoint(tmp_path / "lightning_logs/version_1/checkpoints/b.ckpt",
                      small_mlp(seed=8), small_meta(32))
    stamp = old.stat().st_mtime
    os.utime(new, (stamp + 10, stamp + 10))
    assert find_checkpoint(None) == Path("lightning_logs/version_1/checkpoints/b.ckpt")
    assert main(["export", "--out", "out/c.onnx", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"].endswith("b.ckpt")
    assert report["parity"]["gamma_mismatches"] == 0
    features, costs = rows(3, 20)
    got = Controller.load(tmp_path / "out/c.onnx").choose_batch(features, costs)
    np.testing.assert_array_equal(got, torch_outputs(small_mlp(seed=8), features, costs)[0])


def test_cli_refuses_a_checkpoint_without_the_pre_draft_network(tmp_path, capsys):
    """A checkpoint trained before format 2 cannot say when not to speculate: retrain."""
    from speckv.__main__ import main

    ckpt = _checkpoint(tmp_path / "old.ckpt", small_mlp(), {**small_meta(16), "pre_mlp": None})
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no pre-draft network" in err and "speckv.train fit" in err
    assert not (tmp_path / "c.onnx").exists()


def test_cli_on_a_directory_and_text_summary(tmp_path, capsys):
    from speckv.__main__ import main

    ckpt = _checkpoint(tmp_path / "run/checkpoints/epoch=1.ckpt", small_mlp(), small_meta(16))
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--out",
                 str(tmp_path / "c.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"from      {ckpt}" in out and "latency" in out
    assert "γ, speculate and lookup identical" in out


@pytest.mark.parametrize("content, pattern", [
    (b"definitely not a checkpoint", "Cannot read checkpoint"),
    (None, "not a speckv checkpoint"),
])
def test_cli_refuses_a_file_that_is_not_a_speckv_checkpoint(tmp_path, capsys, content,
                                                           pattern):
    from speckv.__main__ import main

    bad = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"state_dict": {}}, bad)
    else:
        bad.write_bytes(content)
    out = tmp_path / "c.onnx"
    assert main(["export", "--ckpt", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "speckv export: error:" in err and pattern in err
    assert not out.exists()


def test_cli_without_any_checkpoint(tmp_path, capsys, monkeypatch):
    from speckv.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["export"]) == 2
    assert "speckv.train fit" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--ckpt", "empty"]) == 2
    assert "no *.ckpt" in capsys.readouterr().err


# How far a float32 value of the controller graph may move between CPUs. Kernels for AVX2,
# AVX-512 and AMX order reductions differently, and each float32 rounding may then land up to
# eps/2 (relative) elsewhere. Expected tokens are reached through about DEPTH = 66 roundings in
# sequence: three Gemm reductions of 10, 16 and 16 terms plus a bias each (11 + 17 + 17),
# log-sigmoid (3), a cumulative sum of 8 log-survivals (8), exp (1), a cumulative sum of 8
# survivals (8) and the +1 (1). Counting each as eps relative to the final value (to first
# order: the survivals are positive and at most 1, so the last sums do not cancel; the Gemm
# terms could, so this is an estimate, not a proof) gives |Δ| <= DEPTH * eps * |value|:
# 7.9e-6 relative, 4.6e-5 at the largest expected tokens (5.8). An AVX2 machine moved 102 of
# the 512 values by up to 9.5e-7 (two ulps); a changed controller moves them by far more.
F32_EPS = float(np.finfo(np.float32).eps)
DEPTH = 11 + 17 + 17 + 3 + 8 + 1 + 8 + 1
RTOL_EXPECTED = DEPTH * F32_EPS


def decided_rows(expected: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Rows whose best and second-best tokens per second lie further apart than float32 can
    move them: each objective is off by at most (DEPTH + 1) eps relative (the division adds
    one rounding), so two of them cannot swap unless they differ by twice that."""
    objective = np.sort(expected.astype(np.float64) / costs, axis=1)
    margin = (objective[:, -1] - objective[:, -2]) / objective[:, -1]
    return margin > 2 * (DEPTH + 1) * F32_EPS


def test_the_committed_runtime_fixture_is_current(tmp_path):
    """The fixture script, rerun, reproduces the committed golden outputs (to float32
    rounding on this CPU; the γ exactly wherever float32 cannot decide it otherwise)."""
    script = runpy.run_path(str(ROOT / "scripts" / "make_runtime_fixture.py"))
    onnx_path, expected_path = script["make_fixture"](tmp_path)
    fresh, committed = np.load(expected_path), np.load(ROOT / "tests/fixtures" /
                                                       expected_path.name)
    np.testing.assert_array_equal(fresh["costs"], committed["costs"])  # numpy arithmetic only
    # log1p(position) comes from numpy's libm or SIMD routine, which may round differently on
    # another CPU (in float64, nearly always hidden by the cast to float32)
    np.testing.assert_array_max_ulp(fresh["features"], committed["features"], maxulp=1)
    np.testing.assert_allclose(fresh["expected_tokens"], committed["expected_tokens"],
                               rtol=RTOL_EXPECTED, atol=0)
    decided = decided_rows(committed["expected_tokens"], committed["costs"])
    assert decided.mean() >= 0.9, "most rows should decide γ by more than float32 rounding"
    np.testing.assert_array_equal(fresh["gamma"][decided], committed["gamma"][decided])
    old = Controller.load(ROOT / "tests/fixtures" / onnx_path.name)
    np.testing.assert_array_equal(
        old.choose_batch(fresh["features"], fresh["costs"])[decided], fresh["gamma"][decided])
    # the pre-draft decision, wherever float32 cannot tip it
    np.testing.assert_allclose(fresh["pre_expected_tokens"], committed["pre_expected_tokens"],
                               rtol=RTOL_EXPECTED, atol=0)
    margin = np.abs(np.max(committed["pre_expected_tokens"].astype(np.float64)
                           / committed["costs"], 1) * committed["plain_cost"][:, 0] - 1)
    clear = margin > 2 * (DEPTH + 2) * F32_EPS
    assert clear.mean() >= 0.9
    np.testing.assert_array_equal(fresh["speculate"][clear], committed["speculate"][clear])
