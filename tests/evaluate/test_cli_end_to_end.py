"""`speckv evaluate` end to end on synthetic records: an exported controller given with
--controller, the tokens-per-step objective, and the machines behind the figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from locations import FIXTURES
from synthetic import make_records

from speckv.__main__ import main as speckv_main
from speckv.machine import describe, fingerprint
from speckv.records import read_metadata, write_records
from speckv.runtime.features import GAMMA_MAX
from speckv.runtime.proposal import N_OPTIONS

CONTROLLER = FIXTURES / "controller_tiny.onnx"
#: one run with a fingerprint, one written before speckv recorded the machine
METADATA = {"runs": {
    "synthetic-fp16": {"draft": "synthetic-draft", "target": "synthetic-target",
                       "compression": "fp16", "threads": 1, "machine": fingerprint(1)},
    "synthetic-int8": {"compression": "int8", "threads": 1, "machine": "x86_64"},
}}


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    return write_records(make_records(prompts_per_task=5, seed=3),
                         tmp_path_factory.mktemp("records") / "syn.parquet", METADATA)


def evaluate(capsys, *argv: str) -> tuple[int, str, str]:
    code = speckv_main(["evaluate", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_controller_tokens_per_second_with_the_machines_behind_it(records_file, capsys):
    code, out, err = evaluate(capsys, "--records", str(records_file), "--controller",
                              str(CONTROLLER), "--json", "--resamples", "200")
    assert code == 0
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["objective"] == "tokens_per_s"
    assert result["learned"] == {"status": "evaluated", "source": str(CONTROLLER)}
    learned = result["policies"]["learned"]
    lo, hi = learned["ci95"]
    assert lo <= learned["tokens_per_s"] <= hi
    hist = result["gamma_chosen"]["learned"]
    assert set(hist) == {"fp16", "int8", "nf4"}
    assert all(len(counts) == N_OPTIONS - 1 for counts in hist.values())  # codes 1..
    assert sum(map(sum, hist.values())) > 0
    for key in ("p_value_vs_fixed4", "p_value_vs_best_fixed", "p_value_vs_best_static"):
        assert 0 < result[key]["p"] <= 1
    # the evaluating machine and the machines the records' costs were measured on
    assert result["machine"] == fingerprint()
    [info] = result["record_files"]
    assert info["path"] == str(records_file)
    assert info["metadata"] == read_metadata(records_file) == json.loads(json.dumps(METADATA))
    assert info["machines"] == [describe(fingerprint(1)),
                                "machine not recorded (x86_64, 1 thread)"]
    # the table goes to stderr under --json, with the machines as its caption
    assert "learned" in err
    assert f"evaluated on: {describe(fingerprint())}" in err
    assert f"costs measured on: {describe(fingerprint(1))}; machine not recorded" in err


def test_tokens_per_step_objective_always_drafts_the_most(records_file, capsys):
    """Tokens per step rewards the longest draft: best fixed γ is 8 and the controller,
    choosing with unit costs, picks 8 at every step."""
    code, out, _ = evaluate(capsys, "--records", str(records_file), "--controller",
                            str(CONTROLLER), "--objective", "tokens_per_step", "--json",
                            "--resamples", "200")
    assert code == 0
    result = json.loads(out)
    assert result["objective"] == "tokens_per_step"
    assert result["p_value_metric"] == "tokens_per_step"
    assert result["best_fixed_gamma"] == {"fp16": GAMMA_MAX, "int8": GAMMA_MAX,
                                          "nf4": GAMMA_MAX}
    for counts in result["gamma_chosen"]["learned"].values():
        # codes 1..: always γ = 8 (the unit-cost objective's choice), never a tree
        assert counts[GAMMA_MAX - 1] == sum(counts) > 0
    step = {name: e["tokens_per_step"] for name, e in result["policies"].items()}
    assert step["learned"] == pytest.approx(step[f"fixed:{GAMMA_MAX}"])
    assert step["learned"] >= max(step[f"fixed:{g}"] for g in range(1, GAMMA_MAX + 1)) - 1e-9


def test_the_printed_table_carries_the_machine_caption(records_file, capsys):
    code, out, err = evaluate(capsys, "--records", str(records_file), "--controller",
                              str(CONTROLLER), "--resamples", "100")
    assert code == 0
    assert "speckv evaluate" in out and "learned" in out
    lines = out.strip().splitlines()
    assert lines[-1] == f"evaluated on: {describe(fingerprint())}"
    assert lines[-2].startswith("costs measured on: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["--controller", "missing.onnx"],
    ["--controller", str(FIXTURES / "controller_tiny_expected.npz")],
    ["--objective", "bits_per_joule"],
    ["--resamples", "0"],
    ["--split", "holdout"],
])
def test_bad_input_exits_2_with_one_paragraph(records_file, capsys, argv):
    code, out, err = evaluate(capsys, "--records", str(records_file), *argv)
    assert code == 2 and out == ""
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert "error" in err
