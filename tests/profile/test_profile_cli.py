"""`speckv profile` end to end on tiny saved models: shards, merge, resume after a kill."""

from __future__ import annotations

import pytest
from tiny_models import noisy_copy, save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main
from speckv.records import read_metadata, read_records


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("pair")
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    draft = noisy_copy(target, 0.05, seed=1)
    return (save_with_tokenizer(draft, root / "draft"),
            save_with_tokenizer(target, root / "target"))


def _profile(pair_dirs, out, *extra):
    draft, target = pair_dirs
    return speckv_main(["profile", "--draft", str(draft), "--target", str(target),
                        "--compression", "fp16", "--per-task", "2", "--max-new-tokens", "10",
                        "--dtype", "float32", "--threads", "1", "--out", str(out), *extra])


def test_shards_merge_and_resume(pair_dirs, tmp_path):
    out = tmp_path / "r.parquet"
    assert _profile(pair_dirs, out, "--shard", "0/2") == 0
    assert _profile(pair_dirs, out, "--shard", "1/2") == 0
    shards = sorted(tmp_path.glob("r.shard*.parquet"))
    assert [s.name for s in shards] == ["r.shard0of2.parquet", "r.shard1of2.parquet"]
    a, b = (read_records(s) for s in shards)
    assert not set(a["prompt_id"]) & set(b["prompt_id"]), "a prompt was profiled twice"
    assert speckv_main(["records", "merge", *map(str, shards), "--out", str(out)]) == 0
    merged = read_records(out)
    assert merged["prompt_id"].nunique() == 8  # 2 prompts x 4 tasks
    steps = merged.groupby("prompt_id")["position"].apply(lambda p: (p.diff().dropna() == 1).all())
    assert steps.all(), "every answer position must be present, in order"
    runs = read_metadata(out)["runs"]
    assert len(runs) == 2 and all(len(r["cost"]["cost_verify_s"]) == 9 for r in runs.values())

    # a killed run: one prompt's part is missing; the rerun decodes its batch again and
    # writes that part alone (the others are kept as they were)
    parts = sorted((tmp_path / "r.parquet.parts").glob("*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[0].unlink()
    assert _profile(pair_dirs, out, "--shard", "0/2") == 0
    after = {p.name: p.stat().st_mtime_ns
             for p in (tmp_path / "r.parquet.parts").glob("*.parquet")}
    assert set(after) == set(stamps)
    changed = [n for n in after if after[n] != stamps[n]]
    assert changed == [parts[0].name]


def test_bad_arguments_exit_2(pair_dirs, tmp_path, capsys):
    assert _profile(pair_dirs, tmp_path / "r.csv") == 2
    assert "write records to a .parquet file" in capsys.readouterr().err
    assert _profile(pair_dirs, tmp_path / "r.parquet", "--shard", "3/2") == 2
    assert "0 <= i < n" in capsys.readouterr().err


def test_live_mode_agrees_with_replay_of_trace_records(pair_dirs, tmp_path):
    from speckv.evaluate.replay import prepare, replay
    from speckv.policies import FixedGamma

    trace, live = tmp_path / "trace.parquet", tmp_path / "live.parquet"
    assert _profile(pair_dirs, trace) == 0
    assert _profile(pair_dirs, live, "--mode", "live", "--policy", "fixed:3") == 0
    t, lv = read_records(trace), read_records(live)
    assert (lv["mode"] == "live").all() and (lv["gamma"].dropna() <= 3).all()
    traces = prepare(t)
    result = replay(traces, FixedGamma(3))
    for s in range(traces.n_sequences):
        task, prompt_id = str(traces.task[s]), str(traces.prompt[s]).split("/", 1)[1]
        steps = lv[(lv["task"] == task) & (lv["prompt_id"] == prompt_id)]
        assert len(steps) == int(result.steps[s])
        assert int(steps["accept_len"].sum()) == int(result.accepted[s])


def test_the_full_suites_profile(pair_dirs, tmp_path, capsys):
    """--per-task 120 takes every suite prompt; more than the suites hold is refused."""
    import json

    out = tmp_path / "full.parquet"
    assert _profile(pair_dirs, out, "--per-task", "120", "--tasks", "chat,math",
                    "--max-new-tokens", "2", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 240 and summary["records_per_s"] > 0
    df = read_records(out)
    assert df.groupby("task")["prompt_id"].nunique().to_dict() == {"chat": 120, "math": 120}
    assert _profile(pair_dirs, tmp_path / "x.parquet", "--per-task", "121") == 2
    assert "1 to 120" in capsys.readouterr().err
