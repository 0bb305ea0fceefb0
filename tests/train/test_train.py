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
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMA_MAX,
    MAX_SKIP_RUN,
    PRE_FEATURE_NAMES,
    UNSETTLED_CAP,
)
from speckv.train.cli import main as train_main
from speckv.train.datamodule import SpeckvDataModule
from speckv.train.module import HPARAMS_METRICS, survival_nll
from speckv.train.network import load_checkpoint


@pytest.fixture(scope="module")
def record_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "r.parquet"
    return write_records(make_records(prompts_per_task=6, min_len=20, max_len=40, seed=0), path)


def fit_args(records: Path, root: Path, *extra: str) -> list[str]:
    """`python -m speckv.train fit` on ``records`` into ``root``, quietly, every step logged."""
    return ["fit", "--data.records", str(records), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            *extra]


def read_events(run: Path):
    """A run's TensorBoard event files, through TensorBoard's own reader (everything kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0,
                                                    "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_records(acc) -> dict:
    """The run's HParams records (experiment, session start and end), parsed."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return {tag.removeprefix("_hparams_/"): HParamsPluginData.FromString(content)
            for tag, content in acc.PluginTagToContent("hparams").items()}


def first_screen(tags: list[str]) -> list[str]:
    """The tag groups TensorBoard's Time Series view opens on a fresh page: it sorts every
    card's tag ("/" and digits first, then by character code, so capitals before lowercase),
    groups them by the part before the first "/", and expands the first two groups
    (tensorboard 2.21, webfiles.zip). Python's sort is the same for these tags."""
    groups = dict.fromkeys(tag.split("/", 1)[0] for tag in sorted(tags))
    return list(groups)[:2]


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
    assert train_main(fit_args(record_file, root, "--trainer.max_epochs", "3")) == 0
    version = root / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file()
    ckpts = sorted((version / "checkpoints").glob("*.ckpt"))  # the newest epoch's, and last
    assert [c.name for c in ckpts] == ["epoch=2-step=6.ckpt", "last.ckpt"]
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
    assert read_events(version).Scalars("val/auroc_s1")[-1].value > 0.6, \
        "the controller learned nothing"

    test_args = ["test", "--data.records", str(record_file), "--ckpt_path", str(ckpts[0]),
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
                 "false"]
    assert train_main(test_args) == 0
    tested = read_events(root / "lightning_logs" / "version_1").Tags()
    assert {"Tokens per second/test", "Loss/test", "test/gain_over_best_static"} <= set(
        tested["scalars"])
    assert {"test/calibration", "test/choices"} <= set(tested["images"])


def test_tensorboard_shows_losses_throughput_schedule_and_choices(record_file, tmp_path):
    """What TensorBoard shows of a short fit: the headline groups on its first screen, a
    per-step loss, the learning rate, the choices and calibration per compression, all on
    one x-axis (the tags, not their values)."""
    root = tmp_path / "runs"
    assert train_main(fit_args(record_file, root, "--trainer.max_epochs", "2")) == 0
    acc = read_events(root / "lightning_logs" / "version_0")
    tags = acc.Tags()
    scalars, images, histograms = (set(tags[kind]) for kind in
                                   ("scalars", "images", "histograms"))
    per_level = {f"Tokens per second/val/{c}" for c in COMPRESSIONS}
    assert {"Loss/train_step", "Loss/train_epoch", "Loss/val", "Tokens per second/val",
            *per_level} <= scalars
    assert first_screen([*scalars, *images, *histograms]) == ["Loss", "Tokens per second"]
    # a curve per training step, the cosine schedule beside it
    assert len(acc.Scalars("Loss/train_step")) > len(acc.Scalars("Loss/val"))
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert len(lr) == len(acc.Scalars("Loss/train_step")) and lr[-1] < lr[0]
    # the loss's two parts are named by network; only Lightning's own suffixes end in _step
    assert {"val/nll_gamma_net", "val/nll_speculate_net", "train/nll_gamma_net"} <= scalars
    assert sorted(t for t in scalars if t.endswith(("_step", "_epoch"))) == [
        "Loss/train_epoch", "Loss/train_step"]
    assert {f"val/skip_rate/{c}" for c in COMPRESSIONS} <= scalars
    assert "hp_metric" not in scalars
    # the controller's choices per compression: every held-out step counted once
    assert {f"val/choice/{c}" for c in COMPRESSIONS} <= histograms
    assert {"val/calibration", "val/choices"} <= images
    dm = SpeckvDataModule(records=str(record_file))
    dm.setup("fit")
    last = [acc.Histograms(f"val/choice/{c}")[-1].histogram_value for c in COMPRESSIONS]
    assert sum(h.num for h in last) == dm.split_sizes["val"]
    assert all(h.min >= 0 and h.max <= GAMMA_MAX for h in last)
    # one x-axis: figures and histograms at the steps of the scalars they sit beside
    val_steps = [e.step for e in acc.Scalars("Tokens per second/val")]
    assert [e.step for e in acc.Images("val/calibration")] == val_steps
    assert [e.step for e in acc.Images("val/choices")] == val_steps
    assert [e.step for e in acc.Histograms("val/choice/fp16")] == val_steps


def test_hparams_compares_runs_by_held_out_results(record_file, tmp_path):
    """Two runs with different learning rates: HParams lists each with what was tuned and
    the held-out results it ranks them by, which each run logs as scalars."""
    root = tmp_path / "runs"
    for lr in ("0.003", "0.01"):
        args = fit_args(record_file, root, "--trainer.max_epochs", "1", "--model.lr", lr)
        assert train_main(args) == 0
    seen_lr = []
    for version in ("version_0", "version_1"):
        acc = read_events(root / "lightning_logs" / version)
        records = hparams_records(acc)
        assert set(records) == {"experiment", "session_start_info", "session_end_info"}
        metrics = [m.name.tag for m in records["experiment"].experiment.metric_infos]
        assert metrics == list(HPARAMS_METRICS)
        assert {"Tokens per second/val", "val/gain_over_best_static"} <= set(metrics)
        assert set(metrics) <= set(acc.Tags()["scalars"]), "HParams reads the run's scalars"
        assert "hp_metric" not in acc.Tags()["scalars"]
        hparams = records["session_start_info"].session_start_info.hparams
        assert {"model.lr", "model.hidden", "data.batch_size", "trainer.max_epochs",
                "seed_everything"} <= set(hparams)
        assert not {"_instantiator", "data.num_workers", "num_workers", "records",
                    "gammas", "feature_names"} & set(hparams), "only what a person tunes"
        assert hparams["model.hidden"].string_value == "32-32"
        assert hparams["data.records"].string_value == record_file.stem
        seen_lr.append(hparams["model.lr"].number_value)
        assert records["session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    assert seen_lr == [0.003, 0.01]


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


def _fit_small(dm, epochs: int):
    """A 16-unit controller fitted on ``dm`` for ``epochs``, seeded, without logs or saves."""
    import lightning as L

    from speckv.train.module import SpeckvModule

    model = SpeckvModule(len(FEATURE_NAMES), list(range(1, GAMMA_MAX + 1)), list(FEATURE_NAMES),
                         hidden=[16], lr=1e-2, trees=dm.trees)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", deterministic=True)
    torch.manual_seed(0)
    trainer.fit(model, dm)
    return trainer, model


def test_the_controller_learns_to_take_the_lookup_where_it_pays(tmp_path):
    """Records where the lookup's continuation is accepted whole when its match is 3 or 4
    tokens and never when it is 1 or 2, and the draft is mediocre: the trained controller
    takes the lookup on the long matches, declines it on the short ones, and its exported
    file (format 4) decides as the checkpoint does."""
    from synthetic import add_trees_and_lookup

    from speckv.export.graph import export_controller
    from speckv.runtime import Controller

    df = add_trees_and_lookup(make_records(prompts_per_task=4, min_len=20, max_len=40, seed=4))
    length = df["lookup_length"].to_numpy(np.int64)
    match = df["lookup_match"].to_numpy(np.int64)
    left = (df["seq_len"] - df["position"]).to_numpy()
    df["lookup_accept"] = pd.array(np.where(match >= 3, np.minimum(length, left), 0),
                                   dtype="Int16")
    path = write_records(df, tmp_path / "lookup.parquet")
    dm = SpeckvDataModule(records=str(path), batch_size=256)
    trainer, _ = _fit_small(dm, epochs=40)
    assert float(trainer.callback_metrics["val/lookup_rate"]) > 0.05

    trainer.save_checkpoint(tmp_path / "l.ckpt")
    mlp, meta = load_checkpoint(tmp_path / "l.ckpt")
    assert meta["lookup_feature_names"] == list(dm.lookup_feature_names)
    report = export_controller(mlp, meta, tmp_path / "l.onnx", latency_calls=0)
    assert report["parity"]["lookup_mismatches"] == 0
    _, pre, costs, plain, look, look_cost = dm.parity_rows
    proposed = look[:, 0] > 0
    pred = Controller.load(tmp_path / "l.onnx").predict_lookup(look, look_cost, pre, costs, plain)
    take = pred.lookup
    long_match = look[:, 1] >= 3
    assert take[proposed & long_match].mean() > 0.8
    assert take[proposed & ~long_match].mean() < 0.2


def test_the_controller_learns_to_choose_trees_where_they_pay(tmp_path):
    """Records where the draft's first guess is always wrong but its trees always accept
    their whole depth: the trained controller verifies trees, and the exported file (format
    3: chains and trees) decides as the checkpoint does."""
    from synthetic import add_trees_and_lookup

    from speckv.export.graph import export_controller
    from speckv.runtime import Controller
    from speckv.runtime.proposal import TREES
    from speckv.train.network import ControllerGraph

    df = add_trees_and_lookup(make_records(prompts_per_task=4, min_len=20, max_len=40, seed=3))
    df["accept_len"] = np.int16(0)
    cap = df["accept_cap"].to_numpy()
    df["tree_accept_len"] = [np.minimum([t.depth for t in TREES], c).astype(np.float32)
                             for c in cap]
    path = write_records(df, tmp_path / "trees.parquet")
    dm = SpeckvDataModule(records=str(path), batch_size=256)
    assert dm.trees == [[t.size, t.depth, t.branch] for t in TREES]
    trainer, model = _fit_small(dm, epochs=12)
    assert float(trainer.callback_metrics["val/skip_rate"]) < 0.05
    features, _, costs = dm.parity_rows[:3]
    graph = ControllerGraph(model.mlp.eval(), model.gammas, model.pre_mlp.eval(), model.trees)
    with torch.inference_mode():
        choice = graph(torch.from_numpy(features), torch.from_numpy(costs))[0].numpy()
    assert (choice > GAMMA_MAX).mean() > 0.9  # trees, nearly always

    trainer.save_checkpoint(tmp_path / "t.ckpt")
    mlp, meta = load_checkpoint(tmp_path / "t.ckpt")
    assert meta["trees"] == dm.trees
    report = export_controller(mlp, meta, tmp_path / "t.onnx", latency_calls=0)
    assert report["parity"]["gamma_mismatches"] == 0
    controller = Controller.load(tmp_path / "t.onnx")
    assert controller.n_options == GAMMA_MAX + len(TREES)
    np.testing.assert_array_equal(controller.choose_batch(features, costs), choice)
