"""Step records: the contract every stage shares (schema, validation, parquet I/O, importers).

One row per speculation step. In ``trace`` mode a "step" starts at every answer position, and
its outcome holds every candidate γ at once: ``accept_len`` is how many of γmax drafted tokens
the target accepts, so any γ's accepted count is ``min(accept_len, γ)``. ``accept_cap`` says
where that observation is cut off (γmax, the tokens left in the answer, the γ a live step
drafted, or the γ of an imported row): ``accept_len == accept_cap`` means "at least that many".

``seq_len`` is the answer's length ``n`` and ``max_new_tokens`` the decoder's budget ``M``. An
answer that ended with EOS has ``n <= M``, and a live decoder, which cannot know that EOS is
coming, may still draft up to ``min(γmax, M - p - 1)`` tokens at position ``p``; a drafted EOS
that the target accepts ends the answer with no bonus token. So at position ``i`` a trace
row's cap is ``min(γmax, M - i - 1, n - i)`` and replay moves ``min(accepted + 1, n - p)``.

Column groups (``SCHEMA`` below is the single definition):

- identity: who decoded what, where;
- decision: the raw decision-time signals that :mod:`speckv.runtime.features` turns into the vector;
- per_position: the draft's entropy/top-1 probability at drafted positions k = 1..γmax;
- outcome: accepted length, its cap, sampling acceptance probabilities;
- cost: the run's measured draft cost per token, target cost to verify g drafted tokens and
  (optional) draft cost of a catch-up forward over n tokens;
- live: what a live step actually did and how long it took (in total and its parts);
- lookup: what the context lookup proposes at the position and how much of it is accepted;
- paper: the seed paper's post-drafting statistics (imported rows only; never decision-time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from speckv import paths
from speckv.atomic import atomic_write
from speckv.errors import SpeckvError
from speckv.prompts import TASKS
from speckv.runtime.features import COMPRESSIONS, GAMMA_MAX, N_FEATURES, assemble

MODES: Final = ("trace", "live", "imported")
PAPER_CSV_COLUMNS: Final = (
    "compression", "gamma", "task", "step", "accepted", "acceptance_rate", "tokens_produced",
    "mean_draft_entropy", "mean_draft_confidence", "max_draft_entropy", "min_draft_confidence",
)


class RecordError(SpeckvError, ValueError):
    """A record file is unusable; the message names the file, the column and the fix."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    group: str
    nullable: bool = False
    finite: bool = False  # reject NaN/inf where present
    doc: str = ""  # what the column holds, with its unit (the data cards list it)


_LIST = pa.list_(pa.float32())
_K = ("k = 1..8: the k-th token a step starting here drafts (NaN where k > M − position − 1: "
      "no step can draft that far)")
SCHEMA: Final = (
    Column("run_id", pa.string(), "identity", doc=(
        "the profiling run that made the row; its cost model and machine are in the file's "
        "metadata (`runs`)")),
    Column("draft_model", pa.string(), "identity", doc="the draft: a Hugging Face id or folder"),
    Column("draft_kind", pa.string(), "identity", nullable=True, doc=(
        "`lm`: a causal LM drafting on its own; `feature`: a draft that reads the target's "
        "hidden states (speckv.llm.feature_draft), whose drafted tokens are settled one step "
        "later; empty in older files (read as `lm`)")),
    Column("target_model", pa.string(), "identity", doc=(
        "the target: a Hugging Face id, folder or GGUF file")),
    Column("compression", pa.string(), "identity", doc=(
        "how the target is quantized: `fp16`, `int8` or `nf4`")),
    Column("compute_dtype", pa.string(), "identity", doc=(
        "the dtype the target computed in, e.g. `bfloat16`")),
    Column("task", pa.string(), "identity", doc="`code`, `math`, `chat` or `summarization`"),
    Column("prompt_id", pa.string(), "identity", doc=(
        "the prompt's id in its suite (speckv.prompts), e.g. `HumanEval-0`")),
    Column("step", pa.int32(), "identity", doc=(
        "the step's index in its answer (in a trace, equal to `position`)")),
    Column("position", pa.int32(), "identity", doc=(
        "tokens of the answer emitted before this step (0 at the first), prompt excluded: "
        "`log_position` is log(1 + position)")),
    Column("seq_len", pa.int32(), "identity", nullable=True, doc=(
        "the answer's length in tokens (n)")),
    Column("max_new_tokens", pa.int32(), "identity", nullable=True, doc=(
        "the decoder's budget of new tokens (M)")),
    Column("temperature", pa.float32(), "identity", doc="sampling temperature; 0 is greedy"),
    Column("mode", pa.string(), "identity", doc=(
        "`trace`, `live` or `imported` (the seed paper's CSV)")),
    Column("replayable", pa.bool_(), "identity", doc=(
        "whether offline replay may use the row (trace rows)")),
    Column("draft_entropy", pa.float32(), "decision", nullable=True, finite=True, doc=(
        "entropy of the draft's first-proposal distribution at this position, in nats "
        "(temperature 1)")),
    Column("draft_top1", pa.float32(), "decision", nullable=True, finite=True, doc=(
        "that distribution's largest probability (0..1)")),
    Column("draft_margin", pa.float32(), "decision", nullable=True, finite=True, doc=(
        "its largest minus its second-largest probability (0..1)")),
    Column("target_top1_prev", pa.float32(), "decision", nullable=True, finite=True, doc=(
        "the target's probability of the token before this position (0..1; 1.0 at "
        "position 0)")),
    Column("agree_ema", pa.float32(), "decision", nullable=True, finite=True, doc=(
        "EMA of agreement over the positions before this one (ema ← 0.75·ema + 0.25·agreed, "
        "from 0.5; 0..1)")),
    Column("agree_run", pa.int32(), "decision", nullable=True, doc=(
        "consecutive agreements just before this position: a raw count, not capped (the "
        "feature is min(count, 16) / 16)")),
    Column("draft_entropy_k", _LIST, "per_position", nullable=True, doc=(
        f"8 values, entropy (nats) of the draft's distribution for {_K}")),
    Column("draft_top1_k", _LIST, "per_position", nullable=True, doc=(
        f"8 values, the largest probability of that distribution for {_K}")),
    Column("accept_len", pa.int16(), "outcome", doc=(
        "drafted tokens the target accepts, of `accept_cap` drafted from this position (a "
        "count)")),
    Column("accept_cap", pa.int16(), "outcome", doc=(
        "where that observation is cut off: min(8, M − position − 1, n − position) in a "
        "trace, the tokens drafted in a live step; `accept_len == accept_cap` means at "
        "least that many")),
    Column("accept_prob_k", _LIST, "outcome", nullable=True, doc=(
        "sampling only: per drafted token, its acceptance probability min(1, p/q)")),
    Column("tree_accept_len", _LIST, "outcome", nullable=True, doc=(
        "trace: one value per tree of speckv.runtime.proposal.TREES, the tokens the tree "
        "grown from this position accepts (its depth cut to M − position − 1, as the decoder "
        "cuts it; at most n − position)")),
    Column("lookup_accept", pa.int16(), "lookup", nullable=True, doc=(
        "trace: leading tokens of the context lookup's proposal here that the answer accepts "
        "(speckv.runtime.lookup; a count)")),
    Column("lookup_length", pa.int16(), "lookup", nullable=True, doc=(
        "tokens the context lookup proposes here (0: no earlier match; at most "
        "min(8, M − position − 1))")),
    Column("lookup_match", pa.int16(), "lookup", nullable=True, doc=(
        "length of the suffix it matched (tokens, 1..4)")),
    Column("lookup_occurrences", pa.int16(), "lookup", nullable=True, doc=(
        "earlier occurrences of that suffix (a count)")),
    Column("lookup_agreeing", pa.int16(), "lookup", nullable=True, doc=(
        "how many of them were followed by the proposal's first token (a count)")),
    Column("cost_draft_s", pa.float32(), "cost", nullable=True, finite=True, doc=(
        "seconds of one draft forward over one token (t_draft), measured once per run")),
    Column("cost_verify_s", _LIST, "cost", nullable=True, doc=(
        "9 values, g = 0..8: seconds of one target forward over g + 1 tokens (t_verify[g]; "
        "g = 0 is a plain step)")),
    Column("cost_catchup_s", _LIST, "cost", nullable=True, doc=(
        "seconds of one draft forward over n = 1, 2, … tokens (element n − 1: the catch-up "
        "forward after unscored tokens); empty where not measured")),
    Column("cost_tree_draft_s", _LIST, "cost", nullable=True, doc=(
        "one value per tree of TREES: seconds of growing it after the catch-up (its draft "
        "forwards and their bookkeeping); empty where not measured")),
    Column("cost_tree_verify_s", _LIST, "cost", nullable=True, doc=(
        "one value per tree: seconds of the target's forward over its nodes and the last "
        "token with the tree's mask")),
    Column("gamma", pa.int16(), "live", nullable=True, doc=(
        "live: the γ the policy chose (0: a plain step); empty in a trace, a tree step or a "
        "lookup step")),
    Column("drafted", pa.int16(), "live", nullable=True, doc=(
        "live: tokens the step drafted (a stop rule may end drafting before γ; a tree's "
        "nodes; a lookup's proposed tokens)")),
    Column("tree_size", pa.int16(), "live", nullable=True, doc=(
        "live: the nodes of the tree the step verified (empty: a chain or a plain step); "
        "`accept_cap` is then its depth")),
    Column("source", pa.string(), "live", nullable=True, doc=(
        "live: where the verified tokens came from: `draft` (a chain or a tree), `lookup` "
        "(the context lookup, no draft forward) or `draft+lookup` (a tree with the lookup's "
        "continuation joined as one more branch); empty for a plain step")),
    Column("t_step_s", pa.float32(), "live", nullable=True, doc=(
        "live: wall-clock seconds of the whole step")),
    Column("t_draft_s", pa.float32(), "live", nullable=True, doc=(
        "live: seconds in the step's draft forwards")),
    Column("t_verify_s", pa.float32(), "live", nullable=True, doc=(
        "live: seconds in the step's target forward")),
    Column("t_decision_s", pa.float32(), "live", nullable=True, doc=(
        "live: seconds in the step's decisions (features and policy)")),
    Column("paper_mean_entropy", pa.float32(), "paper", nullable=True, finite=True, doc=(
        "imported rows: the seed paper's mean draft entropy over a step's drafted tokens "
        "(nats; known only after drafting)")),
    Column("paper_mean_confidence", pa.float32(), "paper", nullable=True, finite=True, doc=(
        "imported rows: its mean draft top-1 probability over them")),
    Column("paper_max_entropy", pa.float32(), "paper", nullable=True, finite=True, doc=(
        "imported rows: its largest draft entropy over them (nats)")),
    Column("paper_min_confidence", pa.float32(), "paper", nullable=True, finite=True, doc=(
        "imported rows: its smallest draft top-1 probability over them")),
)
COLUMNS: Final = tuple(c.name for c in SCHEMA)
#: columns added after the first record files were written: absent from a frame (an older
#: file, an older writer), they are filled with nulls.
ADDED_COLUMNS: Final = ("cost_catchup_s", "t_draft_s", "t_verify_s", "t_decision_s",
                         "draft_kind", "tree_accept_len", "cost_tree_draft_s",
                         "cost_tree_verify_s", "tree_size", "lookup_accept", "lookup_length",
                         "lookup_match", "lookup_occurrences", "lookup_agreeing", "source")
ARROW_SCHEMA: Final = pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in SCHEMA])
DECISION_COLUMNS: Final = tuple(c.name for c in SCHEMA if c.group == "decision")
#: the context lookup at a trace row: accepted, length, match, occurrences, agreeing
LOOKUP_COLUMNS: Final = tuple(c.name for c in SCHEMA if c.group == "lookup")
PAPER_FEATURES: Final = ("paper_mean_entropy", "paper_mean_confidence", "paper_max_entropy",
                         "paper_min_confidence")


def _type_name(kind: pa.DataType) -> str:
    if pa.types.is_list(kind):
        return f"list of {_type_name(kind.value_type)}"
    return {"float": "float32", "double": "float64"}.get(str(kind), str(kind))


def schema_table() -> str:
    """Every column as a Markdown table: name, type, group and meaning with its unit.

    Data cards embed it between :data:`CARD_BEGIN` and :data:`CARD_END` (a test checks each
    card against it); ``speckv records columns`` prints it.
    """
    lines = ["| column | type | group | meaning (unit) |", "|---|---|---|---|"]
    for c in SCHEMA:
        kind = _type_name(c.type) + (", may be empty" if c.nullable else "")
        lines.append(f"| `{c.name}` | {kind} | {c.group} | {c.doc} |")
    return "\n".join(lines) + "\n"


CARD_BEGIN: Final = "<!-- columns: `speckv records columns --card THIS_FILE` writes this table -->"
CARD_END: Final = "<!-- end of columns -->"


def with_schema_table(card: str, source: str = "the card") -> str:
    """``card`` (a data card's Markdown) with its column table, between the markers, made anew."""
    begin, end = card.find(CARD_BEGIN), card.find(CARD_END)
    if begin < 0 or end < begin:
        raise RecordError(f"{source} has no column table to fill: put the lines {CARD_BEGIN} "
                          f"and {CARD_END} where it belongs.")
    return card[: begin + len(CARD_BEGIN)] + "\n" + schema_table() + card[end:]


def _where(path) -> str:
    return f"Record file {path}" if path is not None else "The records"


# --------------------------------------------------------------------------------- validate
def validate(df: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    """Check a frame against the contract; raise :class:`RecordError` naming column and fix."""
    where = _where(path)
    if len(df) == 0:
        raise RecordError(f"{where} holds no rows. Re-run `speckv profile` to produce records, "
                          "or drop the file from --data.records.")
    absent = [c for c in ADDED_COLUMNS if c not in df.columns]
    if absent:
        df = df.assign(**{c: None for c in absent})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise RecordError(
            f"{where} lacks required column(s) {', '.join(missing)}. It was not written by this "
            "version of speckv: re-profile, or import the paper's CSV with `speckv import-paper`."
        )
    extra = [c for c in df.columns if c not in COLUMNS]
    if extra:
        raise RecordError(
            f"{where} has column(s) not in the step-record schema: {', '.join(extra)}. Remove "
            "them (or write them to another file); speckv.records.COLUMNS lists the schema."
        )
    for name, allowed in (("compression", COMPRESSIONS), ("task", TASKS), ("mode", MODES)):
        bad = sorted(set(df[name].dropna().astype(str)) - set(allowed))
        if bad or df[name].isna().any():
            shown = bad or ["<missing>"]
            raise RecordError(
                f"{where}: column {name!r} has unknown value(s) {', '.join(map(repr, shown))}; "
                f"allowed: {', '.join(allowed)}. Fix or drop those rows."
            )
    for col in SCHEMA:
        if not col.nullable and df[col.name].isna().any():
            rows = np.flatnonzero(df[col.name].isna().to_numpy())[:5].tolist()
            raise RecordError(f"{where}: column {col.name!r} is empty in rows {rows}; it is "
                              "required for every step. Re-profile those prompts.")
        if col.finite:
            values = pd.to_numeric(df[col.name], errors="coerce").to_numpy(dtype=float)
            present = df[col.name].notna().to_numpy()
            bad = present & ~np.isfinite(values)
            if bad.any():
                rows = np.flatnonzero(bad)[:5].tolist()
                raise RecordError(
                    f"{where}: column {col.name!r} holds NaN or infinite values (rows {rows}). "
                    "Drop those rows or re-profile; features must be finite."
                )
    replay = df["replayable"].to_numpy(bool)
    if replay.any():
        sub = df.loc[replay]
        for name in (*DECISION_COLUMNS, "draft_entropy_k", "draft_top1_k", "cost_draft_s",
                     "cost_verify_s", "seq_len", "max_new_tokens"):
            if sub[name].isna().any():
                rows = np.flatnonzero(replay & df[name].isna().to_numpy())[:5].tolist()
                raise RecordError(
                    f"{where}: column {name!r} holds NaN or missing values in replayable rows "
                    f"{rows}. Replay needs every decision-time feature and the cost model: "
                    "drop those rows, mark them replayable=False, or re-profile."
                )
    if (df["accept_len"] < 0).any() or (df["accept_len"] > df["accept_cap"]).any():
        raise RecordError(f"{where}: 'accept_len' must lie in 0..accept_cap for every row.")
    return df


# ----------------------------------------------------------------------------------- files
def write_records(df: pd.DataFrame, path: str | Path, metadata: dict | None = None) -> Path:
    """Validate and write atomically (temporary file, then rename); never half a file."""
    path = Path(path)
    df = validate(df, path)
    table = pa.Table.from_pandas(df[list(COLUMNS)], schema=ARROW_SCHEMA, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({b"speckv": json.dumps(metadata).encode()})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_metadata(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"speckv", b"{}"))


def resolve_records(records: str | list[str] | None) -> list[Path]:
    """Expand globs (relative to the cwd, then to the checkout); fail with what to do.

    ``None`` stands for the demo's record set (:data:`speckv.paths.DEFAULT_RECORDS`)."""
    patterns = [records] if isinstance(records, str) else (records or [paths.DEFAULT_RECORDS])
    found: list[Path] = []
    for pattern in patterns:
        hits = paths.find(pattern)
        if not hits:
            if not any(c in pattern for c in "*?["):
                raise RecordError(f"Record file {pattern} does not exist. Make records with "
                                  "`python -m speckv profile ... --out "
                                  "datamodules/NAME/NAME.parquet` "
                                  "or pass existing ones with --data.records.")
            continue
        found.extend(hits)
    if not found:
        raise RecordError(
            f"No step records match {patterns}. The bundled records live in datamodules/*/; "
            "make new ones with `python -m speckv profile --out "
            "datamodules/NAME/NAME.parquet`, import "
            "the paper's with `python -m speckv import-paper CSV --out R.parquet`, and pass "
            "them with --data.records R.parquet."
        )
    return found


def read_records(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Read and validate one or more record files into one frame."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise RecordError(f"Record file {p} does not exist. Make records with `speckv "
                              "profile`, or pass existing files (datamodules/*/*.parquet).")
        try:
            df = pq.read_table(p).to_pandas()
        except Exception as exc:  # truncated or not parquet at all
            raise RecordError(
                f"Record file {p} cannot be read as parquet ({type(exc).__name__}: {exc}). It "
                "is truncated or not a record file: re-run the command that wrote it."
            ) from None
        frames.append(validate(df, p))
    if not frames:
        raise RecordError("No record files given. Pass at least one parquet file.")
    return pd.concat(frames, ignore_index=True)


def merge(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Join shards into one file (duplicates of the same run/prompt/step are dropped)."""
    df = read_records(paths)
    df = df.drop_duplicates(subset=["run_id", "compression", "prompt_id", "step", "mode"])
    metas = [read_metadata(p) for p in paths]
    runs = {}
    for m in metas:
        runs.update(m.get("runs", {}))
    return write_records(df.reset_index(drop=True), out, {"runs": runs})


# -------------------------------------------------------------------------------- features
def feature_matrix(df: pd.DataFrame) -> np.ndarray:
    """``[n, N_FEATURES]`` decision-time features of each row (one definition: features.py)."""
    out = np.empty((len(df), N_FEATURES), np.float32)
    for comp, idx in df.groupby("compression", observed=True).indices.items():
        sub = df.iloc[idx]
        stats = sub[["draft_entropy", "draft_top1", "draft_margin"]].to_numpy(np.float32)
        out[idx] = assemble(stats, sub["target_top1_prev"].to_numpy(np.float32),
                            sub["agree_ema"].to_numpy(np.float32),
                            sub["agree_run"].to_numpy(np.float32),
                            sub["position"].to_numpy(np.float32), comp)
    return out


def paper_feature_matrix(df: pd.DataFrame) -> np.ndarray:
    """The seed paper's features (post-drafting statistics, γ, compression) for imported rows."""
    onehot = np.stack([(df["compression"] == c).to_numpy(np.float32) for c in COMPRESSIONS], -1)
    stats = df[list(PAPER_FEATURES)].to_numpy(np.float32)
    gamma = df[["gamma"]].to_numpy(np.float32) / GAMMA_MAX
    return np.concatenate([stats, gamma, onehot], -1)


PAPER_FEATURE_NAMES: Final = (*PAPER_FEATURES, "gamma_over_max",
                              *(f"compression_{c}" for c in COMPRESSIONS))


def llamacpp_rows(df: pd.DataFrame) -> np.ndarray:
    """``[n]`` bool: rows profiled in llama.cpp (``speckv profile --engine llamacpp``), whose
    draft is a GGUF file (a Hugging Face draft is a folder or a hub id)."""
    return df["draft_model"].astype(str).str.lower().str.endswith(".gguf").to_numpy()


def sequence_ids(df: pd.DataFrame) -> pd.Series:
    """A key naming the prompt of each row (the unit that splits must keep whole)."""
    return df["task"].astype(str) + "/" + df["prompt_id"].astype(str)


# ---------------------------------------------------------------------------------- import
def import_paper(csv: str | Path, out: str | Path | None = None) -> pd.DataFrame:
    """Import the seed paper's step CSV; rows are kept but marked not replayable.

    The CSV is in generation order and a generation restarts where ``step`` falls back to 0,
    so sequence ids are inferred from those resets. Its draft statistics are taken over the
    γ tokens drafted at each step (known only after drafting), so they live in the ``paper_*``
    columns and never in the decision-time ones.
    """
    csv = Path(csv)
    if not csv.is_file():
        raise RecordError(f"CSV {csv} does not exist (the paper's file is "
                          "phase2_step_results.csv).")
    try:
        raw = pd.read_csv(csv)
    except Exception as exc:
        raise RecordError(f"CSV {csv} cannot be parsed ({exc}).") from None
    missing = [c for c in PAPER_CSV_COLUMNS if c not in raw.columns]
    if missing:
        raise RecordError(f"CSV {csv} lacks column(s) {', '.join(missing)}; expected the "
                          f"paper's columns: {', '.join(PAPER_CSV_COLUMNS)}.")
    if raw.empty:
        raise RecordError(f"CSV {csv} has no rows.")
    step = raw["step"].to_numpy()
    new_seq = np.r_[True, step[1:] <= step[:-1]]
    seq = np.cumsum(new_seq) - 1
    gamma = raw["gamma"].astype(int).to_numpy()
    accepted = raw["accepted"].astype(int).to_numpy()
    if (gamma > GAMMA_MAX).any() or (accepted > gamma).any() or (accepted < 0).any():
        raise RecordError(f"CSV {csv}: 'accepted' must lie in 0..gamma and gamma in "
                          f"1..{GAMMA_MAX}.")
    n = len(raw)
    nan = np.full(n, np.nan, np.float32)
    df = pd.DataFrame({
        "run_id": "paper-" + raw["compression"].astype(str) + "-g" + raw["gamma"].astype(str),
        "draft_model": "meta-llama/Llama-3.2-1B-Instruct",
        "target_model": "meta-llama/Llama-3.2-3B-Instruct",
        "compression": raw["compression"].astype(str),
        "compute_dtype": raw["compression"].astype(str),
        "task": raw["task"].astype(str),
        "prompt_id": [f"paper-{s:04d}" for s in seq],
        "step": step.astype(np.int32),
        "position": np.zeros(n, np.int32),
        "seq_len": pd.array([None] * n, dtype="Int32"),
        "max_new_tokens": pd.array([None] * n, dtype="Int32"),
        "temperature": np.zeros(n, np.float32),
        "mode": "imported",
        "replayable": False,
        "draft_entropy": nan, "draft_top1": nan, "draft_margin": nan,
        "target_top1_prev": nan, "agree_ema": nan,
        "agree_run": pd.array([None] * n, dtype="Int32"),
        "draft_entropy_k": None, "draft_top1_k": None,
        "accept_len": accepted.astype(np.int16),
        "accept_cap": gamma.astype(np.int16),
        "accept_prob_k": None,
        "cost_draft_s": nan, "cost_verify_s": None,
        "gamma": gamma.astype(np.int16),
        "drafted": gamma.astype(np.int16),
        "t_step_s": nan,
        "paper_mean_entropy": raw["mean_draft_entropy"].astype(np.float32),
        "paper_mean_confidence": raw["mean_draft_confidence"].astype(np.float32),
        "paper_max_entropy": raw["max_draft_entropy"].astype(np.float32),
        "paper_min_confidence": raw["min_draft_confidence"].astype(np.float32),
    })
    # position: tokens produced before each step within its generation
    produced = raw["tokens_produced"].astype(int).to_numpy()
    df["position"] = (pd.Series(produced).groupby(seq).cumsum() - produced).to_numpy(np.int32)
    validate(df, csv)
    if out is not None:
        write_records(df, out, {"source": str(csv.name), "imported": True})
    return df




# ----------------------------------------------------------------------------------- split
SPLITS: Final = ("train", "val", "test")


def split_prompts(df: pd.DataFrame, val: float = 0.15, test: float = 0.15,
                  seed: int = 0) -> np.ndarray:
    """Assign every row to train/val/test by prompt: no prompt is in two splits.

    Prompts are stratified by task and by the set of compression levels they were profiled
    at (in a bundled profile every prompt is decoded at every level, so each split holds
    every task x compression). Deterministic for a given seed and set of prompts.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise RecordError(f"Split fractions val={val} and test={test} must be in [0, 1) and "
                          "leave room for training data.")
    keys = sequence_ids(df)
    groups = pd.DataFrame({"key": keys, "task": df["task"].astype(str),
                           "compression": df["compression"].astype(str)})
    per_key = groups.groupby("key", sort=True).agg(
        task=("task", "first"), comps=("compression", lambda c: ",".join(sorted(set(c)))))
    assign: dict[str, str] = {}
    rng = np.random.default_rng(seed)
    for _, stratum in per_key.groupby(["task", "comps"], sort=True):
        names = stratum.index.to_numpy()
        names = names[rng.permutation(len(names))]
        n = len(names)
        n_test = round(test * n) if n >= 3 else 0
        n_val = round(val * n) if n >= 3 else 0
        if test > 0 and n >= 3:
            n_test = max(n_test, 1)
        if val > 0 and n >= 3:
            n_val = max(n_val, 1)
        for i, name in enumerate(names):
            assign[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out = keys.map(assign).to_numpy()
    for name, frac in (("train", 1.0), ("val", val), ("test", test)):
        if frac > 0 and not (out == name).any():
            raise RecordError(
                f"The {name!r} split is empty: {per_key.shape[0]} prompt(s) are too few to "
                f"split {1 - val - test:.0%}/{val:.0%}/{test:.0%} by prompt. Profile more "
                "prompts, pass more record files, or change the split fractions."
            )
    return out
