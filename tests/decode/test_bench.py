"""The live benchmark on tiny models: every method runs, the order is balanced, the CIs and
ratios are paired bootstraps over prompts, HF's best includes plain ``generate``, the default
prompts are the records' test split, and the greedy outputs are checked. No timed assertion:
the numbers are whatever the machine gives; only their shape and arithmetic are tested."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from locations import FIXTURES
from synthetic import make_records
from tiny_models import noisy_copy, save_with_tokenizer, tiny_llama

import speckv.cli.bench as bench_cli
import speckv.decode.bench as bench
from speckv import paths
from speckv.decode.bench import (
    interleaved,
    logit_gap,
    position_counts,
    rotation,
    summarize,
)
from speckv.decode.invariant import first_difference
from speckv.prompts import SUITE_MAX, TASKS, suites

HF_ROWS = {"hf:ar", "hf:constant:1", "hf:constant:2", "hf:constant:3", "hf:constant:4",
           "hf:heuristic", "hf:defaults", "hf:lookup"}
SPECKV_ROWS = {"ar", "speckv:fixed:1", "speckv:fixed:2", "speckv:fixed:3", "speckv:fixed:4",
               "speckv:best_static", "speckv:heuristic", "speckv:onnx",
               "hf:speckv"}  # HF's loop with speckv's controller: not one of HF's own rows


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-pair")
    target = tiny_llama(2, seed=0)
    draft = noisy_copy(target, 0.08, seed=1)
    return save_with_tokenizer(draft, root / "draft"), save_with_tokenizer(target, root / "t")


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    """Synthetic trace records whose prompt ids are suite prompts (10 per task)."""
    from speckv.records import write_records

    df = make_records(prompts_per_task=10, max_len=48)
    rename = {(p.task, f"{p.task}-{i:03d}"): p.prompt_id
              for task in TASKS for i, p in enumerate(suites([task], n=10))}
    df["prompt_id"] = [rename[(t, pid)] for t, pid in zip(df["task"], df["prompt_id"],
                                                           strict=True)]
    return write_records(df, tmp_path_factory.mktemp("records") / "synthetic.parquet")


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, records_file):
    """The bundled records and controller are regenerated elsewhere: use test ones."""
    monkeypatch.setattr(paths, "DEFAULT_RECORDS", str(records_file))
    monkeypatch.setattr(paths, "DEFAULT_CONTROLLER", str(FIXTURES / "controller_tiny.onnx"))


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task": "code", "prompt": "w5 w17 w33", "id": "a"}\n'
                    '{"task": "math", "prompt": "w9 w4 w70", "id": "b"}\n'
                    '{"task": "chat", "prompt": "w11 w12", "id": "c"}\n')
    return path


def _bench(capsys, argv):
    from speckv.__main__ import main

    code = main(["bench", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _argv(saved_pair, prompts, *extra):
    draft_dir, target_dir = saved_pair
    src = ["--prompts", str(prompts)] if prompts is not None else []
    return [*src, "--target", str(target_dir), "--draft", str(draft_dir),
            "--dtype", "float64", "--max-new-tokens", "12", "--resamples", "500", *extra]


def _loaded(saved_pair):
    from speckv.llm.load import load_model

    draft_dir, target_dir = saved_pair
    return (load_model(str(target_dir), "fp16", dtype="float64"),
            load_model(str(draft_dir), "fp16", dtype="float64"))


# --------------------------------------------------------------------- the whole command
def test_bench_json_runs_every_method_and_checks_greedy_outputs(capsys, saved_pair, prompts):
    code, out, err = _bench(capsys, _argv(saved_pair, prompts, "--json", "--repeats", "2"))
    assert code == 0
    result = json.loads(out)
    assert set(result["methods"]) == HF_ROWS | SPECKV_ROWS
    for name in HF_ROWS | SPECKV_ROWS:
        row = result["methods"][name]
        assert row["tokens_per_s"] > 0 and row["ratio_to_hf_best"] > 0
        lo, hi = row["ci"]
        assert lo <= row["tokens_per_s"] <= hi
        assert len(row["ratio_to_ar_ci"]) == len(row["ratio_to_best_static_ci"]) == 2
        assert row["per_compression"]["fp16"]["tokens_per_s"] == pytest.approx(
            row["tokens_per_s"]), "one compression: the overall figure is that compression's"
    assert result["methods"]["ar"]["ratio_to_ar"] == pytest.approx(1.0)
    assert result["methods"]["speckv:best_static"]["ratio_to_best_static"] == pytest.approx(1.0)
    assert result["methods"]["speckv:fixed:4"]["per_compression"]["fp16"]["mean_accepted"] > 0
    block = result["by_compression"]["fp16"]
    assert block["hf_best"] in HF_ROWS and result["hf_best"] in HF_ROWS
    assert block["methods"][block["hf_best"]]["ratio_to_hf_best"] == pytest.approx(1.0)
    assert result["identical_greedy"] is True and block["invariant_violations"] == []
    assert block["differences"] == []  # float64 tiny models: no near-tie flips either
    assert block["methods"]["ar"]["tokens"] == 2 * 3 * 12
    assert block["per_prompt"]["ar"]["tokens"] == [24, 24, 24]
    assert block["prompt_ids"] == result["prompt_ids"] == ["a", "b", "c"]
    assert block["best_static_choice"] == result["best_static_choice"]["fp16"]
    # the controller's headline ratios, with CIs
    controller = result["controller"]
    assert controller["ratio_to_hf_best"] == pytest.approx(
        result["methods"]["speckv:onnx"]["ratio_to_hf_best"])
    assert len(controller["ratio_to_best_static_ci"]) == 2
    # the order: 3 prompts x 2 repeats = 6 slots over 15 methods, balanced within one
    rot = block["rotation"]
    assert rot["slots"] == 6 and rot["methods"] == len(HF_ROWS | SPECKV_ROWS) and not rot["exact"]
    for counts in rot["positions"].values():
        assert sum(counts) == 6 and max(counts) - min(counts) <= 1
    # the machine, the HF defaults as installed, and the one-process note
    assert result["machine"]["threads"] == result["threads"]
    assert result["machine"]["cpu"] in result["machine_description"]
    assert result["hf_defaults"]["num_assistant_tokens_schedule"] == "constant"
    assert result["hf_defaults"]["num_assistant_tokens"] == 20
    assert result["hf_defaults"]["assistant_confidence_threshold"] == pytest.approx(0.4)
    assert "one benchmark process" in result["note"]
    assert isinstance(result["other_bench_processes"], list)
    assert "bench" in err  # the progress bar goes to stderr


def test_default_prompts_are_the_records_test_split(capsys, saved_pair, records_file):
    from speckv.records import read_records, split_prompts

    df = read_records(records_file)
    split = split_prompts(df, val=0.15, test=0.15, seed=0)
    held = set(zip(df["task"][split == "test"], df["prompt_id"][split == "test"], strict=True))
    trained = set(zip(df["task"][split == "train"], df["prompt_id"][split == "train"],
                      strict=True))
    by_task = {t: [p.prompt_id for p in suites([t], n=SUITE_MAX) if (t, p.prompt_id) in held]
               for t in TASKS}
    assert all(len(ids) >= 2 for ids in by_task.values())

    code, out, _ = _bench(capsys, _argv(saved_pair, None, "--json", "--methods", "ar,hf:ar",
                                        "--repeats", "1", "--max-new-tokens", "3"))
    assert code == 0
    result = json.loads(out)
    assert result["prompt_ids"] == [pid for t in TASKS for pid in by_task[t]]
    assert not any((p.task, p.prompt_id) in trained for p in suites(n=SUITE_MAX)
                   if p.prompt_id in result["prompt_ids"])
    assert "test split" in result["prompt_source"]

    code, out, _ = _bench(capsys, _argv(saved_pair, None, "--json", "--methods", "ar",
                                        "--repeats", "1", "--max-new-tokens", "2",
                                        "--per-task", "1"))
    assert code == 0
    assert json.loads(out)["prompt_ids"] == [by_task[t][0] for t in TASKS]


def test_held_out_prompts_keeps_suite_order_and_skips_unknown_ids(records_file):
    from speckv.records import read_records

    df = read_records(records_file)
    chosen = bench.held_out_prompts(df, per_task=1)
    assert [p.task for p in chosen] == list(TASKS)
    df = df.assign(prompt_id="not-a-suite-prompt-" + df["prompt_id"].astype(str))
    with pytest.raises(bench.BenchError, match="no suite prompts"):
        bench.held_out_prompts(df)
    with pytest.raises(bench.BenchError, match="at least 1"):
        bench.held_out_prompts(read_records(records_file), per_task=0)


def test_bench_reports_a_token_that_breaks_the_invariant(capsys, saved_pair, prompts,
                                                         monkeypatch):
    real = bench._speckv_runner

    def broken(decoder):
        run = real(decoder)
        if decoder.name != "fixed:4":
            return run

        def wrong(ids, n):
            out = run(ids, n)
            out.result.token_ids[3] = (out.result.token_ids[3] + 1) % 100 + 3
            out.token_ids = out.result.token_ids
            return out

        return wrong

    monkeypatch.setattr(bench, "_speckv_runner", broken)
    code, out, _ = _bench(capsys, _argv(saved_pair, prompts, "--json", "--repeats", "1",
                                        "--methods", "ar,speckv:fixed:4"))
    assert code == 0
    result = json.loads(out)
    assert result["identical_greedy"] is False
    block = result["by_compression"]["fp16"]
    broken_at = [v for v in block["invariant_violations"] if "argmax" in v["reason"]]
    assert {v["prompt_id"] for v in broken_at} == {"a", "b", "c"}
    assert all(v["method"] == "speckv:fixed:4" and v["position"] == 3 for v in broken_at)
    diffs = block["differences"]
    assert {d["prompt_id"] for d in diffs} == {"a", "b", "c"}
    assert all(d["method"] == "speckv:fixed:4" and d["first_diff"] == 3 for d in diffs)
    assert all(d["logit_gap"] > 0 and d["explained"] is False for d in diffs)


def test_bench_passes_a_target_that_is_not_batch_invariant(saved_pair, prompts):
    """Outputs that part from ``ar`` where the target's chunked and one-token forwards
    disagree are reported, explained, and do not fail the greedy check."""
    import dataclasses

    from test_decode import ChunkSkewed

    from speckv.prompts import load_jsonl

    target, draft = _loaded(saved_pair)
    skewed = dataclasses.replace(target, model=ChunkSkewed(target.model, margin=0.3))
    block = bench.bench_compression(skewed, draft, load_jsonl(prompts),
                                    ["ar", "speckv:fixed:4"], 12, repeats=1, resamples=100)
    assert block["identical_greedy"] is True and block["invariant_violations"] == []
    assert block["differences"], "the skew should make some output part from ar"
    assert all(d["explained"] is True and d["logit_gap"] < 0.3 for d in block["differences"])
    text = bench_cli._format({"by_compression": {"fp16": block}, "prompts": 3, "repeats": 1,
                              "max_new_tokens": 12})
    assert "parts from ar" in text and "one-token and chunked forwards disagree" in text


def test_bench_table_names_the_machine_ci_and_one_process_note(capsys, saved_pair, prompts):
    code, out, _ = _bench(capsys, _argv(saved_pair, prompts, "--repeats", "1", "--methods",
                                        "hf:constant:2,speckv:fixed:2"))
    assert code == 0
    assert "speckv:fixed:2" in out and "hf:constant:2" in out
    assert "machine: " in out and "cores" in out and "load average (1 min)" in out
    assert "tokens/s [95% CI]" in out and "paired bootstrap over prompts" in out
    assert "NOTE: Run one benchmark process on the machine" in out
    assert "every speckv token is the target's argmax in the forward that verified it" in out


def test_bench_help_says_to_run_one_benchmark_at_a_time(capsys):
    with pytest.raises(SystemExit):
        bench_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one benchmark process on the machine" in text
    assert "hf:defaults" in text and "speckv:best_static" in text


def test_bench_refuses_unknown_methods_and_levels(capsys, saved_pair, prompts):
    for method in ("magic", "hf:constant", "hf:constant:0", "hf:confidence"):
        code, _, err = _bench(capsys, _argv(saved_pair, prompts, "--methods", method))
        assert code == 2 and "Unknown method" in err, method
    code, _, err = _bench(capsys, _argv(saved_pair, prompts, "--compression", "fp8"))
    assert code == 2 and "fp8" in err


# -------------------------------------------------------------------------- best static
def test_best_static_plain_choice_runs_the_target_alone(saved_pair, prompts, monkeypatch):
    from speckv.policies import BestStatic
    from speckv.prompts import load_jsonl

    target, draft = _loaded(saved_pair)
    built = []
    real = bench._speckv_runner

    def spy(decoder):
        built.append((decoder.name, decoder.draft is None))
        return real(decoder)

    monkeypatch.setattr(bench, "_speckv_runner", spy)
    methods = ["ar", "speckv:best_static"]
    block = bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6,
                                    repeats=1, resamples=50,
                                    policies={"speckv:best_static": BestStatic({"fp16": 0})})
    assert block["best_static_choice"] == 0
    assert built == [("ar", True), ("ar", True)], "plain: no draft, no policy"
    assert block["differences"] == []
    built.clear()
    block = bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6,
                                    repeats=1, resamples=50,
                                    policies={"speckv:best_static": BestStatic({"fp16": 2})})
    assert block["best_static_choice"] == 2 and built[1] == ("best_static", False)
    assert block["methods"]["speckv:best_static"]["mean_accepted"] is not None
    with pytest.raises(bench.BenchError, match="fitted on the records' train split"):
        bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6)
    with pytest.raises(bench.BenchError, match="not on fp16"):
        bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6,
                                policies={"speckv:best_static": BestStatic({"nf4": 1})})


def test_cli_fits_best_static_on_the_train_split(records_file):
    from speckv.evaluate.pipeline import run
    from speckv.records import read_records

    df = read_records(records_file)
    fitted = bench_cli.fit_best_static(df)
    result, _, _ = run(df, resamples=10)  # `speckv evaluate` fits the same on train
    assert fitted.choices == result["best_static_choice"]


# ------------------------------------------------------------------------------ the order
@pytest.mark.parametrize(("methods", "prompts", "repeats"),
                         [(3, 3, 1), (5, 5, 3), (15, 5, 3), (4, 2, 2), (15, 16, 3), (7, 4, 1)])
def test_rotation_puts_every_method_in_every_position_equally_often(methods, prompts, repeats):
    counts = position_counts(methods, prompts, repeats)
    slots = prompts * repeats
    assert (counts.sum(axis=1) == slots).all() and (counts.sum(axis=0) == slots).all()
    if slots % methods == 0:
        assert (counts == slots // methods).all()
    else:
        assert counts.max() - counts.min() <= 1
    shifts = np.array(rotation(methods, prompts, repeats))  # [repeat][prompt]
    for i in range(prompts):  # a prompt's repeats take distinct positions
        assert len(set(shifts[:, i])) == min(repeats, methods)


def test_bench_runs_methods_in_the_rotated_order(saved_pair, prompts, monkeypatch):
    from speckv.prompts import load_jsonl

    target, draft = _loaded(saved_pair)
    calls = []
    real = bench._speckv_runner

    def spy(decoder):
        run = real(decoder)

        def logged(ids, n):
            calls.append(decoder.name)
            return run(ids, n)

        return logged

    monkeypatch.setattr(bench, "_speckv_runner", spy)
    methods = ["ar", "speckv:fixed:1", "speckv:fixed:2"]
    block = bench.bench_compression(target, draft, load_jsonl(prompts), methods, 4,
                                    repeats=2, resamples=50)
    names = ["ar", "fixed:1", "fixed:2"]
    timed = calls[len(methods):]  # after one warm-up of each
    slots = [timed[k:k + 3] for k in range(0, len(timed), 3)]
    assert len(slots) == 6
    for name in names:  # 6 slots, 3 methods: each position exactly twice
        assert [sum(s[p] == name for s in slots) for p in range(3)] == [2, 2, 2]
    assert block["rotation"]["exact"] is True
    assert slots[0] == names and slots[1] == interleaved(names, 2)  # prompt 1, repeat 0


def test_interleaved_rotates_and_keeps_every_method():
    methods = ["a", "b", "c"]
    assert [interleaved(methods, i) for i in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


# ----------------------------------------------------------------------------- statistics
def test_summarize_is_a_ratio_of_sums_with_paired_bootstrap_cis():
    names = ["ar", "hf:ar", "hf:constant:2", "speckv:best_static", "speckv:onnx"]
    rng = np.random.default_rng(1)
    seconds_ar = rng.uniform(1.0, 3.0, 8)  # prompts of very different speeds
    tokens = np.full((8, 5), 64.0)
    tokens[3, :] = 20.0  # one prompt ends early for every method
    seconds = np.stack([seconds_ar, seconds_ar * 0.9, seconds_ar * 2.0, seconds_ar / 1.1,
                        seconds_ar / 1.25], axis=1)
    out = summarize(names, tokens, seconds, resamples=2000, seed=0)
    rows = out["methods"]
    assert rows["ar"]["tokens_per_s"] == pytest.approx(tokens[:, 0].sum() / seconds_ar.sum())
    lo, hi = rows["ar"]["ci"]
    assert lo < rows["ar"]["tokens_per_s"] < hi, "prompts differ: the CI has width"
    # every prompt is exactly 1.25x ar: the paired CI of the ratio has no width
    assert rows["speckv:onnx"]["ratio_to_ar"] == pytest.approx(1.25)
    assert rows["speckv:onnx"]["ratio_to_ar_ci"] == pytest.approx([1.25, 1.25])
    assert rows["speckv:onnx"]["ratio_to_best_static"] == pytest.approx(1.25 / 1.1)
    # HF best is plain generate here (faster than assisted), and the ratios use it
    assert out["hf_best"] == "hf:ar"
    assert rows["hf:ar"]["ratio_to_hf_best"] == pytest.approx(1.0)
    assert rows["speckv:onnx"]["ratio_to_hf_best"] == pytest.approx(1.25 * 0.9)
    assert rows["speckv:onnx"]["ratio_to_hf_best_ci"] == pytest.approx([1.125, 1.125])
    assert rows["hf:constant:2"]["ratio_to_hf_best"] == pytest.approx(0.45)
    # seeded: the same numbers again; another seed moves the CI a little
    again = summarize(names, tokens, seconds, resamples=2000, seed=0)
    assert again["methods"]["ar"]["ci"] == rows["ar"]["ci"]
    other = summarize(names, tokens, seconds, resamples=2000, seed=1)
    assert other["methods"]["ar"]["ci"] != rows["ar"]["ci"]


def test_hf_best_is_the_fastest_hf_row_plain_generate_included():
    names = ["ar", "hf:ar", "hf:constant:1", "hf:defaults", "speckv:fixed:1"]
    tokens = np.full((3, 5), 10.0)
    seconds = np.array([[1.0, 0.8, 1.2, 2.0, 0.5]] * 3)
    assert summarize(names, tokens, seconds, resamples=10)["hf_best"] == "hf:ar"
    seconds[:, 2] = 0.7
    out = summarize(names, tokens, seconds, resamples=10)
    assert out["hf_best"] == "hf:constant:1"
    assert out["methods"]["speckv:fixed:1"]["ratio_to_hf_best"] == pytest.approx(0.7 / 0.5)
    # without ar or best static those ratios are absent, not wrong
    out = summarize(["hf:ar"], tokens[:, :1], seconds[:, :1], resamples=10)
    assert out["methods"]["hf:ar"]["ratio_to_ar"] is None
    assert out["methods"]["hf:ar"]["ratio_to_best_static_ci"] == [None, None]


def test_summarize_methods_pools_compressions_per_prompt():
    names = ["ar", "hf:ar"]
    blocks = {}
    for comp, scale in (("fp16", 1.0), ("nf4", 3.0)):
        tokens = np.full((2, 2), 10.0)
        seconds = np.array([[1.0, 2.0], [1.0, 2.0]]) * scale
        blocks[comp] = {**summarize(names, tokens, seconds, resamples=10), "prompt_ids": ["x", "y"],
                        "per_prompt": {n: {"tokens": tokens[:, j].tolist(),
                                           "seconds": seconds[:, j].tolist()}
                                       for j, n in enumerate(names)}}
    out = bench.summarize_methods(blocks, resamples=10)
    assert out["methods"]["ar"]["tokens_per_s"] == pytest.approx(40 / 8)
    assert out["methods"]["hf:ar"]["ratio_to_ar"] == pytest.approx(0.5)
    assert set(out["methods"]["ar"]["per_compression"]) == {"fp16", "nf4"}


def test_bootstrap_weights_draw_every_prompt_count():
    w = bench.bootstrap_weights(5, 100, seed=3)
    assert w.shape == (100, 5) and (w.sum(axis=1) == 5).all()
    assert (w == bench.bootstrap_weights(5, 100, seed=3)).all()


# ------------------------------------------------------------------------------- helpers
def test_hf_defaults_are_read_from_the_installed_transformers():
    from transformers import GenerationConfig

    found = GenerationConfig()._get_default_generation_params()
    d = bench.hf_defaults()
    for key in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                "assistant_confidence_threshold"):
        assert d[key] == found[key]
    assert isinstance(d["threshold_adapts"], bool)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_logit_gap_is_relative_to_the_top_logit():
    model = tiny_llama(1, seed=3)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[4, 5]])).logits[0, -1]
    top2 = logits.topk(2).indices.tolist()
    gap, rel = logit_gap(model, [4, 5], *top2)
    assert gap == pytest.approx(float(logits[top2[0]] - logits[top2[1]]))
    assert rel == pytest.approx(gap / float(logits.abs().max()))


def test_hf_rows_need_a_causal_lm_assistant_and_take_one_apart(saved_pair, prompts):
    """A feature-conditioned draft has no generate() for Hugging Face's assisted rows: they
    are refused with what to pass, and run with the --hf-draft assistant instead while
    speckv's rows keep the feature-conditioned draft."""
    from tiny_models import tiny_feature_draft

    from speckv.llm.load import LoadedModel
    from speckv.prompts import load_jsonl

    target, lm_draft = _loaded(saved_pair)
    feature = tiny_feature_draft(target.model, steps=20)
    draft = LoadedModel("feature", feature, target.tokenizer, "fp16", "float64", 0.0)
    methods = ["ar", "hf:constant:2", "speckv:fixed:2"]
    with pytest.raises(bench.BenchError, match="--hf-draft"):
        bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6, repeats=1,
                                resamples=50)
    block = bench.bench_compression(target, draft, load_jsonl(prompts), methods, 6, repeats=1,
                                    resamples=50, hf_draft=lm_draft)
    assert block["identical_greedy"]
    assert set(block["methods"]) == set(methods)
