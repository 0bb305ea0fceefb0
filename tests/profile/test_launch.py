"""A launcher-driven multi-process profile: two shards as two processes (torchrun), merged,
equal row for row to a one-process run (tiny saved models, float64)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import noisy_copy, save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main
from speckv.profile.profiler import parse_shard
from speckv.prompts import TASKS
from speckv.records import read_metadata, read_records

#: columns that differ between any two runs: run ids and measured times.
TIMING = ("run_id", "cost_draft_s", "cost_verify_s", "cost_catchup_s", "cost_tree_draft_s",
          "cost_tree_verify_s", "t_step_s")
KEY = ["compression", "task", "prompt_id", "position"]


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """A saved tiny pair and 12 distinct prompts of 1 to 15 words (3 per task)."""
    import torch

    root = tmp_path_factory.mktemp("pair")
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    draft = noisy_copy(target, 0.05, seed=1)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"task": task, "id": f"{task}-{i}", "prompt": " ".join(
        f"w{w}" for w in rng.integers(3, 128, int(rng.integers(1, 16))))})
        for task in TASKS for i in range(3)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return (save_with_tokenizer(draft, root / "draft"),
            save_with_tokenizer(target, root / "target"), root / "prompts.jsonl")


def _args(pair_dirs, out, *extra) -> list[str]:
    draft, target, prompts = pair_dirs
    return ["profile", "--draft", str(draft), "--target", str(target), "--compression", "fp16",
            "--prompts", str(prompts), "--max-new-tokens", "12", "--dtype", "float64",
            "--threads", "1", "--target-batch", "4", "--draft-batch", "3", "--out", str(out),
            *extra]


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=list(TIMING)).sort_values(KEY).reset_index(drop=True)


def test_parse_shard_reads_torchrun_and_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert parse_shard("auto") == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parse_shard("auto") == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard("auto") == (1, 2)  # torchrun's variables win inside an allocation


def test_torchrun_shards_merge_into_the_one_process_records(pair_dirs, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    single = tmp_path / "single" / "r.parquet"
    single.parent.mkdir()
    assert speckv_main(_args(pair_dirs, single)) == 0

    out = tmp_path / "multi" / "r.parquet"
    out.parent.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "speckv",
           *_args(pair_dirs, out, "--shard", "auto", "--json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(out.parent.glob("r.shard*of2.parquet"))
    assert [s.name for s in shards] == ["r.shard0of2.parquet", "r.shard1of2.parquet"]
    assert speckv_main(["records", "merge", *map(str, shards), "--out", str(out)]) == 0

    merged, alone = read_records(out), read_records(single)
    assert len(merged) == len(alone) > 0
    assert merged["prompt_id"].nunique() == 12  # 3 prompts x 4 tasks
    pd.testing.assert_frame_equal(_comparable(merged), _comparable(alone))
    runs = read_metadata(out)["runs"]
    assert sorted(tuple(r["shard"]) for r in runs.values()) == [(0, 2), (1, 2)]
    assert all(r["target_batch"] == 4 for r in runs.values())


def test_two_shard_processes_equal_one_process_row_for_row(pair_dirs, tmp_path):
    """The same without torchrun: two processes told their rank as SLURM would."""
    single = tmp_path / "single.parquet"
    assert speckv_main(_args(pair_dirs, single, "--target-batch", "12")) == 0
    out = tmp_path / "r.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-m", "speckv",
                               *_args(pair_dirs, out, "--shard", "auto")],
                              env={**env, "SLURM_PROCID": str(i), "SLURM_NTASKS": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    shards = sorted(tmp_path.glob("r.shard*of2.parquet"))
    assert len(shards) == 2
    assert speckv_main(["records", "merge", *map(str, shards), "--out", str(out)]) == 0
    merged, alone = _comparable(read_records(out)), _comparable(read_records(single))
    pd.testing.assert_frame_equal(merged, alone)
    assert np.isfinite(np.stack(merged["draft_top1_k"])[:, 1]).any()


def test_a_shard_with_no_prompts_succeeds_and_writes_nothing(pair_dirs, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    args = _args(pair_dirs, out, "--shard", "5/20", "--tasks", "chat", "--json")
    assert speckv_main(args) == 0
    assert '"out": null' in capsys.readouterr().out
    assert not list(tmp_path.glob("*.parquet"))
