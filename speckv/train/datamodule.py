"""LightningDataModule over step records: grouped splits, train-only scaling, tensors.

Each row becomes one example of each decision: the step vector (or, for the seed paper's
imported rows, the paper's own post-drafting features) and the pre-draft vector, the observed
accepted length with its cap (a censored observation: both decisions predict the same
outcome, from what each knows), and the measured cost of a plain step and of a step drafting
each candidate γ (for the policy value logged during validation).

The pre-draft vector of a trace row at position p is built as the decoder would see it with
``u`` emitted tokens not yet scored by the draft (a bonus token, plain steps): the trace's
history at ``p - u`` (:func:`speckv.runtime.features.pre_from_step_features`). ``u`` is drawn
per row, uniformly from 0 to ``min(p, bound)`` (seeded), where ``bound`` is the most a decoder
with that row's draft leaves unsettled: ``MAX_UNSETTLED`` (17) for a causal-LM draft,
``MAX_UNSETTLED_READING_TARGET`` (24) for one that reads the target's states. So the
pre-draft network sees every staleness a policy with probes can meet; the row's costs
include the catch-up over ``u + 1`` tokens. Live rows were recorded at decision time
(``u = 0``); imported rows have no history (its prior values stand in).

Where the context lookup proposes a continuation at a trace row (its ``lookup_*`` columns),
the row is also an example of the lookup decision: the proposal's signals before the same
pre-draft vector, and the continuation's accepted length, capped by its length and the
tokens left, at the measured cost of a verify forward over it (no draft forward).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, Literal

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, TensorDataset

from speckv.errors import SpeckvError
from speckv.records import (
    LOOKUP_COLUMNS,
    PAPER_FEATURE_NAMES,
    RecordError,
    feature_matrix,
    paper_feature_matrix,
    read_records,
    resolve_records,
    split_prompts,
)
from speckv.runtime.costs import catchup_table, drafting_costs, tree_step_costs
from speckv.runtime.features import (
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMA_MAX,
    GAMMAS,
    LOOKUP_FEATURE_NAMES,
    MAX_SKIP_RUN,
    MAX_UNSETTLED,
    MAX_UNSETTLED_READING_TARGET,
    PRE_FEATURE_NAMES,
    assemble,
    lookup_features,
    pre_from_step_features,
)
from speckv.runtime.proposal import TREES

REFERENCE_GAMMA: Final = 4  # γ at which trace rows are scored for acceptance-rate metrics


def fingerprint(paths: list[Path]) -> str:
    """A short hash of the record files' bytes (names excluded): identifies training data."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _catchups(df, draft: np.ndarray) -> np.ndarray:
    """``[n, CATCHUP_MAX]`` catch-up seconds per row: measured where the records have them."""
    table = catchup_table(draft, None)
    if "cost_catchup_s" not in df.columns:
        return table
    for i, value in enumerate(df["cost_catchup_s"]):
        if value is not None and len(value):
            table[i] = catchup_table(draft[i], np.asarray(value, np.float64))
    return table


def _lookup_columns(df) -> np.ndarray:
    """``[n, 5]`` int64 of :data:`LOOKUP_COLUMNS`; zeros (no proposal) where a row has none
    (a live or imported row, or a file from before the lookup)."""
    out = np.zeros((len(df), len(LOOKUP_COLUMNS)), np.int64)
    for i, name in enumerate(LOOKUP_COLUMNS):
        if name in df.columns:
            out[:, i] = df[name].fillna(0).to_numpy(np.int64)
    return out


def _has_trees(paths: list[Path]) -> bool:
    """Whether every record holds each tree's outcome and costs (so the controller learns
    to choose trees too)."""
    for p in paths:
        try:
            table = pq.read_table(p, columns=["tree_accept_len", "cost_tree_verify_s"])
        except Exception:  # an older file (no such columns) or unreadable: no trees
            return False
        if any(table.column(c).null_count for c in table.column_names):
            return False
    return bool(paths)


def _detect_feature_set(paths: list[Path]) -> str:
    modes = set()
    for p in paths:
        try:
            modes |= set(pq.read_table(p, columns=["mode"]).column(0).to_pylist())
        except Exception:  # unreadable: read_records reports it properly in setup()
            continue
    return "paper" if modes == {"imported"} else "decision"


class SpeckvDataModule(L.LightningDataModule):
    """Step records -> (features, accepted length, cap, costs) batches, split by prompt."""

    def __init__(
        self,
        records: str | list[str] | None = None,
        feature_set: Literal["auto", "decision", "paper"] = "auto",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 1024,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            records: parquet file(s) or glob(s) of step records (default: the demo's,
                ``datamodules/smollm2-demo/*.parquet``); one path, or a list ``[a.parquet,
                b.parquet]``.
            feature_set: ``decision`` (decision-time features, the controller's input),
                ``paper`` (the seed paper's post-drafting statistics; imported rows only), or
                ``auto`` (``paper`` when every row is imported, else ``decision``).
            val_fraction: share of prompts held out for validation (per task x compression).
            test_fraction: share of prompts held out for testing.
            seed: seed of the prompt split.
            batch_size: rows per batch.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        # TensorBoard's HParams gets tuned_hparams() from the module, not every argument
        self.save_hyperparameters(logger=False)
        self.paths = resolve_records(records)
        self.feature_set = (_detect_feature_set(self.paths) if feature_set == "auto"
                            else feature_set)
        self.fingerprint = fingerprint(self.paths)
        self._trees = self.feature_set == "decision" and _has_trees(self.paths)
        self._splits: dict[str, TensorDataset] | None = None
        self.mean = self.std = None
        self.pre_mean = self.pre_std = None
        self.lookup_mean = self.lookup_std = None
        #: held-out (features, pre_features, costs, plain_cost, lookup_features, lookup_cost)
        #: for the export's parity check
        self.parity_rows: tuple[np.ndarray, ...] | None = None

    # values the model needs (linked by the CLI, never typed twice)
    @property
    def feature_names(self) -> list[str]:
        return list(FEATURE_NAMES if self.feature_set == "decision" else PAPER_FEATURE_NAMES)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def pre_feature_names(self) -> list[str]:
        return list(PRE_FEATURE_NAMES)

    @property
    def lookup_feature_names(self) -> list[str]:
        return list(LOOKUP_FEATURE_NAMES)

    @property
    def max_skip_run(self) -> int:
        return MAX_SKIP_RUN

    @property
    def gammas(self) -> list[int]:
        return list(GAMMAS)

    @property
    def trees(self) -> list[list[int]]:
        """The trees among the options, ``[size, depth, branch]`` each: speckv's
        (:data:`speckv.runtime.proposal.TREES`) when every record holds their outcomes and
        costs, else none (the controller then chooses among chains)."""
        return [[t.size, t.depth, t.branch] for t in TREES] if self._trees else []

    def tuned_hparams(self) -> dict[str, int | float | str]:
        """What a person tunes here, keyed by its flag (``data.batch_size``), for HParams:
        the record sets by name and the feature set as resolved; not the worker count."""
        hp = self.hparams
        return {"data.records": ", ".join(p.stem for p in self.paths),
                "data.feature_set": self.feature_set,
                **{f"data.{k}": hp[k] for k in ("val_fraction", "test_fraction", "seed",
                                                "batch_size")}}

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        df = read_records(self.paths)
        # split the full frame, as `speckv evaluate` does, so both see the same test prompts
        split = split_prompts(df, self.hparams.val_fraction, self.hparams.test_fraction,
                              self.hparams.seed)
        if self.feature_set == "decision":
            keep = (df["mode"] != "imported").to_numpy()
        else:
            keep = (df["mode"] == "imported").to_numpy()
        df, split = df[keep].reset_index(drop=True), split[keep]
        if self.feature_set == "decision":
            if df.empty:
                raise RecordError(
                    f"{', '.join(map(str, self.paths))}: no profiled rows, only imported ones. "
                    "Use --data.feature_set paper to train on the paper's statistics."
                )
            x = feature_matrix(df)
        else:
            if df.empty:
                raise RecordError("feature_set=paper needs imported rows (speckv import-paper).")
            x = paper_feature_matrix(df)
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()
            raise RecordError(f"Features of rows {bad} are not finite; re-profile those prompts.")
        unsettled, settled = self._staleness(df)
        if self.feature_set == "decision":
            x_pre = pre_from_step_features(x, x[settled], unsettled)
        else:  # no history: its prior values, the position and the compression
            x_pre = np.empty((len(df), len(PRE_FEATURE_NAMES)), np.float32)
            for comp, idx in df.groupby("compression", observed=True).indices.items():
                prior = assemble(np.zeros((len(idx), 3)), 1.0, 0.5, 0,
                                 df["position"].to_numpy(np.float32)[idx], comp)
                x_pre[idx] = pre_from_step_features(prior, prior, 0)
        costs = np.ones((len(df), len(GAMMAS)), np.float32)
        plain = np.ones(len(df), np.float32)
        has_cost = df["cost_draft_s"].notna().to_numpy()
        if has_cost.any():
            measured = df.loc[has_cost]
            draft = measured["cost_draft_s"].to_numpy(np.float64)
            verify = np.stack(measured["cost_verify_s"].to_numpy()).astype(np.float64)
            costs[has_cost] = drafting_costs(draft, verify, _catchups(measured, draft),
                                             unsettled[has_cost] + 1)
            plain[has_cost] = verify[:, 0]
        tree_accept = np.full((len(df), len(TREES)), -1, np.int64)
        tree_cap = np.zeros((len(df), len(TREES)), np.int64)
        if self._trees:
            tree_accept[:] = np.stack(df["tree_accept_len"].to_numpy()).astype(np.int64)
            # a tree is cut to the tokens left, as the chains' cap is
            depths = np.asarray([t.depth for t in TREES])
            tree_cap[:] = np.minimum(depths, df["accept_cap"].to_numpy(np.int64)[:, None])
            grow = np.stack(df["cost_tree_draft_s"].to_numpy()).astype(np.float64)
            verify_t = np.stack(df["cost_tree_verify_s"].to_numpy()).astype(np.float64)
            draft_all = df["cost_draft_s"].to_numpy(np.float64)
            costs = np.concatenate([costs, tree_step_costs(
                draft_all, grow, verify_t, _catchups(df, draft_all), unsettled + 1)], 1)
        # the lookup decision: its vector, outcome (capped by its length and the tokens left,
        # as accept_cap caps the chains) and the verify forward over the continuation
        look = _lookup_columns(df)
        length = look[:, 1]
        # a row without a proposal is no lookup example (cap 0); a length of 1 keeps its
        # vector a valid input (the export's parity rows include such rows)
        x_lookup = lookup_features(x_pre, np.maximum(length, 1), look[:, 2], look[:, 3],
                                   look[:, 4])
        lookup_cap = np.minimum(length, df["accept_cap"].to_numpy(np.int64))
        lookup_accept = np.minimum(look[:, 0], lookup_cap)
        lookup_cost = np.ones(len(df), np.float32)
        if has_cost.any():  # verify: the measured rows' cost_verify_s, stacked above
            n = length[has_cost]
            lookup_cost[has_cost] = np.where(n > 0, verify[np.arange(len(n)), n], 1.0)
        ref = df["gamma"].fillna(REFERENCE_GAMMA).to_numpy(np.int64)
        comp = df["compression"].map({c: i for i, c in enumerate(COMPRESSIONS)}).to_numpy()
        tensors = {
            "x": torch.from_numpy(x),
            "x_pre": torch.from_numpy(x_pre),
            "accept_len": torch.from_numpy(df["accept_len"].to_numpy(np.int64)),
            "accept_cap": torch.from_numpy(df["accept_cap"].to_numpy(np.int64)),
            "costs": torch.from_numpy(costs),
            "plain_cost": torch.from_numpy(plain),
            "has_cost": torch.from_numpy(has_cost.copy()),
            "ref_gamma": torch.from_numpy(np.minimum(ref, GAMMA_MAX)),
            "tree_accept": torch.from_numpy(tree_accept),
            "tree_cap": torch.from_numpy(tree_cap),
            "x_lookup": torch.from_numpy(x_lookup),
            "lookup_accept": torch.from_numpy(lookup_accept),
            "lookup_cap": torch.from_numpy(lookup_cap),
            "lookup_cost": torch.from_numpy(lookup_cost),
            "compression": torch.from_numpy(comp.astype(np.int64)),
        }
        self.columns = list(tensors)
        train = split == "train"
        self.mean = x[train].mean(0)
        self.std = x[train].std(0) + 1e-6
        self.pre_mean = x_pre[train].mean(0)
        self.pre_std = x_pre[train].std(0) + 1e-6
        proposed = train & (length > 0)  # the lookup network sees proposals only
        scale_rows = x_lookup[proposed] if proposed.any() else x_lookup[train]
        self.lookup_mean = scale_rows.mean(0)
        self.lookup_std = scale_rows.std(0) + 1e-6
        self._splits = {
            name: TensorDataset(*(t[torch.from_numpy(split == name)] for t in tensors.values()))
            for name in ("train", "val", "test")
        }
        for name, ds in self._splits.items():
            if len(ds) == 0:
                raise RecordError(f"The {name!r} split of {', '.join(map(str, self.paths))} is "
                                  "empty: profile more prompts or change the split fractions.")
        held = np.flatnonzero(split == "val")[:512]
        self.parity_rows = (x[held], x_pre[held], costs[held], plain[held, None],
                            x_lookup[held], lookup_cost[held, None])
        self.split_sizes = {k: len(v) for k, v in self._splits.items()}

    def _staleness(self, df) -> tuple[np.ndarray, np.ndarray]:
        """Per row: ``u`` (drawn, seeded) and the row where its settled history ends."""
        n = len(df)
        rows = np.arange(n)
        position = df["position"].to_numpy(np.int64)
        if self.feature_set != "decision":
            return np.zeros(n, np.int64), rows
        key = df.groupby(["run_id", "compression", "task", "prompt_id"], sort=False,
                         observed=True).ngroup().to_numpy()
        order = np.lexsort((position, key))
        rng = np.random.default_rng(self.hparams.seed)
        reads_target = (df["draft_kind"] == "feature").to_numpy(bool)
        drawn = rng.integers(0, np.where(reads_target, MAX_UNSETTLED_READING_TARGET,
                                         MAX_UNSETTLED) + 1)
        unsettled = np.zeros(n, np.int64)
        settled = rows.copy()
        trace = (df["mode"] == "trace").to_numpy()
        for i, row in enumerate(order):
            u = min(int(drawn[row]), int(position[row]), i) if trace[row] else 0
            if u:
                other = order[i - u]  # a trace has a row at every position of its answer
                if key[other] == key[row] and position[row] - position[other] == u:
                    unsettled[row], settled[row] = u, other
        return unsettled, settled

    def batch_dict(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.columns, batch, strict=True))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if self._splits is None:
            raise SpeckvError("SpeckvDataModule.setup() must run before asking for data.")
        return DataLoader(self._splits[name], batch_size=self.hparams.batch_size,
                          shuffle=shuffle, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
