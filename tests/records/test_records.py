"""The step-record contract: validation messages, atomic I/O, the paper importer, splits."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from locations import PAPER_CSV, ROOT
from synthetic import make_records

from speckv.__main__ import main as speckv_main
from speckv.records import (
    CARD_BEGIN,
    CARD_END,
    COLUMNS,
    SCHEMA,
    RecordError,
    import_paper,
    merge,
    read_records,
    schema_table,
    split_prompts,
    with_schema_table,
    write_records,
)


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return make_records(prompts_per_task=4, min_len=10, max_len=20, seed=1)


def test_roundtrip_keeps_every_column_and_value(records, tmp_path):
    path = write_records(records, tmp_path / "r.parquet", {"runs": {"x": 1}})
    back = read_records(path)
    assert list(back.columns) == list(COLUMNS)
    assert len(back) == len(records)
    np.testing.assert_array_equal(back["accept_len"], records["accept_len"])
    np.testing.assert_allclose(np.stack(back["draft_top1_k"])[:, 0],
                               np.stack(records["draft_top1_k"])[:, 0])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.drop(columns=["accept_len"]), "lacks required column.*accept_len"),
        (lambda d: d.assign(bogus=1), "not in the step-record schema: bogus"),
        (lambda d: d.assign(compression="fp8"), "'compression' has unknown value.*fp8"),
        (lambda d: d.assign(task="poetry"), "'task' has unknown value.*poetry"),
        (lambda d: d.assign(draft_top1=np.nan), "'draft_top1' holds NaN"),
        (lambda d: d.assign(agree_ema=np.inf), "'agree_ema' holds NaN or infinite"),
        (lambda d: d.iloc[:0], "holds no rows"),
    ],
)
def test_bad_records_are_refused_without_touching_the_target(records, tmp_path, mutate, match):
    good = write_records(records, tmp_path / "r.parquet")
    before = good.read_bytes()
    with pytest.raises(RecordError, match=match):
        write_records(mutate(records.copy()), good)
    assert good.read_bytes() == before, "a refused write must not overwrite the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"], "no temp files left"


def test_truncated_and_missing_files_give_one_clear_error(records, tmp_path):
    path = write_records(records, tmp_path / "r.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(RecordError, match=r"cut.parquet cannot be read as parquet.*truncated"):
        read_records(cut)
    with pytest.raises(RecordError, match="does not exist"):
        read_records(tmp_path / "nope.parquet")


def test_split_is_by_prompt_and_covers_every_task_and_compression(records):
    split = split_prompts(records, val=0.25, test=0.25, seed=3)
    key = records["task"] + "/" + records["prompt_id"]
    per_prompt = pd.Series(split).groupby(key.to_numpy()).nunique()
    assert (per_prompt == 1).all(), "a prompt landed in two splits"
    for name in ("train", "val", "test"):
        sub = records[split == name]
        assert set(sub["task"]) == {"code", "math", "chat", "summarization"}
        assert set(sub["compression"]) == {"fp16", "int8", "nf4"}
    assert (split == split_prompts(records, val=0.25, test=0.25, seed=3)).all()
    assert not (split == split_prompts(records, val=0.25, test=0.25, seed=4)).all()


def test_split_too_small_names_the_empty_split(records):
    tiny = records[records["prompt_id"].isin(["code-000", "math-000"])]
    with pytest.raises(RecordError, match="split is empty"):
        split_prompts(tiny)


def test_merge_joins_shards_and_drops_duplicates(records, tmp_path):
    half = len(records) // 2
    a = write_records(records.iloc[:half], tmp_path / "a.parquet")
    b = write_records(records.iloc[half - 10 :], tmp_path / "b.parquet")
    out = merge([a, b], tmp_path / "m.parquet")
    assert len(read_records(out)) == len(records)


@pytest.mark.skipif(not PAPER_CSV.is_file(), reason="the seed paper's CSV is not beside the repo")
def test_import_paper_infers_generations(tmp_path):
    df = import_paper(PAPER_CSV, tmp_path / "paper.parquet")
    assert len(df) == 5112
    # 3 compressions x 4 gammas x 4 tasks x 5 prompts, a new generation at each step reset
    assert df["prompt_id"].nunique() == 240
    assert not df["replayable"].any() and (df["mode"] == "imported").all()
    assert (df["accept_cap"] == df["gamma"]).all()
    assert df["draft_entropy"].isna().all(), "post-drafting stats must not be decision-time"
    first = df.groupby("prompt_id")["position"].min()
    assert (first == 0).all()


def test_cli_import_paper_bad_csv_exits_2(tmp_path, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert speckv_main(["import-paper", str(bad), "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s)" in err and "Traceback" not in err
    assert not (tmp_path / "o.parquet").exists()


# ------------------------------------------------------------------------------ data cards
CARDS = sorted((ROOT / "datamodules").glob("*/README.md"))


def test_every_column_says_what_it_holds_and_the_table_lists_them_all():
    table = schema_table()
    for column in SCHEMA:
        assert len(column.doc) > 10, f"{column.name} has no meaning in speckv.records.SCHEMA"
        assert f"| `{column.name}` |" in table
    assert table.count("\n| `") == len(SCHEMA)


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.parent.name)
def test_each_data_card_lists_the_columns_as_the_schema_says(card):
    """The card's column table is the schema's, word for word: it cannot drift."""
    text = card.read_text()
    assert with_schema_table(text, str(card)) == text, (
        f"{card}'s column table differs from speckv.records.SCHEMA: run `python -m speckv "
        f"records columns --card {card.relative_to(ROOT)}`")
    listed = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
    assert listed == list(COLUMNS)


def test_records_columns_prints_the_table_and_fills_a_card(tmp_path, capsys):
    assert speckv_main(["records", "columns"]) == 0
    assert capsys.readouterr().out == schema_table()
    card = tmp_path / "README.md"
    card.write_text(f"# A card\n\n{CARD_BEGIN}\n| stale |\n{CARD_END}\nafter\n")
    assert speckv_main(["records", "columns", "--card", str(card)]) == 0
    assert card.read_text() == f"# A card\n\n{CARD_BEGIN}\n{schema_table()}{CARD_END}\nafter\n"
    card.write_text("# A card without the markers\n")
    assert speckv_main(["records", "columns", "--card", str(card)]) == 2
    assert CARD_BEGIN in capsys.readouterr().err
