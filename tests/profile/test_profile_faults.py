"""`speckv profile` killed and resumed: the resumed records equal an uninterrupted run's bit
for bit (bfloat16, where a prompt's answer depends on which prompts share its batch), no
temporary file is left, and parts made with other settings are refused, not mixed in."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from faults import run_speckv, temp_files, unwritable, was_killed
from tiny_models import noisy_copy, save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main
from speckv.prompts import TASKS
from speckv.records import read_metadata, read_records, write_records

#: columns measured anew by every run (timings), or naming it.
PER_RUN = ("run_id", "cost_draft_s", "cost_verify_s", "cost_catchup_s", "cost_tree_draft_s",
           "cost_tree_verify_s", "t_step_s")
KEY = ["compression", "task", "prompt_id", "position"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A saved tiny pair and 12 prompts of 1 to 15 words (3 batches of 4)."""
    import torch

    root = tmp_path_factory.mktemp("pair")
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"task": task, "id": f"{task}-{i}", "prompt": " ".join(
        f"w{w}" for w in rng.integers(3, 128, int(rng.integers(1, 16))))})
        for task in TASKS for i in range(3)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return (save_with_tokenizer(noisy_copy(target, 0.05, seed=1), root / "draft"),
            save_with_tokenizer(target, root / "target"), root / "prompts.jsonl")


def _args(pair, out, *extra) -> list[str]:
    draft, target, prompts = pair
    return ["profile", "--draft", str(draft), "--target", str(target), "--compression", "fp16",
            "--prompts", str(prompts), "--max-new-tokens", "24", "--dtype", "bfloat16",
            "--threads", "1", "--target-batch", "4", "--draft-batch", "3", "--out", str(out),
            *extra]


def _outcome(path) -> pd.DataFrame:
    df = read_records(path)
    return df.drop(columns=list(PER_RUN)).sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "r.parquet"
    assert speckv_main(_args(pair, out)) == 0
    return _outcome(out)


def test_bfloat16_records_depend_on_the_batches(pair, uninterrupted, tmp_path):
    """Why batch membership must not depend on what a killed run finished: the same prompts
    in other batches give other float signals (so the next test could tell)."""
    out = tmp_path / "r.parquet"
    assert speckv_main(_args(pair, out, "--target-batch", "3")) == 0
    other = _outcome(out)
    assert len(other) == len(uninterrupted)
    assert not np.array_equal(other["draft_top1"], uninterrupted["draft_top1"])


@pytest.mark.parametrize("kill_at", [
    "fp16__*@2",  # in the first batch's writes: two of its parts missing
    "fp16__*@7",  # in the second batch's: one missing, the third batch not begun
    "r.parquet",  # every part written, the merged file not
])
def test_a_killed_profile_resumes_to_the_uninterrupted_records(pair, uninterrupted, tmp_path,
                                                               kill_at):
    out = tmp_path / "r.parquet"
    killed = run_speckv(_args(pair, out), kill_at=kill_at)
    assert was_killed(killed), killed.stderr[-2000:]
    assert not out.exists() and len(temp_files(tmp_path)) == 1
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r.parquet.parts").glob(
        "*.parquet")}

    resumed = run_speckv(_args(pair, out))  # a new process, as after a real kill
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    pd.testing.assert_frame_equal(_outcome(out), uninterrupted)  # bit for bit
    assert not temp_files(tmp_path)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r.parquet.parts").glob(
        "*.parquet") if p.name in done_before}
    assert kept == done_before, "a finished part was written again"


def test_parts_made_with_other_settings_are_refused(pair, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert speckv_main(_args(pair, out)) == 0
    capsys.readouterr()
    assert speckv_main(_args(pair, out, "--max-new-tokens", "16")) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens: 24 there, 16 here" in err and "move" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert speckv_main(_args(pair, out, "--target-batch", "3")) == 2
    err = capsys.readouterr().err
    assert "--target-batch: 4 there, 3 here" in err and "batched together" in err
    assert len(read_records(out)) > 0  # the finished profile is left as it was


def test_a_part_from_before_settings_were_recorded_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert speckv_main(_args(pair, out)) == 0
    part = sorted((tmp_path / "r.parquet.parts").glob("*.parquet"))[0]
    write_records(read_records(part), part)  # as an older speckv wrote it: no settings
    assert "part" not in read_metadata(part)
    capsys.readouterr()
    assert speckv_main(_args(pair, out)) == 2
    assert "did not record its settings" in capsys.readouterr().err


def test_an_unreadable_part_is_profiled_again(pair, uninterrupted, tmp_path, caplog):
    out = tmp_path / "r.parquet"
    assert speckv_main(_args(pair, out)) == 0
    part = sorted((tmp_path / "r.parquet.parts").glob("*.parquet"))[5]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a damaged disk
    with caplog.at_level("WARNING"):
        assert speckv_main(_args(pair, out)) == 0
    assert f"{part} cannot be read" in caplog.text
    pd.testing.assert_frame_equal(_outcome(out), uninterrupted)


def test_an_unwritable_output_folder_is_one_paragraph(pair, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    with unwritable(folder, monkeypatch):
        assert speckv_main(_args(pair, folder / "r.parquet")) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "Traceback" not in err and ".tmp" not in err
