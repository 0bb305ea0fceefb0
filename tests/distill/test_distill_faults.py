"""`speckv draft distill --arch feature` killed and resumed: the resumed draft equals an
uninterrupted run's bit for bit (the batch and noise generators come back with the
checkpoint), no temporary file is left, and other settings are refused."""

from __future__ import annotations

import sys

import pytest
import torch
from faults import child_env, temp_files
from tiny_models import VOCAB, save_with_tokenizer, tiny_llama

from speckv.distill.feature import train_feature_draft
from speckv.errors import SpeckvError

SETTINGS = {"steps": 6, "batch_size": 4, "lr": 3e-3, "depth": 2, "draft_vocab": 64,
            "heldout": 0.2, "feature_noise": 0.1, "ckpt_every_s": 0.0, "eval_every": 3}
#: a child that trains with SETTINGS: out, base, data, ckpt from its arguments.
CHILD = ("import sys; from pathlib import Path\n"
         "from speckv.distill.feature import train_feature_draft\n"
         "out, base, data, ckpt = sys.argv[1:5]\n"
         f"train_feature_draft(Path(out), base=base, data=Path(data), ckpt=Path(ckpt), "
         f"threads=1, **{SETTINGS!r})\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny target and one chunk of its answers with their states, as `draft data`
    and the first training run leave them."""
    root = tmp_path_factory.mktemp("distill")
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    base = save_with_tokenizer(target, root / "base")
    g = torch.Generator().manual_seed(0)
    rows, states = [], {}
    with torch.no_grad():
        for i in range(16):
            prompt = [1, *torch.randint(3, VOCAB, (3 + i % 5,), generator=g).tolist()]
            seq = target.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
            hidden = target.model(input_ids=seq).last_hidden_state[0].to(torch.bfloat16)
            p = len(prompt)
            rows.append({"task": "chat", "prompt_id": f"p{i}", "prompt_ids": prompt,
                         "answer_ids": seq[0, p:].tolist(), "hidden": hidden[p - 1 : -1]})
            states[f"p{i}"] = hidden[: p - 1]
    (root / "data" / "states").mkdir(parents=True)
    torch.save(rows, root / "data" / "chunk-0000.pt")
    torch.save(states, root / "data" / "states" / "chunk-0000.pt")
    return base, root / "data"


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> dict:
    base, data = setup
    root = tmp_path_factory.mktemp("whole")
    train_feature_draft(root / "draft", base=str(base), data=data, ckpt=root / "ckpt.pt",
                        threads=1, **SETTINGS)
    return torch.load(root / "ckpt.pt", weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == SETTINGS["steps"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kill_at", ["ckpt.pt@1", "ckpt.pt@3", "ckpt.pt@5"])
def test_a_killed_distillation_resumes_to_the_uninterrupted_draft(setup, uninterrupted,
                                                                  tmp_path, kill_at):
    import subprocess

    base, data = setup
    argv = [sys.executable, "-c", CHILD, str(tmp_path / "draft"), str(base), str(data),
            str(tmp_path / "ckpt.pt")]
    killed = subprocess.run(argv, env=child_env(SPECKV_KILL_BEFORE_RENAME=kill_at),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(temp_files(tmp_path)) == 1
    resumed = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(torch.load(tmp_path / "ckpt.pt", weights_only=False), uninterrupted)
    assert not temp_files(tmp_path)


def test_resuming_with_other_settings_is_refused(setup, tmp_path):
    base, data = setup
    kwargs = {**SETTINGS, "steps": 2}
    train_feature_draft(tmp_path / "draft", base=str(base), data=data,
                        ckpt=tmp_path / "ckpt.pt", threads=1, **kwargs)
    with pytest.raises(SpeckvError, match=r"--lr: 0\.003 there, 0\.01 here.*move it away"):
        train_feature_draft(tmp_path / "draft", base=str(base), data=data,
                            ckpt=tmp_path / "ckpt.pt", threads=1, **{**kwargs, "lr": 0.01})
    # more steps of the same training go on from where it stopped
    more = train_feature_draft(tmp_path / "draft", base=str(base), data=data,
                               ckpt=tmp_path / "ckpt.pt", threads=1, **{**kwargs, "steps": 4})
    assert more["step"] == 4
