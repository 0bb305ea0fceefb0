"""A client written from docs/EMBEDDING.md alone decides as speckv.runtime does.

:class:`Client` is what a decoder in another language would write after reading the guide:
the draft statistics, both feature vectors, the history and the costs are the guide's
formulas typed in again (nothing of speckv builds them), the metadata comes from the JSON
beside the file (section 3) and the graph runs on onnxruntime directly. Its decisions must
equal speckv.runtime's on rows of the bundled records and on raw logits; a change to speckv
that the guide does not describe fails here. The guide's own examples are checked at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from guide import cpp_example, python_blocks
from locations import ROOT

from speckv.records import feature_matrix
from speckv.runtime import Controller, History, RowStats, StepCosts, drafting_costs
from speckv.runtime.features import (
    lookup_features,
    pre_features,
    pre_from_step_features,
    step_features,
)

ONNX = ROOT / "export" / "speckv.onnx"
RECORDS = ROOT / "datamodules" / "smollm2-demo" / "smollm2-demo.parquet"

# ------------------------------------------------------------- the guide, typed in again
#: section 4's tables, in order
STEP_NAMES = ["draft_entropy", "draft_top1", "draft_margin", "target_top1_prev", "agree_ema",
              "agree_run", "log_position", "compression_fp16", "compression_int8",
              "compression_nf4"]
PRE_NAMES = ["target_top1_prev", "agree_ema", "agree_run", "unsettled", "log_position",
             "compression_fp16", "compression_int8", "compression_nf4"]
#: the lookup vector's table: the proposal's four signals, then the pre-draft vector
LOOKUP_NAMES = ["lookup_length", "lookup_match", "lookup_log_occurrences", "lookup_agreeing",
                *PRE_NAMES]
LEVELS = ["fp16", "int8", "nf4"]
CAP = 16  # "capped at 16, divided by 16"


def log_position(n: int) -> float:
    """Section 4: numpy's float32 log1p of the tokens generated so far."""
    return float(np.log1p(np.float32(n)))


def statistics(logits: np.ndarray) -> tuple[float, float, float]:
    """Section 4: entropy, top-1 and margin in one pass, here in double precision."""
    x = logits.astype(np.float64)
    best = int(np.argmax(x))
    m = x[best]
    z = x - m
    e = np.exp(z)
    total = e.sum()
    x2 = max(np.max(x[:best], initial=-np.inf), np.max(x[best + 1 :], initial=-np.inf))
    return (math.log(total) - float((e * z).sum()) / total, 1.0 / total,
            (1.0 - math.exp(x2 - m)) / total)


def lookup_vector(length: int, match: int, occurrences: int, agreeing: int,
                  pre: list[float]) -> list[float]:
    """Section 4's lookup vector: log1p in float32 as for the position, the share of agreeing
    occurrences, then the pre-draft vector."""
    return [float(length), float(match), float(np.log1p(np.float32(occurrences))),
            agreeing / max(occurrences, 1), *pre]


def onehot(compression: str) -> list[float]:
    return [1.0 if compression == level else 0.0 for level in LEVELS]


class GuideHistory:
    """Section 4's history: agreement per position, settled now or deferred to the draft's
    next forward; the EMA and the probabilities kept in double precision."""

    def __init__(self) -> None:
        self.ema, self.run, self.settled, self.top1_prev = 0.5, 0, 0, 1.0
        self.pending: list[float] = []

    def settle(self, agreed: bool, target_top1: float) -> None:
        assert not self.pending
        self._settle(agreed, target_top1)

    def _settle(self, agreed: bool, target_top1: float) -> None:
        self.ema = 0.75 * self.ema + 0.25 * float(agreed)
        self.run = self.run + 1 if agreed else 0
        self.settled += 1
        self.top1_prev = target_top1

    def defer(self, target_top1: float) -> None:
        self.pending.append(target_top1)

    def settle_deferred(self, verdicts: list[bool]) -> None:
        for agreed, top1 in zip(verdicts, self.pending, strict=True):
            self._settle(agreed, top1)
        self.pending = []


def step_costs(t_draft: float, t_verify: list[float], t_catchup: list[float] | None,
               n: int) -> np.ndarray:
    """Section 5: the 8 costs of a step whose first draft forward covers ``n`` tokens."""
    def catchup(n: int) -> float:
        if not t_catchup:
            return t_draft
        m = len(t_catchup)
        if n <= m:
            return t_catchup[n - 1]
        if m == 1:
            return t_catchup[0]
        return t_catchup[m - 1] + (n - m) * max(t_catchup[m - 1] - t_catchup[m - 2], 0.0)

    return np.array([catchup(n) + (g - 1) * t_draft + t_verify[g] for g in range(1, 9)],
                    np.float32)


class Client:
    """Section 3's checks, then both vectors and one onnxruntime call per batch of decisions."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
        meta = sidecar["metadata_props"]
        assert meta["speckv.format_version"] == "4" and meta["speckv.inputs"] == "features"
        # section 3: the options are the 8 chains, then the file's trees; this client runs
        # chains only, and prices the trees 1e30, so they are never chosen
        self.trees = json.loads(meta["speckv.trees"])
        assert json.loads(meta["speckv.feature_names"]) == STEP_NAMES
        assert json.loads(meta["speckv.pre_feature_names"]) == PRE_NAMES
        assert json.loads(meta["speckv.lookup_feature_names"]) == LOOKUP_NAMES
        self.lookup_max = int(meta["speckv.lookup_max_tokens"])
        assert json.loads(meta["speckv.gammas"]) == list(range(1, 9))
        self.max_skip_run = int(meta["speckv.max_skip_run"])
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        assert [i.name for i in self.session.get_inputs()] == [
            "features", "pre_features", "costs", "plain_cost", "lookup_features", "lookup_cost"]
        assert {"lookup", "speculate", "gamma"} <= {o.name for o in self.session.get_outputs()}

    @staticmethod
    def step_vector(stats: tuple[float, float, float], h: GuideHistory,
                    compression: str) -> list[float]:
        assert not h.pending  # decision 2 runs on a complete history
        return [*stats, h.top1_prev, h.ema, min(h.run, CAP) / CAP, log_position(h.settled),
                *onehot(compression)]

    @staticmethod
    def pre_vector(h: GuideHistory, compression: str) -> list[float]:
        u = len(h.pending)
        last = h.pending[-1] if h.pending else h.top1_prev
        return [last, h.ema, min(h.run, CAP) / CAP, min(u, CAP) / CAP,
                log_position(h.settled + u), *onehot(compression)]

    def options(self, costs) -> np.ndarray:
        """The 8 chain costs per row, then 1e30 for each of the file's trees."""
        chains = np.asarray(costs, np.float32).reshape(-1, 8)
        return np.concatenate([chains, np.full((len(chains), len(self.trees)), 1e30,
                                               np.float32)], 1)

    def decide(self, features, pre, costs, plain, lookup=None, lookup_cost=None
               ) -> dict[str, np.ndarray]:
        """Every output for a batch, after checking section 3's rules on them. Without a
        lookup proposal, placeholders fill its inputs (section 3) and ``lookup`` means
        nothing."""
        pre = np.asarray(pre, np.float32).reshape(-1, 8)
        if lookup is None:
            lookup = np.concatenate([np.ones((len(pre), 2)), np.zeros((len(pre), 2)), pre], 1)
            lookup_cost = np.ones(len(pre))
        feeds = {"features": np.asarray(features, np.float32).reshape(-1, 10),
                 "pre_features": pre,
                 "costs": self.options(costs),
                 "plain_cost": np.asarray(plain, np.float32).reshape(-1, 1),
                 "lookup_features": np.asarray(lookup, np.float32).reshape(-1, 12),
                 "lookup_cost": np.asarray(lookup_cost, np.float32).reshape(-1, 1)}
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(names, feeds), strict=True))
        # speculate: some γ beats a plain step, a tie going to the plain step
        best = (out["pre_expected_tokens"] / feeds["costs"]).max(-1) * feeds["plain_cost"][:, 0]
        np.testing.assert_array_equal(out["speculate"], (best > 1).astype(np.int64))
        # gamma: the most expected tokens per unit cost, of equal ratios the smaller γ
        ratio = out["expected_tokens"] / feeds["costs"]
        np.testing.assert_array_equal(out["gamma"], ratio.argmax(-1) + 1)
        # lookup: its tokens per cost beat a plain step's and every option's before drafting
        n = feeds["lookup_features"][:, 0].astype(int)
        within = np.arange(1, self.lookup_max + 1)[None] <= n[:, None]
        np.testing.assert_allclose(out["lookup_expected_tokens"][:, 0],
                                   1 + (out["lookup_survival"] * within).sum(1), rtol=1e-5)
        other = np.maximum((out["pre_expected_tokens"] / feeds["costs"]).max(-1),
                           1 / feeds["plain_cost"][:, 0])
        rate = out["lookup_expected_tokens"][:, 0] / feeds["lookup_cost"][:, 0]
        clear = np.abs(rate / other - 1) > 1e-5  # float32 cannot tip these
        np.testing.assert_array_equal(out["lookup"][clear], (rate > other)[clear])
        return out


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(ONNX)


@pytest.fixture(scope="module")
def controller() -> Controller:
    return Controller.load(ONNX)


# --------------------------------------------------------------- on the bundled records
@pytest.fixture(scope="module")
def sequences():
    """Every row of 36 answers (12 per compression level), in position order."""
    df = pq.read_table(RECORDS).to_pandas()
    rng = np.random.default_rng(24)
    picked = []
    for _, level in df.groupby("compression", observed=True):
        ids = level["prompt_id"].unique()
        for prompt in rng.choice(ids, 12, replace=False):
            picked.append(level[level["prompt_id"] == prompt].sort_values("position"))
    return picked


def test_the_client_decides_as_the_runtime_on_bundled_rows(client, controller, sequences):
    """The three decisions on 3,000-odd real rows, each with a pre-draft vector 0..24 tokens
    behind and the catch-up that goes with it (the records measure 18 sizes: past them the
    costs are extrapolated), the row's measured costs."""
    rng = np.random.default_rng(0)
    mine: dict[str, list] = {"features": [], "pre": [], "costs": [], "plain": [],
                             "lookup": [], "lookup_cost": []}
    theirs: dict[str, list] = {"features": [], "pre": [], "costs": [], "plain": [],
                               "lookup": [], "lookup_cost": []}
    for seq in sequences:
        p = seq["position"].to_numpy()
        assert (p == np.arange(len(seq))).all()  # a trace has a row at every position
        u = np.minimum(rng.integers(0, 25, len(seq)), p)
        for row, back in zip(seq.itertuples(), u, strict=True):
            settled = seq.iloc[row.position - back]  # the history ends u tokens back
            verify = [float(v) for v in row.cost_verify_s]
            mine["features"].append([row.draft_entropy, row.draft_top1, row.draft_margin,
                                     row.target_top1_prev, row.agree_ema,
                                     min(row.agree_run, CAP) / CAP, log_position(row.position),
                                     *onehot(row.compression)])
            mine["pre"].append([row.target_top1_prev, settled.agree_ema,
                                min(settled.agree_run, CAP) / CAP, min(back, CAP) / CAP,
                                log_position(row.position), *onehot(row.compression)])
            mine["costs"].append(step_costs(float(row.cost_draft_s), verify,
                                            [float(v) for v in row.cost_catchup_s], back + 1))
            mine["plain"].append(verify[0])
            n = max(int(row.lookup_length), 1)  # a placeholder of 1 where nothing is proposed
            mine["lookup"].append(lookup_vector(n, row.lookup_match, row.lookup_occurrences,
                                                row.lookup_agreeing, mine["pre"][-1]))
            mine["lookup_cost"].append(verify[n])
        # speckv's way, as replay and training build them
        x = feature_matrix(seq)
        theirs["features"].append(x)
        theirs["pre"].append(pre_from_step_features(x, x[p - u], u))
        theirs["costs"].append(drafting_costs(
            seq["cost_draft_s"].to_numpy(np.float64),
            np.stack(seq["cost_verify_s"].to_numpy()).astype(np.float64),
            np.stack(seq["cost_catchup_s"].to_numpy()).astype(np.float64), u + 1))
        theirs["plain"].append(np.stack(seq["cost_verify_s"].to_numpy())[:, 0])
        n = np.maximum(seq["lookup_length"].to_numpy(np.int64), 1)
        theirs["lookup"].append(lookup_features(
            theirs["pre"][-1], n, seq["lookup_match"].to_numpy(np.int64),
            seq["lookup_occurrences"].to_numpy(np.int64),
            seq["lookup_agreeing"].to_numpy(np.int64)))
        verify_all = np.stack(seq["cost_verify_s"].to_numpy())
        theirs["lookup_cost"].append(verify_all[np.arange(len(seq)), n])
    mine = {k: np.asarray(v, np.float32) for k, v in mine.items()}
    theirs = {k: np.concatenate(v).astype(np.float32) for k, v in theirs.items()}
    assert len(mine["features"]) > 2500 and mine["pre"][:, 3].max() == 1.0
    for key in mine:
        np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
    out = client.decide(mine["features"], mine["pre"], mine["costs"], mine["plain"],
                        mine["lookup"], mine["lookup_cost"])
    costs = client.options(theirs["costs"])  # the runtime prices the trees alike
    speculate = controller.speculate_batch(theirs["pre"], costs, theirs["plain"])
    gamma = controller.choose_batch(theirs["features"], costs)
    lookup = controller.predict_lookup(theirs["lookup"], theirs["lookup_cost"], theirs["pre"],
                                       costs, theirs["plain"]).lookup
    np.testing.assert_array_equal(out["speculate"].astype(bool), speculate)
    np.testing.assert_array_equal(out["gamma"], gamma)
    np.testing.assert_array_equal(out["lookup"].astype(bool), lookup)
    # a comparison worth making: both answers, and most γs
    assert 0 < speculate.mean() < 1 and len(set(gamma.tolist())) >= 4
    assert 0.05 < lookup.mean() < 0.95


def test_a_correctly_rounded_log_position_changes_no_decision_here(client, sequences):
    """Section 4: float32 log1p and the rounded double-precision value differ by at most one
    float32 step, and no decision on these rows changes with it."""
    n = np.arange(4096)
    numpy_way = np.log1p(n.astype(np.float32))
    rounded = np.array([math.log1p(i) for i in n]).astype(np.float32)
    steps = np.abs(numpy_way.view(np.int32) - rounded.view(np.int32))
    assert steps.max() <= 1
    rows = np.concatenate([feature_matrix(seq) for seq in sequences])
    costs = np.concatenate([drafting_costs(
        seq["cost_draft_s"].to_numpy(np.float64),
        np.stack(seq["cost_verify_s"].to_numpy()).astype(np.float64)) for seq in sequences])
    position = np.concatenate([seq["position"].to_numpy() for seq in sequences])
    other = rows.copy()
    other[:, 6] = rounded[position]
    pre, other_pre = (pre_from_step_features(r, r, 0) for r in (rows, other))
    plain = costs[:, 0]  # any plain cost near the drafting ones
    a = client.decide(rows, pre, costs, plain)
    b = client.decide(other, other_pre, costs, plain)
    assert (rows[:, 6] != other[:, 6]).any()
    for key in ("speculate", "gamma"):
        np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------- on raw logits, live
def _logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """A draft's row: flat, peaked, or one clear winner, at any offset."""
    x = rng.standard_normal(vocab) * rng.choice([0.5, 2.0, 6.0]) + rng.uniform(-30, 30)
    if rng.random() < 0.4:
        x[rng.integers(vocab)] += rng.uniform(3, 25)
    return x.astype(np.float32)


@pytest.mark.parametrize("vocab", [8192, 49152])
def test_the_client_decides_as_the_runtime_on_raw_logits(client, controller, vocab):
    """A decoding loop (section 2) driven by random verdicts, with a draft that reads the
    target's states and one that does not, at every compression: the client and the
    runtime, each with its own history, decide every step alike."""
    rng = np.random.default_rng(vocab)
    t_verify = [0.050 + 0.004 * g for g in range(9)]
    stats = RowStats()
    decisions = {"speculate": 0, "plain": 0, "gammas": set(), "most unseen": 0}
    worst = 0.0
    for sequence in range(12):
        mine, theirs = GuideHistory(), History()
        compression, reads_target = LEVELS[sequence % 3], sequence % 2 == 0
        # a cheap draft, and one nearly as slow as the target (plain steps pay there)
        t_draft = (0.004, 0.02, 0.04)[sequence % 4 % 3]
        t_catchup = [t_draft * (1 + 0.15 * n) for n in range(9)] + [t_draft * 2.1]  # noisy end
        costs = StepCosts(t_draft, t_verify, t_catchup)
        skipped = 0
        for _ in range(40):
            unseen = len(mine.pending) + 1
            step = step_costs(t_draft, t_verify, t_catchup, unseen)
            np.testing.assert_array_equal(step, costs.drafting(unseen))
            pre = Client.pre_vector(mine, compression)
            np.testing.assert_array_equal(np.float32(pre), pre_features(theirs, compression))
            go = bool(client.decide([0.0] * 10, pre, step, t_verify[0])["speculate"][0])
            assert go == controller.speculate_for(theirs, compression, costs)
            if not go and skipped < client.max_skip_run:  # a plain step
                decisions["plain"] += 1
                skipped += 1
                top1 = float(rng.random())
                mine.defer(top1)
                theirs.defer(top1)
                continue
            decisions["speculate"] += 1
            decisions["most unseen"] = max(decisions["most unseen"], unseen)
            skipped = 0
            verdicts = (rng.random(unseen - 1) < 0.6).tolist()
            mine.settle_deferred(verdicts)
            theirs.settle_deferred(verdicts)
            logits = _logits(rng, vocab)
            exact = statistics(logits)
            worst = max(worst, float(np.max(np.abs(np.subtract(stats(logits), exact)))))
            features = Client.step_vector(exact, mine, compression)
            np.testing.assert_array_equal(  # the history's part, bit for bit
                np.float32(features[3:]), step_features(logits, theirs, compression)[3:])
            gamma = int(client.decide(features, pre, step, t_verify[0])["gamma"][0])
            assert gamma == controller.choose_from_logits(logits, theirs, compression,
                                                          client.options(step)[0])
            decisions["gammas"].add(gamma)
            accepted = int(rng.integers(0, gamma + 1))
            emitted = [(k < accepted, float(rng.random())) for k in range(accepted + 1)]
            for k, (agreed, top1) in enumerate(emitted):
                # a draft reading the target's states settles the first token only; any
                # other draft settles all but the bonus token after a full acceptance
                later = k > 0 if reads_target else k == gamma
                for h in (mine, theirs):
                    h.defer(top1) if later else h.settle(agreed, top1)
    # the guide's precision of speckv's own statistics
    assert worst < 1e-5
    assert decisions["plain"] > 0 and decisions["speculate"] > 0
    assert len(decisions["gammas"]) >= 2 and decisions["most unseen"] > 10


def test_unit_costs_tie_to_the_smaller_gamma(client):
    """Section 5: with unit costs γ is the first option whose expected tokens equal the
    largest in float32 (for a hopeless proposal they stop growing before γ = 8)."""
    for top1 in (0.00039, 0.001, 0.003, 0.3):
        features = [10.43, top1, top1 / 2, 0.02, 0.60, 0.75, 5.74, 0.0, 0.0, 1.0]
        out = client.decide(features, [1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], np.ones(8),
                            1.0)
        expected = out["expected_tokens"][0][:8]  # the client prices the trees out
        gamma = int(out["gamma"][0])
        assert gamma == int(np.flatnonzero(expected == expected.max())[0]) + 1
        assert out["speculate"][0] == 1


# -------------------------------------------------------------------- the guide's examples
def test_the_cpp_example_line_is_what_the_shipped_file_answers(controller):
    numbers, said = cpp_example()
    g = controller.n_options  # 8 chains, and the file's trees
    assert len(numbers) == 19 + g
    features, pre, costs, plain = numbers[:10], numbers[10:18], numbers[18:18 + g], numbers[-1]
    got = {"speculate": controller.speculate(pre, costs, plain),
           "gamma": controller.choose(features, costs)}
    assert got == said, ("docs/EMBEDDING.md, section 7: the example's answer is not the "
                         f"shipped file's; write {json.dumps(got)}")


def test_the_guide_s_python_blocks_run_on_the_shipped_file(tmp_path, controller, client):
    """Section 6 and 7's Python, with real values for the names they leave to the reader."""
    (tmp_path / "export").mkdir()
    shutil.copy(ONNX, tmp_path / "export" / ONNX.name)
    rng = np.random.default_rng(1)
    t_verify = [0.05 + 0.004 * g for g in range(9)]
    step = client.options(drafting_costs(0.004, np.asarray(t_verify), None, 2))[0]
    given = {
        "t_draft": 0.004, "t_verify": t_verify, "t_catchup": [0.004, 0.0046, 0.0052],
        "logits": rng.standard_normal(8192).astype(np.float32), "unseen": 1,
        "features": np.array([1.069, 0.9112, 0.9096, 0.95, 0.8542, 0.25, 2.079, 0, 1, 0],
                             np.float32),
        "pre_features": np.array([0.95, 0.8055, 0.1875, 0.0625, 2.079, 0, 1, 0], np.float32),
        "feature_rows": rng.uniform(0, 1, (4, 10)).astype(np.float32),
        "pre_rows": rng.uniform(0, 1, (4, 8)).astype(np.float32),
        "cost_rows": np.tile(step, (4, 1)), "plain_costs": np.full(4, t_verify[0]),
    }
    blocks = python_blocks()
    assert len(blocks) >= 4
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        scope = dict(given)  # section 6's blocks build on each other
        for block in blocks:
            alone = "ort.InferenceSession" in block  # onnxruntime alone: one vector of each
            here = dict(given, pre=given["pre_features"], costs=step,
                        plain_cost=t_verify[0]) if alone else scope
            exec(compile(block, "docs/EMBEDDING.md", "exec"), here)
            if alone:
                assert bool(here["speculate"][0]) == controller.speculate(
                    given["pre_features"], step, t_verify[0])
                assert int(here["gamma"][0]) == controller.choose(given["features"], step)
        np.testing.assert_array_equal(scope["gammas"], controller.choose_batch(
            given["feature_rows"], given["cost_rows"]))
        assert scope["gamma"] in range(1, 9) and isinstance(scope["go"], bool)
    finally:
        os.chdir(cwd)
    for part in ("speckv.pre.onnx", "speckv.step.onnx"):  # section 7's split files load
        ort.InferenceSession(str(tmp_path / part), providers=["CPUExecutionProvider"])
