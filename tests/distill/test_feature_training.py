"""Training the feature-conditioned draft (speckv.distill.feature) end to end on a tiny base:
it saves a draft that loads, its held-out agreement is recorded, and it resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, save_with_tokenizer, tiny_llama

from speckv.distill.feature import train_feature_draft
from speckv.errors import SpeckvError
from speckv.llm.draft import load_draft
from speckv.llm.feature_draft import is_feature_draft


def _chunk(target, n: int, seed: int = 0):
    """Rows as ``speckv draft data`` writes them (the target's greedy answers and its states
    at answer positions), and the prompt states ``load_rows`` keeps beside a chunk."""
    g = torch.Generator().manual_seed(seed)
    rows, states = [], {}
    with torch.no_grad():
        for i in range(n):
            prompt = [1, *torch.randint(3, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),),
                                        generator=g).tolist()]
            out = target.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
            seq = out[0].tolist()
            hidden = target.model(input_ids=out).last_hidden_state[0].to(torch.bfloat16)
            p = len(prompt)
            rows.append({"task": "chat", "prompt_id": f"p{i}", "prompt_ids": prompt,
                         "answer_ids": seq[p:], "hidden": hidden[p - 1 : len(seq) - 1]})
            states[f"p{i}"] = hidden[: p - 1]
    return rows, states


def test_training_saves_a_loadable_draft_and_resumes(tmp_path):
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    base = save_with_tokenizer(target, tmp_path / "base")
    data = tmp_path / "data"
    (data / "states").mkdir(parents=True)
    rows, states = _chunk(target, 24)
    torch.save(rows, data / "chunk-0000.pt")
    torch.save(states, data / "states" / "chunk-0000.pt")
    out, ckpt = tmp_path / "draft", tmp_path / "ckpt.pt"
    first = train_feature_draft(out, steps=4, batch_size=4, lr=3e-3, depth=2, draft_vocab=64,
                                heldout=0.2, base=str(base), data=data, ckpt=ckpt,
                                eval_every=2)
    assert first["step"] == 4 and len(first["heldout_agree"]) == 2
    assert all(0.0 <= a <= 1.0 for a in first["heldout_agree"])
    meta = json.loads((out / "speckv_draft.json").read_text())
    assert meta["kind"] == "feature" and meta["steps"] == 4 and meta["draft_vocab"] == 64
    more = train_feature_draft(out, steps=8, batch_size=4, lr=3e-3, depth=2, draft_vocab=64,
                               heldout=0.2, base=str(base), data=data, ckpt=ckpt,
                               eval_every=2)
    assert more["step"] == 8
    history = torch.load(ckpt, weights_only=False)["history"]
    assert [h["step"] for h in history] == [2, 4, 6, 8]  # resumed, not restarted
    draft = load_draft(out, dtype=torch.float32)
    assert is_feature_draft(draft) and draft.cfg.draft_vocab == 64


def _tiny_setup(tmp_path, n: int = 24):
    target = tiny_llama(2, seed=0, dtype=torch.float32)
    base = save_with_tokenizer(target, tmp_path / "base")
    data = tmp_path / "data"
    (data / "states").mkdir(parents=True)
    rows, states = _chunk(target, n)
    torch.save(rows, data / "chunk-0000.pt")
    torch.save(states, data / "states" / "chunk-0000.pt")
    return base, data


def test_soft_loss_is_least_when_the_draft_reproduces_the_targets_state(tmp_path):
    """With ``soft_weight=1`` the cross-entropy is against the target's own distribution over
    the head's tokens: a draft whose output is the target's state scores that distribution's
    entropy, the least possible; any other output scores more."""
    from speckv.distill.feature import _target_weights, feature_loss, load_rows, make_batch
    from speckv.llm.feature_draft import FeatureDraftConfig, build_feature_draft

    base, data = _tiny_setup(tmp_path, 6)
    rows, _ = load_rows(data)
    weights, config = _target_weights(str(base))
    cfg = FeatureDraftConfig.from_target(str(base), config, 64)
    model = build_feature_draft(cfg, weights, torch.arange(64))
    batch = make_batch(rows, 1, cfg.hidden_size)
    width = batch["states"].shape[1]
    exact = batch["targets"][:, :width].float()

    def loss_with(outputs):
        model.unroll = lambda *a, **k: [outputs]
        loss, _ = feature_loss(model, batch, model.lm_head.to_reduced(), 1, reg_weight=0.0,
                               soft_weight=1.0)
        return float(loss)

    valid = batch["labels"][:, 0] != -100
    teacher = model.logits_small(exact[valid]).float().softmax(-1)
    entropy = float(-(teacher * teacher.clamp_min(1e-30).log()).sum(-1).mean())
    assert abs(loss_with(exact) - entropy) < 1e-4
    noisy = exact + 0.5 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    assert loss_with(noisy) > entropy + 1e-3


def test_init_starts_from_a_saved_draft_with_a_fresh_schedule(tmp_path):
    base, data = _tiny_setup(tmp_path)
    first = tmp_path / "first"
    train_feature_draft(first, steps=6, batch_size=4, lr=3e-3, depth=2, draft_vocab=64,
                        heldout=0.2, base=str(base), data=data, ckpt=tmp_path / "a.pt",
                        eval_every=3, feature_noise=0.2, weight_decay=0.01)
    card = json.loads((first / "speckv_draft.json").read_text())
    assert card["feature_noise"] == 0.2 and card["weight_decay"] == 0.01
    # a learning rate too small to move anything: the saved weights are the initial ones
    second = tmp_path / "second"
    last = train_feature_draft(second, steps=1, batch_size=4, lr=1e-30, depth=2,
                               draft_vocab=64, heldout=0.2, base=str(base), data=data,
                               ckpt=tmp_path / "b.pt", eval_every=1, init=first,
                               soft_weight=0.5, prompt_labels=True)
    assert last["step"] == 1  # a fresh schedule, not the first run's step 6
    a, b = load_file(str(first / "draft.safetensors")), load_file(str(second / "draft.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    meta = json.loads((second / "speckv_draft.json").read_text())
    assert meta["soft_weight"] == 0.5 and meta["init"] == str(first) and meta["prompt_labels"]
    with pytest.raises(SpeckvError, match=r"no draft\.safetensors"):
        train_feature_draft(tmp_path / "x", steps=1, base=str(base), data=data,
                            ckpt=tmp_path / "c.pt", init=tmp_path)
    # another seed would hold out other prompts, some of which the first draft trained on
    with pytest.raises(SpeckvError, match="--seed 0"):
        train_feature_draft(tmp_path / "y", steps=1, base=str(base), data=data,
                            ckpt=tmp_path / "d.pt", init=first, seed=1)
    with pytest.raises(SpeckvError, match="--seed 0"):
        train_feature_draft(tmp_path / "z", steps=1, base=str(base), data=data,
                            ckpt=tmp_path / "e.pt", init=tmp_path / "a.pt", seed=1)


def test_prompt_labels_mark_prompt_positions_apart_from_answer_ones():
    hidden = 8
    row = {"prompt_ids": [1, 5, 6, 7], "answer_ids": [9, 10, 11],
           "prompt_states": torch.randn(3, hidden).to(torch.bfloat16),
           "hidden": torch.randn(3, hidden).to(torch.bfloat16)}
    from speckv.distill.feature import make_batch

    plain = make_batch([row], 2, hidden)
    both = make_batch([row], 2, hidden, prompt_labels=True)
    # without: only answer tokens are labels; with: the prompt's too, marked as not answers
    assert plain["labels"][0, 0].tolist() == [-100, -100, -100, 9, 10, 11, -100]
    assert both["labels"][0, 0].tolist() == [5, 6, 7, 9, 10, 11, -100]
    assert both["answer"][0, 0].tolist() == [False] * 3 + [True] * 3 + [False]
    assert both["labels"][0, 1].tolist() == [6, 7, 9, 10, 11, -100, -100]
    assert both["answer"][0, 1].tolist() == [False, False, True, True, True, False, False]
    assert torch.equal(plain["answer"], plain["labels"] != -100)


def test_own_prompts_are_answered_into_their_own_folder_without_suite_prompts(tmp_path,
                                                                               monkeypatch):
    """``speckv draft data --prompts``: a user's prompts are answered (greedy, with the
    target's states), a prompt that repeats a profiling-suite prompt is left out and named in
    the manifest, a second run resumes, and the feature trainer reads that folder beside
    another whose chunk files have the same names."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import speckv.llm.load as load_mod
    from speckv.distill.data import generate_data
    from speckv.distill.feature import load_rows
    from speckv.prompts import Prompt, suite

    target = tiny_llama(2, seed=0, dtype=torch.float32)
    base = save_with_tokenizer(target, tmp_path / "base")
    calls = []

    def fake_load(spec, compression="fp16", dtype="float32", **_):
        calls.append(spec)
        return SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(base), model=target)

    monkeypatch.setattr(load_mod, "load_model", fake_load)
    copied = suite("chat", 1)[0]
    prompts = [Prompt("code", f"mine-{i}", " ".join(f"w{3 + (i * 7 + j) % 90}"
                                                     for j in range(6))) for i in range(5)]
    prompts.append(Prompt("chat", "copied", copied.text))
    out = tmp_path / "mine"
    generate_data(prompts=prompts, out=out, chunk=4, batch_size=2, max_new_tokens=6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["left_out"] == ["copied"] and manifest["source"] == "prompts"
    rows = [r for f in sorted(out.glob("chunk-*.pt")) for r in torch.load(f, weights_only=False)]
    assert sorted(r["prompt_id"] for r in rows) == [f"mine-{i}" for i in range(5)]
    for r in rows:
        assert 1 <= len(r["answer_ids"]) <= 6
        assert r["hidden"].shape == (len(r["answer_ids"]), target.config.hidden_size)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.glob("chunk-*.pt")}
    generate_data(prompts=prompts, out=out, chunk=4, batch_size=2, max_new_tokens=6)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("chunk-*.pt")} == stamp  # resumed
    # beside a pool folder whose chunk files carry the same names
    pool = tmp_path / "pool"
    (pool / "states").mkdir(parents=True)
    pool_rows, states = _chunk(target, 3)
    torch.save(pool_rows, pool / "chunk-0000.pt")
    torch.save(states, pool / "states" / "chunk-0000.pt")
    both, read = load_rows([pool, out], target=target)
    assert len(both) == 3 + 5 and len(read) == 1 + len(stamp)
    assert all("prompt_states" in r for r in both)
    again, _ = load_rows([pool, out], skip=read, target=target)
    assert again == []


def test_distill_refuses_a_data_folder_that_does_not_exist(tmp_path, capsys):
    from speckv.cli.draft import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--arch", "feature", "--data", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    assert "speckv draft data --prompts" in capsys.readouterr().err
