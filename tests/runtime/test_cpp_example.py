"""The C++ example (examples/cpp/choose_gamma.cpp) decides as the Python ``Controller`` does.

It is compiled with ``examples/cpp/build.sh`` against an ONNX Runtime SDK: ``$ONNXRUNTIME_ROOT``,
or the one ``examples/cpp/build.sh --fetch`` assembled in speckv's cache. Skipped without a C++
compiler or an SDK; this test never downloads anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from guide import cpp_example
from locations import ROOT

from speckv.paths import cache_dir
from speckv.records import feature_matrix, read_records
from speckv.runtime import Controller, drafting_costs, onnx_proto
from speckv.runtime.contract import KEY_FORMAT_VERSION, PRE_OUTPUTS, STEP_OUTPUTS
from speckv.runtime.costs import tree_step_costs
from speckv.runtime.features import pre_from_step_features
from speckv.runtime.proposal import TREES

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "cpp"
CONTROLLER = ROOT / "export" / "speckv.onnx"
RECORDS = ROOT / "datamodules" / "smollm2-demo" / "smollm2-demo.parquet"


def _sdk() -> Path | None:
    """The SDK build.sh will use without --fetch, or None when there is none."""
    if os.environ.get("ONNXRUNTIME_ROOT"):
        return Path(os.environ["ONNXRUNTIME_ROOT"])  # build.sh says what is missing there
    version = re.search(r"^ORT_VERSION=(\S+)$", (EXAMPLE / "build.sh").read_text(), re.M)
    cached = cache_dir() / f"onnxruntime-{version.group(1)}"
    return cached if (cached / "include" / "onnxruntime_cxx_api.h").is_file() else None


@pytest.fixture(scope="module")
def choose_gamma(tmp_path_factory) -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}; set CXX)")
    if _sdk() is None:
        pytest.skip("no ONNX Runtime SDK: set ONNXRUNTIME_ROOT, or run "
                    "`examples/cpp/build.sh --fetch` once")
    out = tmp_path_factory.mktemp("cpp") / "choose_gamma"
    built = subprocess.run(["bash", str(EXAMPLE / "build.sh"), "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"build.sh failed:\n{built.stdout}{built.stderr}"
    return out


def _run(binary: Path, *models: Path, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, models)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def decisions() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Input lines for 40 decisions and Python's answers: (lines, speculate, gamma).

    20 rows of the bundled records (features, pre-draft vectors at 0..5 unsettled tokens,
    their measured costs), then the same rows with costs that favour long drafts.
    """
    df = read_records(RECORDS)
    rows = df.iloc[np.sort(np.random.default_rng(0).choice(len(df), 20, replace=False))]
    features = feature_matrix(rows)
    unsettled = np.arange(len(rows)) % 6
    pre = pre_from_step_features(features, features, unsettled)
    verify = np.stack(rows["cost_verify_s"].to_numpy())
    draft = rows["cost_draft_s"].to_numpy()
    costs = drafting_costs(draft, verify, None, unsettled + 1)
    if "cost_tree_verify_s" in rows and rows["cost_tree_verify_s"].notna().all():
        grow = np.stack(rows["cost_tree_draft_s"].to_numpy())
        tree_verify = np.stack(rows["cost_tree_verify_s"].to_numpy())
    else:  # records from before trees: their verify times, stretched per tree
        grow = draft[:, None] * np.asarray([t.draft_forwards for t in TREES])
        tree_verify = verify[:, -1:] * np.asarray([1 + 0.02 * t.size for t in TREES])
    costs = np.concatenate([costs, tree_step_costs(draft, grow, tree_verify, None,
                                                   unsettled + 1)], 1)
    controller = Controller.load(CONTROLLER)
    costs = costs[:, : controller.n_options]  # a file without trees chooses among chains
    plain = verify[:, 0].astype(np.float32)
    flat = np.broadcast_to(np.linspace(1.0, 1.35, costs.shape[1], dtype=np.float32), costs.shape)
    features, pre = np.concatenate([features] * 2), np.concatenate([pre] * 2)
    costs, plain = np.concatenate([costs, flat]), np.concatenate([plain, np.ones_like(plain)])

    speculate = controller.speculate_batch(pre, costs, plain)
    gamma = controller.choose_batch(features, costs)
    # a comparison worth making: both answers to "speculate?" and several γs
    assert set(speculate) == {False, True} and len(set(gamma)) >= 3, (speculate, gamma)
    lines = [" ".join(f"{x:.9g}" for x in (*f, *p, *c, q))  # 9 digits: float32 exactly
             for f, p, c, q in zip(features, pre, costs, plain, strict=True)]
    return lines, speculate, gamma


def _check(result: subprocess.CompletedProcess, speculate: np.ndarray, gamma: np.ndarray) -> None:
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["speculate"] for g in got] == speculate.tolist()
    assert [g["gamma"] for g in got] == gamma.tolist()


def test_the_guide_s_example_line_gives_the_guide_s_answer(choose_gamma):
    """docs/EMBEDDING.md, section 7, as written there."""
    numbers, said = cpp_example()
    result = _run(choose_gamma, CONTROLLER, lines=[" ".join(f"{x:g}" for x in numbers)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == said


def test_cpp_decides_as_python(choose_gamma, decisions):
    lines, speculate, gamma = decisions
    result = _run(choose_gamma, CONTROLLER, lines=lines)
    _check(result, speculate, gamma)
    assert "speckv controller format 3" in result.stderr


def test_cpp_with_the_two_extracted_files(choose_gamma, decisions, tmp_path):
    data = CONTROLLER.read_bytes()
    pre, step = tmp_path / "speckv.pre.onnx", tmp_path / "speckv.step.onnx"
    pre.write_bytes(onnx_proto.extract(data, list(PRE_OUTPUTS)))
    step.write_bytes(onnx_proto.extract(data, list(STEP_OUTPUTS)))
    lines, speculate, gamma = decisions
    _check(_run(choose_gamma, pre, step, lines=lines), speculate, gamma)


def test_cpp_refuses_another_format_and_bad_inputs(choose_gamma, decisions, tmp_path):
    old = tmp_path / "format1.onnx"
    old.write_bytes(onnx_proto.replace_metadata(CONTROLLER.read_bytes(),
                                                {KEY_FORMAT_VERSION: "1"}))
    lines = decisions[0]
    result = _run(choose_gamma, old, lines=lines[:1])
    assert result.returncode == 1 and result.stdout == ""
    assert "uses controller format 1; this program reads format 3: retrain" in result.stderr

    numbers = lines[0].split()
    numbers[-1] = "0"  # a plain step that costs nothing
    result = _run(choose_gamma, CONTROLLER, lines=[" ".join(numbers)])
    assert result.returncode == 1 and "plain cost must be > 0" in result.stderr
    result = _run(choose_gamma, CONTROLLER, lines=[" ".join(numbers[:-1])])
    assert result.returncode == 1 and "numbers (10 features" in result.stderr
