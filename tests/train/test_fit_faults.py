"""`python -m speckv.train fit` killed and resumed with ``--ckpt_path=last``: the resumed run
ends with the uninterrupted run's weights and optimizer state bit for bit (the data order's
random state comes back with the checkpoint), no temporary file is left, a damaged
checkpoint is skipped, and a checkpoint trained with other settings is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import run_speckv, temp_files, was_killed
from synthetic import make_records

from speckv.records import write_records
from speckv.train.cli import main as train_main

EPOCHS = 4


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "r.parquet"
    return write_records(make_records(prompts_per_task=6, min_len=20, max_len=40, seed=0), path)


def _args(records, root, *extra) -> list[str]:
    return ["fit", "--data.records", str(records), "--data.batch_size", "128",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", *extra]


def _final(root: Path) -> dict:
    """The newest run's last checkpoint."""
    last = sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"),
                  key=lambda p: int(p.parent.parent.name.split("_")[1]))[-1]
    return torch.load(last, map_location="cpu", weights_only=True)


def _assert_same_training(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] == EPOCHS - 1 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(),
                      b["optimizer_states"][0]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(records, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("whole")
    assert train_main(_args(records, root)) == 0
    return _final(root)


def test_two_uninterrupted_runs_agree_and_the_data_order_matters(records, uninterrupted,
                                                                  tmp_path):
    """The comparison below can tell a wrong data order: the same run with another
    shuffle seed ends elsewhere."""
    assert train_main(_args(records, tmp_path / "same")) == 0
    _assert_same_training(_final(tmp_path / "same"), uninterrupted)
    torch.manual_seed(1)  # seed_everything: false keeps this process's generator
    assert train_main(_args(records, tmp_path / "other", "--seed_everything", "false")) == 0
    other = _final(tmp_path / "other")
    assert not torch.equal(other["state_dict"]["mlp.net.0.weight"],
                           uninterrupted["state_dict"]["mlp.net.0.weight"])


# checkpoint writes per epoch: the epoch's checkpoint, then last.ckpt
@pytest.mark.parametrize("kill_at", [
    "*.ckpt@1",  # the first epoch's checkpoint: nothing to resume from, --ckpt_path=last
                 # trains from the start
    "*.ckpt@4",  # epoch 1's last.ckpt: epoch 1's own checkpoint is whole, resumed from there
    "*.ckpt@7",  # the last epoch's checkpoint: resumed from epoch 2
])
def test_a_killed_fit_resumes_to_the_uninterrupted_weights(records, uninterrupted, tmp_path,
                                                           kill_at):
    killed = run_speckv(_args(records, tmp_path), module="speckv.train", kill_at=kill_at)
    assert was_killed(killed), killed.stderr[-2000:]
    assert len(temp_files(tmp_path)) == 1
    resumed = run_speckv(_args(records, tmp_path, "--ckpt_path", "last"), module="speckv.train")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("training from the start" in resumed.stderr) == (kill_at == "*.ckpt@1")
    _assert_same_training(_final(tmp_path), uninterrupted)
    assert not temp_files(tmp_path)


def test_a_damaged_checkpoint_is_skipped_and_the_one_before_it_resumed(records, uninterrupted,
                                                                       tmp_path, caplog):
    killed = run_speckv(_args(records, tmp_path), module="speckv.train", kill_at="*.ckpt@5")
    assert was_killed(killed)
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = ckpts / "last.ckpt"  # epoch 1's; epoch 2's own checkpoint was killed
    last.write_bytes(last.read_bytes()[:1000])  # and a full disk truncated this one
    with caplog.at_level("WARNING"):
        assert train_main(_args(records, tmp_path, "--ckpt_path", "last")) == 0
    assert f"skipping checkpoint {last}" in caplog.text
    _assert_same_training(_final(tmp_path), uninterrupted)


def test_resuming_with_other_settings_is_refused(records, tmp_path, capsys):
    assert train_main(_args(records, tmp_path, "--trainer.max_epochs", "1")) == 0
    capsys.readouterr()
    assert train_main(_args(records, tmp_path, "--ckpt_path", "last", "--model.lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "--model.lr: 0.003 there, 0.01 here" in err and "leave out --ckpt_path" in err
    other = write_records(make_records(prompts_per_task=6, min_len=20, max_len=40, seed=1),
                          tmp_path / "other.parquet")
    assert train_main(_args(other, tmp_path, "--ckpt_path", "last")) == 2
    assert "the records' contents" in capsys.readouterr().err
    # a longer run of the same settings goes on from where the last one stopped
    assert train_main(_args(records, tmp_path, "--ckpt_path", "last")) == 0


def test_last_with_nothing_to_test_is_one_paragraph(records, tmp_path, capsys):
    args = ["test", "--data.records", str(records), "--ckpt_path", "last",
            "--trainer.default_root_dir", str(tmp_path)]
    assert train_main(args) == 2
    assert "no readable checkpoint" in capsys.readouterr().err


def test_a_log_folder_that_cannot_be_written_is_one_paragraph(records, tmp_path, monkeypatch,
                                                              capsys):
    """Lightning makes its own folders: the refusal still ends in one paragraph naming it."""
    import os

    folder = tmp_path / "ro"
    real = os.makedirs

    def refuse(name, *args, **kwargs):
        if str(name).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    assert train_main(_args(records, folder)) == 2
    err = capsys.readouterr().err
    assert f"Cannot write {folder}" in err and "Permission denied" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
