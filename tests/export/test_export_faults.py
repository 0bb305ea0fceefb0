"""`speckv export` under faults: killed before its rename (with and without a previous file),
after a training run was killed mid-save, and into a folder it cannot write. The rerun writes
the uninterrupted export's bytes, a previous file survives a kill, no temporary file is left,
and every failure is one paragraph (exit 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from faults import run_speckv, temp_files, unwritable, was_killed
from synthetic import make_records

from speckv.__main__ import main as speckv_main
from speckv.records import write_records
from speckv.train.cli import main as train_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real training run's checkpoint folder (two epochs: epoch=1-step=N.ckpt, last.ckpt)
    and a second, different run's."""
    root = tmp_path_factory.mktemp("runs")
    records = write_records(make_records(prompts_per_task=6, min_len=20, max_len=40, seed=0),
                            root / "r.parquet")
    for epochs in ("2", "1"):
        assert train_main(["fit", "--data.records", str(records), "--trainer.max_epochs", epochs,
                           "--trainer.default_root_dir", str(root),
                           "--trainer.enable_progress_bar", "false"]) == 0
    return root / "lightning_logs"


def _export(ckpt, out, *extra) -> list[str]:
    return ["export", "--ckpt", str(ckpt), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(run_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("whole") / "x.onnx"
    assert speckv_main(_export(run_dir / "version_0/checkpoints/last.ckpt", out)) == 0
    return out.read_bytes()


@pytest.mark.parametrize("previous", [False, True])
def test_a_killed_export_leaves_the_previous_file_and_reruns_to_the_same_bytes(
        run_dir, uninterrupted, tmp_path, previous):
    out = tmp_path / "x.onnx"
    before = None
    if previous:  # another controller is there already
        assert speckv_main(_export(run_dir / "version_1/checkpoints/last.ckpt", out)) == 0
        before = out.read_bytes()
        assert before != uninterrupted
    ckpt = run_dir / "version_0/checkpoints/last.ckpt"
    killed = run_speckv(_export(ckpt, out), kill_at="x.onnx")
    assert was_killed(killed), killed.stderr[-2000:]
    assert len(temp_files(tmp_path)) == 1
    assert (out.read_bytes() if out.exists() else None) == before
    rerun = run_speckv(_export(ckpt, out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert out.read_bytes() == uninterrupted and not temp_files(tmp_path)


def test_export_of_a_folder_skips_a_damaged_checkpoint_for_the_newest_readable(
        run_dir, uninterrupted, tmp_path, caplog, capsys):
    """After a fit killed mid-save: the newest file is damaged, the one before it is whole."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "version_0/checkpoints", folder)
    damaged = folder / "epoch=2-step=6.ckpt"
    damaged.write_bytes((folder / "last.ckpt").read_bytes()[:2000])  # newest, cut off
    out = tmp_path / "x.onnx"
    with caplog.at_level("WARNING"):
        assert speckv_main(_export(folder, out)) == 0
    assert f"skipping checkpoint {damaged}" in caplog.text
    assert "from      " + str(folder / "last.ckpt") in capsys.readouterr().out
    assert out.read_bytes() == uninterrupted

    # the damaged file named itself: the error names the readable one beside it
    assert speckv_main(_export(damaged, tmp_path / "y.onnx")) == 2
    err = capsys.readouterr().err
    assert f"Cannot read checkpoint {damaged}" in err and f"--ckpt {folder / 'last.ckpt'}" in err
    # nothing readable at all: which files, and why
    (folder / "last.ckpt").write_bytes(b"")
    for f in folder.glob("epoch=1*.ckpt"):
        f.write_bytes(b"\x80\x02")
    assert speckv_main(_export(folder, tmp_path / "z.onnx")) == 2
    err = capsys.readouterr().err
    assert "No checkpoint under" in err and "last.ckpt" in err and "Traceback" not in err


def test_an_unwritable_output_folder_names_the_output(run_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    with unwritable(folder, monkeypatch):
        assert speckv_main(_export(run_dir / "version_0/checkpoints/last.ckpt",
                                   folder / "x.onnx")) == 2
    err = capsys.readouterr().err
    assert f"Cannot write {folder / 'x.onnx'}: Permission denied" in err
    assert ".tmp" not in err and len(err.strip().splitlines()) == 1
