"""The cost model: it records what it was measured for, and refuses to price another run."""

from __future__ import annotations

import json

import pytest

from speckv.decode.costs import CostError, CostModel, measure_costs
from speckv.machine import fingerprint
from speckv.runtime.features import GAMMA_MAX

RUN = {"compression": "fp16", "target_model": "t", "draft_model": "d", "threads": 1,
       "compute_dtype": "bfloat16"}


def measured(**changes) -> CostModel:
    fields = {"cost_draft_s": 0.01, "cost_verify_s": [0.05] * (GAMMA_MAX + 1),
              "compression": "fp16", "compute_dtype": "bfloat16", "draft_model": "d",
              "target_model": "t", "threads": 1, "machine": fingerprint(1)}
    return CostModel(**{**fields, **changes})


def test_measure_costs_records_the_machine_models_and_threads(tiny_pair, tmp_path):
    draft, target = tiny_pair
    costs = measure_costs(draft, target, context_len=8, repeats=1, warmup=0)
    assert costs.threads == 1  # the test suite runs torch on one thread
    assert costs.machine == fingerprint(1)
    assert costs.draft_model and costs.target_model
    saved = json.loads(costs.save(tmp_path / "c.json").read_text())
    assert saved["machine"]["cpu"] == fingerprint()["cpu"] and saved["threads"] == 1
    again = CostModel.load(tmp_path / "c.json")
    assert again == costs
    assert again.mismatches(compression="fp16", target_model=costs.target_model,
                            draft_model=costs.draft_model, threads=1) == []


def test_a_matching_cost_model_passes():
    costs = measured()
    assert costs.check(**RUN) is costs
    assert costs.check(**{**RUN, "draft_model": None}) is costs  # a run without a draft


@pytest.mark.parametrize(("change", "field"), [
    ({"compression": "int8"}, "compression"),
    ({"target_model": "other-target"}, "target"),
    ({"draft_model": "other-draft"}, "draft"),
    ({"threads": 2}, "threads"),
    ({"compute_dtype": "float32"}, "compute dtype"),
])
def test_a_cost_model_for_another_run_is_refused_with_what_to_do(change, field):
    with pytest.raises(CostError) as err:
        measured().check(**{**RUN, **change}, source="costs.json")
    msg = str(err.value)
    assert f"{field}:" in msg and "costs.json" in msg
    assert "--save-costs" in msg and "drop --costs" in msg
    assert "\n" not in msg
    # one mismatch: threads are named once, not again inside the machine fingerprint
    assert msg.count("there,") == 1


def test_a_cost_model_from_another_machine_is_refused():
    other = {**fingerprint(1), "cpu": "Some Other CPU",
             "isa": {**fingerprint(1)["isa"], "avx2": not fingerprint(1)["isa"]["avx2"]}}
    msg = "; ".join(measured(machine=other).mismatches(**RUN))
    assert "machine cpu:" in msg and "Some Other CPU" in msg and "machine isa:" in msg
    # library versions that do not change costs are no reason to re-measure
    assert measured(machine={**fingerprint(1), "numpy": "0.0"}).mismatches(**RUN) == []


def test_a_cost_file_without_a_fingerprint_is_refused(tmp_path):
    old = measured().to_json()
    del old["machine"]  # written before speckv recorded the machine
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    costs = CostModel.load(path)
    assert costs.machine is None
    with pytest.raises(CostError, match="no fingerprint"):
        costs.check(**RUN, source=path)


def test_same_local_model_spelled_two_ways_is_the_same(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    costs = measured(target_model=str(tmp_path / "m"))
    assert costs.mismatches(**{**RUN, "target_model": "m"}) == []
    assert costs.mismatches(**{**RUN, "target_model": "n"}) != []


def test_unusable_cost_files_say_how_to_get_one(tmp_path):
    with pytest.raises(CostError, match="--save-costs"):
        CostModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CostError, match="not JSON"):
        CostModel.load(tmp_path / "bad.json")
    (tmp_path / "foreign.json").write_text('{"speed": 3}')
    with pytest.raises(CostError, match="Not a speckv cost model"):
        CostModel.load(tmp_path / "foreign.json")
    with pytest.raises(CostError, match="fingerprint"):
        measured(machine="x86_64")
