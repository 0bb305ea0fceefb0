"""The live benchmark runs every method on tiny models and checks the greedy outputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import noisy_copy, save_with_tokenizer, tiny_llama

import speckv.cli.bench as bench_cli
import speckv.decode.bench as bench
from speckv.decode.bench import interleaved, logit_gap
from speckv.decode.invariant import first_difference


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-pair")
    target = tiny_llama(2, seed=0)
    draft = noisy_copy(target, 0.08, seed=1)
    return save_with_tokenizer(draft, root / "draft"), save_with_tokenizer(target, root / "t")


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
    return ["--prompts", str(prompts), "--target", str(target_dir), "--draft", str(draft_dir),
            "--dtype", "float64", "--max-new-tokens", "12", *extra]


def test_bench_json_runs_every_method_and_checks_greedy_outputs(capsys, saved_pair, prompts):
    code, out, err = _bench(capsys, _argv(saved_pair, prompts, "--json", "--repeats", "2"))
    assert code == 0
    result = json.loads(out)
    names = {"ar", "hf:ar", "hf:constant", "hf:heuristic", "hf:confidence", "speckv:fixed:4",
             "speckv:heuristic"}
    assert names <= set(result["methods"])
    for name in names:
        row = result["methods"][name]
        assert row["tokens_per_s"] > 0 and row["ratio_to_hf_best"] > 0
        assert row["per_compression"]["fp16"]["tokens_per_s"] == pytest.approx(
            row["tokens_per_s"]), "one compression: the overall figure is that compression's"
    assert result["methods"]["ar"]["ratio_to_ar"] == pytest.approx(1.0)
    assert result["methods"]["speckv:fixed:4"]["per_compression"]["fp16"]["mean_accepted"] > 0
    block = result["by_compression"]["fp16"]
    assert block["hf_best"] in {"hf:constant", "hf:heuristic", "hf:confidence"}
    assert block["methods"][block["hf_best"]]["ratio_to_hf_best"] == pytest.approx(1.0)
    assert result["identical_greedy"] is True and block["invariant_violations"] == []
    assert block["differences"] == []  # float64 tiny models: no near-tie flips either
    assert block["methods"]["ar"]["tokens"] == 2 * 3 * 12
    assert "bench" in err  # the progress bar goes to stderr


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
    code, out, _ = _bench(capsys, _argv(saved_pair, prompts, "--json", "--methods",
                                        "ar,speckv:fixed:4"))
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

    from speckv.llm.load import load_model
    from speckv.prompts import load_jsonl

    draft_dir, target_dir = saved_pair
    target = load_model(str(target_dir), "fp16", dtype="float64")
    skewed = dataclasses.replace(target, model=ChunkSkewed(target.model, margin=0.3))
    draft = load_model(str(draft_dir), "fp16", dtype="float64")
    block = bench.bench_compression(skewed, draft, load_jsonl(prompts),
                                    ["ar", "speckv:fixed:4"], 12)
    assert block["identical_greedy"] is True and block["invariant_violations"] == []
    assert block["differences"], "the skew should make some output part from ar"
    assert all(d["explained"] is True and d["logit_gap"] < 0.3 for d in block["differences"])
    text = bench_cli._format({"by_compression": {"fp16": block}, "prompts": 3, "repeats": 1,
                          "max_new_tokens": 12})
    assert "parts from ar" in text and "one-token and chunked forwards disagree" in text


def test_bench_table(capsys, saved_pair, prompts):
    code, out, _ = _bench(capsys, _argv(saved_pair, prompts, "--methods",
                                        "hf:constant,speckv:fixed:2"))
    assert code == 0
    assert "speckv:fixed:2" in out
    assert "every speckv token is the target's argmax in the forward that verified it" in out


def test_bench_refuses_unknown_methods_and_levels(capsys, saved_pair, prompts):
    code, _, err = _bench(capsys, _argv(saved_pair, prompts, "--methods", "magic"))
    assert code == 2 and "Unknown method" in err
    code, _, err = _bench(capsys, _argv(saved_pair, prompts, "--compression", "fp8"))
    assert code == 2 and "fp8" in err


def test_interleaved_order_rotates_and_keeps_every_method():
    methods = ["a", "b", "c"]
    orders = [interleaved(methods, i) for i in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


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
