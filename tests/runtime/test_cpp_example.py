"""The C++ example (examples/cpp/choose_gamma.cpp) decides as the Python ``Controller`` does:
the lookup decision, speculate-or-not and the option.

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
from guide import cpp_example, text
from locations import ROOT

from speckv.paths import cache_dir
from speckv.records import feature_matrix, read_records
from speckv.runtime import Controller, drafting_costs, onnx_proto
from speckv.runtime.contract import (
    KEY_FORMAT_VERSION,
    LOOKUP_OUTPUTS,
    PRE_OUTPUTS,
    STEP_OUTPUTS,
    UNAVAILABLE_COST,
)
from speckv.runtime.costs import tree_step_costs
from speckv.runtime.features import lookup_features, pre_from_step_features
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
def decisions() -> tuple[list[str], list[dict]]:
    """Input lines for 180 steps and Python's answers to them, as the program prints them.

    60 rows of the bundled records (features, pre-draft vectors at 0..5 unsettled tokens,
    their measured costs, the context lookup's proposal where it made one, priced as one
    target forward over it and the last token), then the same rows with costs that favour
    long drafts, then with no draft model (every option UNAVAILABLE_COST: the lookup against
    plain steps alone). A row whose lookup proposed nothing is a line without the lookup's
    numbers, and its answer has no "lookup".
    """
    df = read_records(RECORDS)
    rows = df.iloc[np.sort(np.random.default_rng(0).choice(len(df), 60, replace=False))]
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
    length = rows["lookup_length"].to_numpy()
    lookup = lookup_features(pre, length, rows["lookup_match"].to_numpy(),
                             rows["lookup_occurrences"].to_numpy(),
                             rows["lookup_agreeing"].to_numpy())
    lookup_cost = verify[np.arange(len(rows)), length].astype(np.float32)
    flat = np.broadcast_to(np.linspace(1.0, 1.35, costs.shape[1], dtype=np.float32), costs.shape)
    unavailable = np.full_like(costs, UNAVAILABLE_COST)
    features, pre, lookup, length = (np.concatenate([x] * 3)
                                     for x in (features, pre, lookup, length))
    costs = np.concatenate([costs, flat, unavailable])
    plain = np.concatenate([plain, np.ones_like(plain), plain])
    lookup_cost = np.concatenate([lookup_cost, 1 + 0.04 * length[: len(rows)], lookup_cost])

    speculate = controller.speculate_batch(pre, costs, plain)
    gamma = controller.choose_batch(features, costs)
    answers, lines = [], []
    for i in range(len(features)):
        said = {"speculate": bool(speculate[i]), "gamma": int(gamma[i])}
        numbers = [*features[i], *pre[i], *costs[i], plain[i]]
        if length[i]:  # the lookup proposed: its signals and cost, and its decision
            said = {"lookup": controller.use_lookup(lookup[i], float(lookup_cost[i]), pre[i],
                                                    costs[i], float(plain[i])), **said}
            numbers += [*lookup[i, :4], lookup_cost[i]]
        answers.append(said)
        lines.append(" ".join(f"{x:.9g}" for x in numbers))  # 9 digits: float32 exactly
    # a comparison worth making: both answers to each yes-or-no question and several γs
    for key in ("lookup", "speculate"):
        assert {a[key] for a in answers if key in a} == {False, True}, (key, answers)
    assert len({a["gamma"] for a in answers}) >= 3, answers
    return lines, answers


def _check(result: subprocess.CompletedProcess, answers: list[dict]) -> None:
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == answers


def _guide_examples() -> list[tuple[list[float], dict]]:
    """Every `echo "..." | choose_gamma` of docs/EMBEDDING.md and the answer shown below it
    (``guide.cpp_example`` reads the first)."""
    pattern = r'echo "([^"]+)"[^\n]*\n[^\n]*choose_gamma[^\n]*\n(\{[^\n]*\})'
    found = [([float(x) for x in m.group(1).replace("\\", " ").split()], json.loads(m.group(2)))
             for m in re.finditer(pattern, text())]
    assert found and found[0] == cpp_example()
    return found


def test_the_guide_s_example_lines_give_the_guide_s_answers(choose_gamma):
    """docs/EMBEDDING.md, section 7, as written there: the program says what the guide says,
    and so does the Python runtime (a line with the lookup's 5 numbers asks it too)."""
    examples = _guide_examples()
    assert any("lookup" in said for _, said in examples), "the guide shows no lookup decision"
    controller = Controller.load(CONTROLLER)
    g = controller.n_options
    for numbers, said in examples:
        result = _run(choose_gamma, CONTROLLER, lines=[" ".join(f"{x:g}" for x in numbers)])
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == said
        features, pre, costs, plain = (numbers[:10], numbers[10:18], numbers[18:18 + g],
                                       numbers[18 + g])
        python = {"speculate": controller.speculate(pre, costs, plain),
                  "gamma": controller.choose(features, costs)}
        if len(numbers) > 19 + g:
            *signals, lookup_cost = numbers[19 + g:]
            python["lookup"] = controller.use_lookup([*signals, *pre], lookup_cost, pre, costs,
                                                     plain)
        assert python == said, f"docs/EMBEDDING.md, section 7: write {json.dumps(python)}"


def test_cpp_decides_as_python(choose_gamma, decisions):
    lines, answers = decisions
    result = _run(choose_gamma, CONTROLLER, lines=lines)
    _check(result, answers)
    assert "speckv controller format 4" in result.stderr


def _extract(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The three decisions as the Python runtime extracts them: lookup, pre-draft, step."""
    data = CONTROLLER.read_bytes()
    files = []
    for name, outputs in (("lookup", LOOKUP_OUTPUTS), ("pre", PRE_OUTPUTS),
                          ("step", STEP_OUTPUTS)):
        files.append(tmp_path / f"speckv.{name}.onnx")
        files[-1].write_bytes(onnx_proto.extract(data, list(outputs)))
    return tuple(files)


def test_cpp_with_the_three_extracted_files(choose_gamma, decisions, tmp_path):
    lines, answers = decisions
    _check(_run(choose_gamma, *_extract(tmp_path), lines=lines), answers)
    # a decoder without a context lookup needs only the other two
    plain = [i for i, a in enumerate(answers) if "lookup" not in a]
    _check(_run(choose_gamma, *_extract(tmp_path)[1:], lines=[lines[i] for i in plain]),
           [answers[i] for i in plain])


def test_cpp_refuses_another_format_and_bad_inputs(choose_gamma, decisions, tmp_path):
    lines, answers = decisions
    for version, todo in (("3", "retrain and re-export it (`python -m speckv.train fit`, then "
                                "`python -m speckv export`)"),
                          ("5", "update this program to the new format")):
        other = tmp_path / f"format{version}.onnx"
        other.write_bytes(onnx_proto.replace_metadata(CONTROLLER.read_bytes(),
                                                      {KEY_FORMAT_VERSION: version}))
        result = _run(choose_gamma, other, lines=lines[:1])
        assert result.returncode == 1 and result.stdout == ""
        assert (f"uses controller format {version}; this program reads format 4: {todo}"
                in result.stderr)

    def refused(numbers: list[str], *models: Path) -> str:
        result = _run(choose_gamma, *(models or (CONTROLLER,)), lines=[" ".join(numbers)])
        assert result.returncode == 1 and result.stdout == "", result.stderr
        return result.stderr

    numbers = lines[next(i for i, a in enumerate(answers) if "lookup" not in a)].split()
    assert "plain cost must be > 0" in refused([*numbers[:-1], "0"])  # a free plain step
    assert "numbers (10 features" in refused(numbers[:-1])
    proposing = lines[next(i for i, a in enumerate(answers) if "lookup" in a)].split()
    signals = len(proposing) - 5
    assert "the lookup cost must be > 0" in refused([*proposing[:-1], "0"])
    for length in ("0", "9", "2.5"):
        assert "lookup's length must be a whole number of tokens, 1 to 8" in refused(
            [*proposing[:signals], length, *proposing[signals + 1:]])
    assert "no lookup output: pass the extracted lookup decision too" in refused(
        proposing, *_extract(tmp_path)[1:])
