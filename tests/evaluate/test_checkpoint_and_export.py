"""`speckv evaluate --ckpt C` scores the policy that `speckv export --ckpt C` writes: the
same two decisions (speculate or not, then γ), replay for replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import fit_survival_mlp, make_records, save_checkpoint

from speckv.__main__ import main as speckv_main
from speckv.evaluate.pipeline import run
from speckv.policies import Learned, load_onnx_chooser
from speckv.records import split_prompts, write_records
from speckv.train.chooser import TorchChooser

pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def records():
    # catch-ups measured to grow faster than one draft token, so long ones cost more
    df = make_records(prompts_per_task=6, min_len=20, max_len=90, seed=5)
    draft = float(df["cost_draft_s"].iat[0])
    df["cost_catchup_s"] = [np.asarray(draft * (1 + 0.5 * np.arange(8)), np.float32)] * len(df)
    return df


@pytest.fixture(scope="module")
def checkpoint_and_export(records, tmp_path_factory):
    """A checkpoint of both networks fitted on the train prompts, and its exported file."""
    train = records[split_prompts(records) == "train"]
    folder = tmp_path_factory.mktemp("controller")
    import torch

    from speckv.runtime.features import LOOKUP_FEATURE_NAMES, LOOKUP_MAX_TOKENS
    from speckv.train.network import SurvivalMLP

    torch.manual_seed(0)
    lookup = SurvivalMLP(len(LOOKUP_FEATURE_NAMES), LOOKUP_MAX_TOKENS, hidden=(16, 16))
    ckpt = save_checkpoint(fit_survival_mlp(train, steps=150),
                           fit_survival_mlp(train, steps=150, pre=True), folder / "c.ckpt",
                           lookup_mlp=lookup)
    onnx = folder / "c.onnx"
    assert speckv_main(["export", "--ckpt", str(ckpt), "--out", str(onnx), "--json"]) == 0
    return ckpt, onnx


def test_the_checkpoint_and_its_exported_file_replay_alike(records, checkpoint_and_export):
    ckpt, onnx = checkpoint_and_export
    _, _, from_ckpt = run(records, Learned(TorchChooser.load(ckpt)), resamples=10)
    _, _, from_file = run(records, Learned(load_onnx_chooser(onnx)), resamples=10)
    a, b = from_ckpt["learned"], from_file["learned"]
    # both decisions were made: plain steps the pre-draft network chose, and several γs
    assert a.chosen[:, 0].sum() > 0 and np.count_nonzero(a.chosen[:, 1:].sum(0)) > 1
    np.testing.assert_array_equal(a.chosen, b.chosen)
    for part in ("tokens", "steps", "drafted", "accepted"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part), err_msg=part)
    np.testing.assert_allclose(a.time_s, b.time_s, rtol=1e-12)


def test_evaluate_reports_the_same_figures_for_both(records, checkpoint_and_export, tmp_path,
                                                    capsys):
    ckpt, onnx = checkpoint_and_export
    path = write_records(records, tmp_path / "syn.parquet")
    results = []
    for source in (["--ckpt", str(ckpt)], ["--controller", str(onnx)]):
        capsys.readouterr()
        assert speckv_main(["evaluate", "--records", str(path), *source, "--json",
                            "--resamples", "200"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    by_ckpt, by_file = results
    assert by_ckpt["policies"]["learned"] == by_file["policies"]["learned"]
    assert by_ckpt["gamma_chosen"]["learned"] == by_file["gamma_chosen"]["learned"]
    assert by_ckpt["p_value_vs_best_static"] == by_file["p_value_vs_best_static"]
