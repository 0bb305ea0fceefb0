"""`speckv draft data` killed and resumed: every chunk equals an uninterrupted run's bit for
bit, no temporary file is left, and a folder made with another pool or settings is refused in
one paragraph (exit 2), not resumed."""

from __future__ import annotations

import json

import pytest
import torch
from faults import run_speckv, temp_files, was_killed
from tiny_models import save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny target and 12 prompts of its words (3 chunks of 4)."""
    root = tmp_path_factory.mktemp("data")
    target = save_with_tokenizer(tiny_llama(2, seed=0, dtype=torch.float32), root / "target")
    gen = torch.Generator().manual_seed(0)
    lines = [json.dumps({"task": "chat", "id": f"mine-{i}", "prompt": " ".join(
        f"w{int(w)}" for w in torch.randint(3, 128, (2 + i % 7,), generator=gen))})
        for i in range(12)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return target, root / "prompts.jsonl"


def _args(setup, out, *extra) -> list[str]:
    target, prompts = setup
    return ["draft", "data", "--prompts", str(prompts), "--target", str(target), "--out",
            str(out), "--chunk", "4", "--batch-size", "3", "--max-new-tokens", "12",
            "--threads", "1", *extra]


def _chunks(folder) -> dict[str, list[dict]]:
    return {f.name: torch.load(f, weights_only=False) for f in sorted(folder.glob("chunk-*.pt"))}


def _assert_same(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert len(a[name]) == len(b[name])
        for ra, rb in zip(a[name], b[name], strict=True):
            assert ra.keys() == rb.keys()
            for key, value in ra.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, rb[key]), (name, ra["prompt_id"], key)
                else:
                    assert value == rb[key], (name, ra["prompt_id"], key)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "d"
    assert speckv_main(_args(setup, out)) == 0
    chunks = _chunks(out)
    assert len(chunks) == 3 and sum(map(len, chunks.values())) == 12
    return chunks


@pytest.mark.parametrize("kill_at", [
    "manifest.json",    # before any answer
    "chunk-*@1",        # the first chunk answered, not renamed
    "chunk-*@3",        # two chunks done, the last one in flight
])
def test_a_killed_data_run_resumes_to_the_uninterrupted_chunks(setup, uninterrupted, tmp_path,
                                                               kill_at):
    out = tmp_path / "d"
    killed = run_speckv(_args(setup, out), kill_at=kill_at)
    assert was_killed(killed), killed.stderr[-2000:]
    assert len(temp_files(tmp_path)) == 1
    resumed = run_speckv(_args(setup, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(_chunks(out), uninterrupted)
    assert not temp_files(tmp_path)


def test_other_settings_are_refused_in_one_paragraph(setup, uninterrupted, tmp_path, capsys):
    out = tmp_path / "d"
    assert speckv_main(_args(setup, out, "--chunk", "12")) == 0  # one chunk of 12
    capsys.readouterr()
    assert speckv_main(_args(setup, out, "--max-new-tokens", "8", "--chunk", "12")) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens: 12 there, 8 here" in err and "move that folder away" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert speckv_main(_args(setup, out)) == 2  # chunks of 4: another split of the pool
    assert "12 prompts in 1 chunks there, 12 in 3 here" in capsys.readouterr().err


def test_an_unreadable_manifest_is_one_paragraph(setup, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "manifest.json").write_text('{"chunks": [["mine-0"')  # cut off
    assert speckv_main(_args(setup, out)) == 2
    err = capsys.readouterr().err
    assert "manifest.json cannot be read" in err and "Traceback" not in err
