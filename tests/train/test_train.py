"""The training framework end to end: LightningCLI fit/test on records, TensorBoard output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from locations import PAPER_CSV
from synthetic import make_records

from speckv.records import write_records
from speckv.runtime.costs import drafting_costs
from speckv.runtime.features import (
    FEATURE_NAMES,
    GAMMA_MAX,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
    UNSETTLED_CAP,
)
from speckv.train.cli import main as train_main
from speckv.train.datamodule import SpeckvDataModule
from speckv.train.module import survival_nll
from speckv.train.network import load_checkpoint


@pytest.fixture(scope="module")
def record_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "r.parquet"
    return write_records(make_records(prompts_per_task=6, min_len=20, max_len=40, seed=0), path)


def test_survival_nll_matches_hand_computed_likelihood():
    z = torch.tensor([[0.3, -0.2, 1.0], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    s = torch.sigmoid(z)
    # row 0: exactly 1 accepted of cap 3; row 1: censored at cap 2; row 2: cap 0 (no info)
    nll = survival_nll(z, torch.tensor([1, 2, 0]), torch.tensor([3, 2, 0]))
    expected = -(torch.log(s[0, 0] * (1 - s[0, 1])) + torch.log(s[1, 0] * s[1, 1])) / 2
    assert torch.isclose(nll, expected, atol=1e-6)


def test_datamodule_splits_by_prompt_and_scales_on_train_only(record_file):
    dm = SpeckvDataModule(records=str(record_file), val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert dm.feature_set == "decision" and dm.n_features == len(FEATURE_NAMES)
    x_train = dm._splits["train"].tensors[0].numpy()
    np.testing.assert_allclose(dm.mean, x_train.mean(0), rtol=1e-5, atol=1e-6)
    assert sum(dm.split_sizes.values()) == len(pd.read_parquet(record_file))
    dm.setup("fit")  # idempotent
    assert dm._splits["train"].tensors[0].shape[0] == dm.split_sizes["train"]


def test_datamodule_builds_pre_draft_examples_as_the_decoder_would_see_them(tmp_path):
    """Each trace row also gives a pre-draft example: the history u positions back (u drawn
    per row), u itself, and costs with a catch-up over u + 1 tokens."""
    df = make_records(prompts_per_task=4, min_len=30, max_len=40, seed=1, compressions=("fp16",))
    df["cost_catchup_s"] = [np.asarray([0.009, 0.011, 0.013, 0.015], np.float32)] * len(df)
    path = write_records(df, tmp_path / "r.parquet")
    dm = SpeckvDataModule(records=str(path), val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert dm.pre_feature_names == list(PRE_FEATURE_NAMES) and dm.max_skip_run == MAX_SKIP_RUN
    data = dm.batch_dict(dm._splits["train"].tensors)
    x, x_pre = data["x"].numpy(), data["x_pre"].numpy()
    u = np.rint(x_pre[:, 3] * UNSETTLED_CAP).astype(int)
    assert set(u.tolist()) == set(range(UNSETTLED_CAP + 1))  # every staleness (capped) occurs
    np.testing.assert_array_equal(x_pre[:, 0], x[:, 3])  # target's confidence: not stale
    np.testing.assert_array_equal(x_pre[:, 4:], x[:, 6:])  # position and compression
    fresh = u == 0
    np.testing.assert_array_equal(x_pre[fresh, 1:3], x[fresh, 4:6])
    assert (x_pre[~fresh, 1] != x[~fresh, 4]).mean() > 0.5  # stale history differs mostly
    verify = np.stack(df["cost_verify_s"].to_numpy())[:1]
    for n in (1, 3, 9):
        rows = u == n - 1
        want = drafting_costs(float(df["cost_draft_s"].iat[0]), verify[0],
                              [0.009, 0.011, 0.013, 0.015], n)
        np.testing.assert_allclose(data["costs"].numpy()[rows], np.tile(want, (rows.sum(), 1)),
                                   rtol=1e-6)
    np.testing.assert_allclose(data["plain_cost"].numpy(), verify[0, 0], rtol=1e-6)
    np.testing.assert_allclose(dm.pre_mean, x_pre.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, most", [("lm", MAX_SKIP_RUN + 1),  # a bonus token, then plain
                                         ("feature", GAMMA_MAX + MAX_SKIP_RUN)])  # 8, then plain
def test_pre_draft_examples_cover_the_staleness_the_decoder_leaves(tmp_path, kind, most):
    """A feature draft leaves every token of a fully accepted step but the first unsettled, so
    its decoder can reach 24 unsettled tokens (a catch-up over 25): training covers all of
    them, and no more; a causal-LM draft reaches 17."""
    df = make_records(prompts_per_task=6, min_len=45, max_len=50, seed=2, compressions=("fp16",))
    step = 0.002  # catch-up seconds per token, so the costs tell each row's u
    df["cost_catchup_s"] = [np.asarray(0.009 + step * np.arange(4), np.float32)] * len(df)
    df["draft_kind"] = kind
    dm = SpeckvDataModule(records=str(write_records(df, tmp_path / "r.parquet")))
    dm.setup("fit")
    data = dm.batch_dict(dm._splits["train"].tensors)
    verify = float(df["cost_verify_s"].iat[0][1])
    u = np.rint((data["costs"].numpy()[:, 0] - verify - 0.009) / step).astype(int)
    assert set(u.tolist()) == set(range(most + 1))


def test_fit_then_test_writes_checkpoint_config_and_tensorboard(record_file, tmp_path):
    root = tmp_path / "runs"
    args = ["fit", "--data.records", str(record_file), "--trainer.max_epochs", "3",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    assert train_main(args) == 0
    version = root / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file()
    ckpts = list((version / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    mlp, meta = load_checkpoint(ckpts[0])
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert meta["gammas"] == list(range(1, GAMMA_MAX + 1))
    assert len(meta["data_fingerprint"]) == 16
    assert mlp.std.min() > 0 and not torch.allclose(mlp.std, torch.ones_like(mlp.std)), \
        "train-split scaling must be baked into the network"
    surv = mlp.survival(torch.as_tensor(np.asarray(meta["parity_features"]))).detach()
    assert (surv[:, 1:] <= surv[:, :-1] + 1e-7).all(), "survival must be non-increasing"
    assert meta["pre_feature_names"] == list(PRE_FEATURE_NAMES)
    assert meta["max_skip_run"] == MAX_SKIP_RUN
    pre_mlp = meta["pre_mlp"]
    assert not torch.allclose(pre_mlp.std, torch.ones_like(pre_mlp.std))

    # the checkpoint exports to a format-2 file the runtime runs, both decisions
    from speckv.export.graph import export_controller
    from speckv.runtime import Controller

    report = export_controller(mlp, meta, tmp_path / "c.onnx", latency_calls=0)
    assert report["parity"]["source"] == "checkpoint"
    controller = Controller.load(tmp_path / "c.onnx")
    pre = np.asarray(meta["parity_pre_features"])
    costs, plain = np.asarray(meta["parity_costs"]), np.asarray(meta["parity_plain_costs"])
    assert controller.speculate_batch(pre, costs, plain).shape == (len(pre),)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(version), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"val/loss", "val/tokens_per_s", "val/auroc_s1", "train/loss", "val/loss_pre",
            "val/skip_rate", "val/best_static_tokens_per_s"} <= set(tags["scalars"])
    assert "val/calibration" in tags["images"]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    assert acc.Scalars("val/auroc_s1")[-1].value > 0.6, "the controller learned nothing"

    test_args = ["test", "--data.records", str(record_file), "--ckpt_path", str(ckpts[0]),
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                 "false"]
    assert train_main(test_args) == 0


def test_training_learns_not_to_speculate_where_it_never_pays(tmp_path):
    """A draft as slow as the target: the pre-draft network learns to decline, and the
    logged policy beats no baseline by drafting (its value equals plain decoding's)."""
    import lightning as L

    from speckv.train.module import SpeckvModule

    df = make_records(prompts_per_task=4, min_len=20, max_len=40, seed=2)
    df["cost_draft_s"] = np.float32(0.2)  # a draft token costs several target steps
    path = write_records(df, tmp_path / "slow.parquet")
    dm = SpeckvDataModule(records=str(path), batch_size=256)
    model = SpeckvModule(len(FEATURE_NAMES), list(range(1, GAMMA_MAX + 1)), list(FEATURE_NAMES),
                         hidden=[16], lr=1e-2)
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", deterministic=True)
    torch.manual_seed(0)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics
    assert float(logged["val/skip_rate"]) > 0.95
    assert float(logged["val/gain_over_best_static"]) == pytest.approx(1.0, abs=0.02)
    assert float(logged["val/gain_over_best_fixed"]) > 1.5


@pytest.mark.parametrize("records, match", [
    ("missing.parquet", "does not exist"),
    ("nothing-*.parquet", "No step records match"),
])
def test_fit_on_bad_records_exits_2_with_a_message(tmp_path, records, match):
    proc = subprocess.run(
        [sys.executable, "-m", "speckv.train", "fit", "--data.records", str(tmp_path / records)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2
    assert match in proc.stderr and "Traceback" not in proc.stderr




@pytest.mark.skipif(not PAPER_CSV.is_file(), reason="the seed paper's CSV is not beside the repo")
def test_imported_paper_rows_train_an_acceptance_predictor(tmp_path):
    from speckv.records import PAPER_FEATURE_NAMES, import_paper

    path = tmp_path / "paper.parquet"
    import_paper(PAPER_CSV, path)
    dm = SpeckvDataModule(records=str(path))
    dm.setup("fit")
    assert dm.feature_set == "paper" and dm.feature_names == list(PAPER_FEATURE_NAMES)
    # generations, not rows, are split: 240 generations, none in two splits
    assert sum(dm.split_sizes.values()) == 5112
    root = tmp_path / "runs"
    assert train_main(["fit", "--data.records", str(path), "--trainer.max_epochs", "2",
                       "--trainer.default_root_dir", str(root),
                       "--trainer.enable_progress_bar", "false"]) == 0
    ckpt = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    _, meta = load_checkpoint(ckpt)
    assert meta["feature_set"] == "paper"
    assert "pre_mlp" in meta  # no history: its prior values, position and compression
