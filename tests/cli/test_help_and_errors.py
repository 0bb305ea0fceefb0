"""Every command prints --help (exit 0), and bad input on the command line ends with one
paragraph on stderr, no traceback, exit status 2 (README: "Bad input ... ends with one
paragraph that says what is wrong and what to do, and exit status 2").

In-process through ``speckv.__main__.main``; the real ``python -m`` entry points once each in
a subprocess. Every bad input here is refused before a model loads or anything is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from locations import ROOT

from speckv.__main__ import COMMANDS
from speckv.__main__ import main as speckv_main

#: commands whose --help runs in-process (train is LightningCLI's: a subprocess below)
IN_PROCESS = [name for name in COMMANDS if name != "train"]
SUBCOMMANDS = [["records", "merge"], ["records", "figures"], ["draft", "data"],
               ["draft", "distill"], ["draft", "evaluate"], ["draft", "export-gguf"]]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = speckv_main(argv)
    got = capsys.readouterr()
    return code, got.out, got.err


def assert_one_paragraph(err: str, command: str) -> str:
    """The refusal: no traceback, and the last stderr paragraph is one error message."""
    assert "Traceback" not in err, err
    paragraph = err.strip().split("\n\n")[-1]
    error_lines = [line for line in paragraph.splitlines() if ": error:" in line]
    assert len(error_lines) == 1, err
    assert error_lines[0].startswith(f"speckv {command}"), err
    assert len(error_lines[0].split(": error:", 1)[1].strip()) > 10  # says something
    return paragraph


@pytest.mark.parametrize("argv", [[name] for name in IN_PROCESS] + SUBCOMMANDS,
                         ids=lambda argv: " ".join(argv))
def test_help_exits_0_and_prints_usage(capsys, argv):
    code, out, err = run(capsys, [*argv, "--help"])
    assert code == 0
    assert out.startswith(f"usage: speckv {' '.join(argv)}")
    assert "--help" in out and "Traceback" not in err


def test_top_level_help_lists_every_command(capsys):
    for argv in ([], ["--help"], ["-h"]):
        code, out, _ = run(capsys, argv)
        assert code == 0 and out.startswith("usage: speckv COMMAND")
        assert all(f"  {name} " in out for name in COMMANDS)


def test_an_unknown_command_exits_2(capsys):
    code, out, err = run(capsys, ["nonsense"])
    assert code == 2 and out == ""
    assert "unknown command 'nonsense'" in err and "Traceback" not in err


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder: nothing a command might write lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-model.txt").write_text("# not a checkpoint, not ONNX, not a CSV\n")
    return tmp_path


MISSING = "/nonexistent/speckv-test/file"
TEXT = "not-a-model.txt"

#: command -> (arguments, what the error must name)
BAD = {
    "profile": [
        ([], "--out"),
        (["--out", "r.csv"], ".parquet"),
        (["--out", "r.parquet", "--compression", "fp8"], "fp8"),
        (["--out", "r.parquet", "--tasks", "poetry"], "poetry"),
        (["--out", "r.parquet", "--threads", "0"], "--threads"),
        (["--out", "r.parquet", "--dtype", "float17"], "float17"),
        (["--out", "r.parquet", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--out", "r.parquet", "--shard", "3/2"], "--shard"),
        (["--out", "r.parquet", "--prompts", f"{MISSING}.jsonl"], "does not exist"),
    ],
    "records": [
        ([], "required"),
        (["merge", f"{MISSING}.parquet", "--out", "o.parquet"], "does not exist"),
        (["figures", f"{MISSING}.parquet"], "does not exist"),
        (["split", "x"], "split"),
    ],
    "import-paper": [
        ([], "csv"),
        ([f"{MISSING}.csv", "--out", "o.parquet"], "does not exist"),
    ],
    "draft": [
        ([], "required"),
        (["data", "--per-task", "0"], "--per-task"),
        (["data", "--threads", "two"], "--threads"),
        (["distill", "--layers", "x"], "--layers"),
        (["distill", "--steps", "0"], "--steps"),
        (["distill", "--lr", "-1"], "--lr"),
        (["evaluate", "--compression", "fp8"], "fp8"),
        (["evaluate", "--dtype", "float17"], "float17"),
        (["export-gguf", "--out", "d.gguf", "--type", "int3"], "int3"),
        (["export-gguf"], "--out"),
    ],
    "evaluate": [
        (["--records", f"{MISSING}.parquet"], "does not exist"),
        (["--records", TEXT], "parquet"),
        (["--objective", "bits_per_joule"], "bits_per_joule"),
        (["--controller", f"{MISSING}.onnx"], "does not exist"),
    ],
    "export": [
        (["--ckpt", f"{MISSING}.ckpt"], "does not exist"),
        (["--ckpt", TEXT], TEXT),
        (["--bogus"], "--bogus"),
    ],
    "bench-controller": [
        (["--controller", f"{MISSING}.onnx"], "No controller"),
        (["--controller", TEXT], "not an ONNX model"),
        (["--iters", "0"], "--iters"),
        (["--target-step-ms", "-3"], "--target-step-ms"),
    ],
    "generate": [
        ([], "--prompt"),
        (["--prompt", "x", "--prompts", "p.jsonl"], "not allowed"),
        (["--prompt", "x", "--policy", "bogus"], "bogus"),
        (["--prompt", "x", "--threads", "0"], "--threads"),
        (["--prompt", "x", "--dtype", "float17"], "float17"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--records", "r.csv"], ".parquet"),
        (["--prompt", "x", "--policy", "fixed:2", "--costs", f"{MISSING}.json"], "--save-costs"),
        (["--prompts", f"{MISSING}.jsonl", "--policy", "heuristic"], "does not exist"),
    ],
    "bench": [
        (["--compression", "fp8"], "fp8"),
        (["--repeats", "0"], "--repeats"),
        (["--prompts", f"{MISSING}.jsonl"], "does not exist"),
        (["--per-task", "1", "--prompts", "p.jsonl"], "not allowed"),
        (["--threads", "0"], "at least 1"),
        (["--engine", "vllm"], "vllm"),
        (["--engine", "llamacpp", "--gguf-target", f"{MISSING}.gguf"], "does not exist"),
        (["--engine", "llamacpp", "--gguf-target", TEXT], "not a GGUF file"),
        (["--engine", "llamacpp", "--repeats", "0"], "--repeats"),
    ],
    "train": [
        (["bogus"], "bogus"),
    ],
}


def test_every_command_has_bad_input_cases():
    assert set(BAD) == set(COMMANDS)


@pytest.mark.parametrize(("command", "argv", "needle"),
                         [(c, a, n) for c, cases in BAD.items() for a, n in cases],
                         ids=lambda x: x if isinstance(x, str) else " ".join(x) or "(none)")
def test_bad_input_exits_2_with_one_paragraph(capsys, elsewhere, command, argv, needle):
    code, out, err = run(capsys, [command, *argv])
    assert code == 2, err
    assert out == ""
    if command == "train":  # LightningCLI's own usage error, through `speckv train`
        assert "Traceback" not in err and "error:" in err and needle in err
    else:
        paragraph = assert_one_paragraph(err, command)
        assert needle in paragraph.split(": error:", 1)[1], paragraph
        if command == "draft" and argv:  # a usage error names the subcommand
            assert f"speckv draft {argv[0]}: error:" in paragraph
    assert sorted(p.name for p in elsewhere.iterdir()) == [TEXT]  # nothing was written


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_python_m_speckv_exits_with_the_status(tmp_path):
    done = _python("-m", "speckv", "generate", "--prompt", "x", "--threads", "0", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_paragraph(done.stderr, "generate")
    done = _python("-m", "speckv", "evaluate", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: speckv evaluate")


def test_python_m_speckv_train_help(tmp_path):
    done = _python("-m", "speckv.train", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "fit" in done.stdout
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())  # --help writes no lightning_logs
