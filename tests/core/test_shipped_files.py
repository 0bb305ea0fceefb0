"""What the repository ships is usable as it is: the controller, the bundled records and the
demo draft (read as a user would, through speckv's own loaders).

A failure here means a shipped file fell behind the code (e.g. a new controller format):
rebuild it with scripts/bundle.sh rather than loosening the test.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from locations import ROOT

from speckv.records import read_metadata, validate
from speckv.runtime.features import COMPRESSIONS, FEATURE_NAMES, GAMMA_MAX, GAMMAS

CONTROLLER = ROOT / "export" / "speckv.onnx"
RECORD_FILES = sorted(ROOT.glob("datamodules/*/*.parquet"))
DRAFT = ROOT / "models" / "speckv-draft"
#: the demo draft stores only what it does not share with the target
DRAFT_BUDGET_BYTES = 30_000_000


@pytest.fixture(scope="module")
def bundled_rows():
    """Up to 700 rows per compression level of each bundled record file whose rows price
    the trees (the Hugging Face ones; llama.cpp verifies chains only)."""
    import pandas as pd

    frames = []
    for path in RECORD_FILES:
        df = pq.read_table(path).to_pandas()
        df = df[df["cost_tree_verify_s"].notna()]
        frames += [group.sample(min(len(group), 700), random_state=0)
                   for _, group in df.groupby("compression", observed=True)]
    return pd.concat(frames, ignore_index=True)


def test_records_are_bundled():
    assert RECORD_FILES, "no datamodules/*/*.parquet"


@pytest.mark.parametrize("path", RECORD_FILES, ids=lambda p: p.parent.name)
def test_bundled_records_validate_and_carry_their_metadata(path: Path):
    df = validate(pq.read_table(path).to_pandas(), path)
    assert len(df) > 0
    assert set(df["compression"].astype(str)) <= set(COMPRESSIONS)
    meta = read_metadata(path)
    runs = meta.get("runs")
    assert isinstance(runs, dict) and runs, f"{path} has no run metadata"
    assert set(df["run_id"].astype(str)) <= set(runs), "rows of runs the metadata omits"
    for run_id, run in runs.items():
        assert run.get("draft") and run.get("target"), run_id
        assert run.get("compression") in COMPRESSIONS, run_id
        cost = run.get("cost") or {}
        assert cost.get("cost_draft_s", 0) > 0, run_id
        verify = cost.get("cost_verify_s") or []
        assert len(verify) == GAMMA_MAX + 1 and min(verify) > 0, run_id
    # each folder is a LightningCLI --data config with a data card
    assert (path.parent / "data.yaml").is_file()
    assert (path.parent / "README.md").is_file()


def test_the_shipped_controller_loads_and_chooses_a_gamma_on_bundled_rows(bundled_rows):
    from speckv.records import feature_matrix
    from speckv.runtime import Controller
    from speckv.runtime.costs import step_costs, tree_step_costs
    from speckv.runtime.proposal import TREES

    ctrl = Controller.load(CONTROLLER)  # checks format, feature names and order, γs
    assert tuple(ctrl.feature_names) == tuple(FEATURE_NAMES)
    assert tuple(ctrl.gammas) == GAMMAS
    features = feature_matrix(bundled_rows)
    draft = bundled_rows["cost_draft_s"].to_numpy(np.float64)
    costs = np.concatenate([  # the chains, then the trees the records priced
        step_costs(draft, np.stack(bundled_rows["cost_verify_s"].to_numpy())),
        tree_step_costs(draft, np.stack(bundled_rows["cost_tree_draft_s"].to_numpy()),
                        np.stack(bundled_rows["cost_tree_verify_s"].to_numpy()))], 1)
    assert ctrl.n_options == costs.shape[1] == len(GAMMAS) + len(TREES)
    gammas = ctrl.choose_batch(features, costs)
    assert gammas.shape == (len(bundled_rows),)
    assert set(np.unique(gammas)) <= set(ctrl.info.codes)
    # one row at a time gives the same choice as the batch
    for i in range(0, len(bundled_rows), 97):
        assert ctrl.choose(features[i], costs[i]) == gammas[i]


def test_the_llamacpp_controller_decides_on_llamacpps_records():
    """export/speckv-llamacpp.onnx (trained on datamodules/smollm2-llamacpp) loads, has its
    JSON sidecar, and decides on those rows, its trees priced out (llama.cpp verifies none)."""
    from speckv.records import feature_matrix
    from speckv.runtime import Controller, check_sidecar
    from speckv.runtime.contract import UNAVAILABLE_COST
    from speckv.runtime.costs import step_costs

    path = ROOT / "export" / "speckv-llamacpp.onnx"
    records = ROOT / "datamodules" / "smollm2-llamacpp" / "smollm2-llamacpp.parquet"
    ctrl = Controller.load(path)
    assert check_sidecar(path) == ctrl.info.to_metadata()
    df = pq.read_table(records).to_pandas().sample(2000, random_state=0)
    assert df["cost_tree_verify_s"].isna().all()
    chains = step_costs(df["cost_draft_s"].to_numpy(np.float64),
                        np.stack(df["cost_verify_s"].to_numpy()))
    costs = np.concatenate([chains, np.full((len(df), ctrl.n_options - chains.shape[1]),
                                            UNAVAILABLE_COST, np.float32)], 1)
    options = ctrl.choose_batch(feature_matrix(df), costs)
    assert set(np.unique(options)) <= set(range(1, len(GAMMAS) + 1))  # chains only


def test_the_shipped_controller_s_metadata_json_describes_it():
    """export/speckv.json (for clients without an ONNX metadata API) holds the file's digest
    and exactly its speckv.* metadata."""
    from speckv.runtime import Controller, check_sidecar

    props = check_sidecar(CONTROLLER)
    info = Controller.load(CONTROLLER).info
    assert props == info.to_metadata()
    assert json.loads(props["speckv.feature_names"]) == list(FEATURE_NAMES)


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size))


def test_the_demo_draft_card_is_well_formed():
    """The demo draft is feature-conditioned (speckv.llm.feature_draft): its card names the
    kind, the base it plugs into, the target layer it started from and its shapes."""
    card = json.loads((DRAFT / "speckv_draft.json").read_text())
    assert card.get("kind") == "feature"
    assert isinstance(card.get("base"), str) and card["base"]
    assert isinstance(card.get("init_layer"), int) and card["init_layer"] >= 0
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "draft_vocab"):
        assert isinstance(card.get(key), int) and card[key] > 0, key
    assert card["draft_vocab"] < card["vocab_size"]
    assert (DRAFT / "README.md").is_file()  # the model card


def test_the_demo_draft_stores_no_shared_tensors_and_stays_small():
    card = json.loads((DRAFT / "speckv_draft.json").read_text())
    weights = DRAFT / "draft.safetensors"
    assert weights.stat().st_size < DRAFT_BUDGET_BYTES
    tensors = {k: v for k, v in _safetensors_header(weights).items() if k != "__metadata__"}
    # the target's embeddings and its head rows are taken from the target, never stored
    assert not [k for k in tensors if k.startswith("embed_tokens.") or k == "lm_head.weight"]
    # its own parts: the fusing map, one decoder layer, the final norm, the head's token ids
    assert tensors["fc.weight"]["shape"] == [card["hidden_size"], 2 * card["hidden_size"]]
    assert {k.split(".")[0] for k in tensors} == {"fc", "layer", "norm", "lm_head"}
    assert tensors["lm_head.token_ids"]["shape"] == [card["draft_vocab"]]
    # no two tensors share bytes
    spans = sorted(tuple(v["data_offsets"]) for v in tensors.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    float_dtypes = {v["dtype"] for k, v in tensors.items() if not k.endswith("token_ids")}
    assert float_dtypes == {"BF16"}
