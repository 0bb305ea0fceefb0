"""The draft format and its distillation, on tiny random models: build, save and load round
trip (the reduced head included), label shift, loss, vocabulary choice, resume."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, save_with_tokenizer, tiny_llama

from speckv.distill.data import TOPK
from speckv.distill.train import (
    _batch,
    coverage,
    draft_loss,
    evaluate_agreement,
    frequent_tokens,
    train,
)
from speckv.llm.draft import (
    DraftSpec,
    ReducedHead,
    _shared_keys,
    build_draft,
    load_draft,
    save_draft,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = tiny_llama(3, seed=0, dtype=torch.float32)
    return save_with_tokenizer(model, tmp_path_factory.mktemp("base") / "base")


def _rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                               generator=g).tolist()
        answer = torch.randint(3, 40, (int(torch.randint(4, 12, (1,), generator=g)),),
                               generator=g).tolist()
        top = torch.randint(3, VOCAB, (len(answer), TOPK), generator=g)
        top[:, 0] = torch.tensor(answer)
        rows.append({"task": "chat", "prompt_id": f"p{i}", "prompt_ids": prompt,
                     "answer_ids": answer, "top_ids": top.to(torch.int32),
                     "top_logp": torch.log_softmax(torch.randn(len(answer), TOPK,
                                                               generator=g), -1).half()})
    return rows


def test_reduced_head_gives_full_logits_whose_statistics_are_the_heads():
    token_ids = torch.tensor([7, 3, 50, 9])
    head = ReducedHead(torch.randn(4, 16), token_ids, vocab_size=64).requires_grad_(False)
    hidden = torch.randn(5, 16)
    full, small = head(hidden), head.small(hidden)
    assert full.shape == (5, 64)
    assert torch.equal(full[:, token_ids], small)
    assert torch.equal(token_ids[small.argmax(-1)], full.argmax(-1))
    p_full, p_small = torch.softmax(full, -1), torch.softmax(small, -1)
    assert torch.allclose(p_full[:, token_ids], p_small)
    assert float(p_full.detach().sum(-1).sub(1).abs().max()) < 1e-6
    entropy = -(p_full * torch.log_softmax(full, -1)).sum(-1)  # finite: 0 · (large) = 0
    assert torch.allclose(entropy, -(p_small * torch.log_softmax(small, -1)).sum(-1))
    t2d = head.to_reduced()
    assert t2d[50] == 2 and t2d[8] == -1 and int((t2d >= 0).sum()) == 4


@pytest.mark.parametrize("draft_vocab,trained_head", [(None, False), (24, False), (24, True)])
def test_build_save_load_round_trip(base, tmp_path, draft_vocab, trained_head):
    spec = DraftSpec(base=str(base), init_layers=[0, 2], draft_vocab=draft_vocab,
                     trained_head=trained_head)
    token_ids = torch.arange(100, 100 - (draft_vocab or 0), -1) if draft_vocab else None
    model = build_draft(spec, token_ids=token_ids)
    target = tiny_llama(3, seed=0, dtype=torch.float32)
    # layers start from the target's layers 0 and 2; embeddings are the target's
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       target.model.layers[2].mlp.up_proj.weight)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)  # a trained change must survive
        if spec.stored_head:
            model.lm_head.weight.mul_(2.0)  # a trained head must survive too
    save_draft(model, spec, tmp_path / "d", {"steps": 3})
    meta = json.loads((tmp_path / "d" / "speckv_draft.json").read_text())
    assert meta["draft_vocab"] == draft_vocab and meta["steps"] == 3
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "d" / "draft.safetensors"))
    assert not any(k.startswith("model.embed_tokens") for k in stored)  # shared, not stored
    assert ("lm_head.weight" in stored) == spec.stored_head  # a frozen head is the target's
    assert ("lm_head.token_ids" in stored) == bool(draft_vocab)
    loaded = load_draft(tmp_path / "d", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 33, 4]])
    with torch.no_grad():
        for key, value in model.state_dict().items():  # the draft's own weights: stored bf16
            if not _shared_keys(key, spec.stored_head) and value.is_floating_point():
                value.copy_(value.to(torch.bfloat16).float())
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, want)
    if draft_vocab:
        assert torch.equal(loaded.lm_head.token_ids, token_ids)
        assert set(got.argmax(-1).flatten().tolist()) <= set(token_ids.tolist())


def test_batch_shifts_labels_and_targets_by_one():
    rows = _rows(3)
    ids, mask, lab, top_ids, _ = _batch(rows, pad=0)
    for i, r in enumerate(rows):
        n_p, n_a = len(r["prompt_ids"]), len(r["answer_ids"])
        assert ids[i, : n_p + n_a].tolist() == r["prompt_ids"] + r["answer_ids"]
        assert int(mask[i].sum()) == n_p + n_a
        assert lab[i, :n_p].eq(-100).all() and lab[i, n_p : n_p + n_a].tolist() == r["answer_ids"]
        # the position before each answer token carries that token's top-k
        assert top_ids[i, n_p - 1 : n_p + n_a - 1, 0].tolist() == r["answer_ids"]


def test_loss_rewards_the_right_token_and_reduced_labels_map_through_the_head():
    labels = torch.tensor([3, 5, 7])
    top_ids = torch.stack([labels, labels + 1], 1)
    top_lp = torch.log(torch.tensor([[0.9, 0.1]] * 3))
    good = torch.full((3, 10), -5.0).scatter(1, labels[:, None], 5.0)
    bad = torch.full((3, 10), -5.0).scatter(1, (labels + 1)[:, None], 5.0)
    lg, ceg, ag = draft_loss(good, labels, top_ids, top_lp)
    lb, ceb, ab = draft_loss(bad, labels, top_ids, top_lp)
    assert lg < lb and ceg < ceb and ag == 1.0 and ab == 0.0
    # reduced: the head holds tokens [5, 3] only; token 7 is outside and counts as a miss
    t2d = torch.full((10,), -1)
    t2d[5], t2d[3] = 0, 1
    small = torch.tensor([[0.0, 4.0], [4.0, 0.0], [4.0, 0.0]])
    loss, _, agree = draft_loss(small, labels, top_ids, top_lp, t2d=t2d)
    assert torch.isfinite(loss) and agree == pytest.approx(2 / 3)


def test_frequent_tokens_and_coverage():
    rows = [{"answer_ids": [5, 5, 5, 9, 9, 2]}, {"answer_ids": [9, 1]}]
    top = frequent_tokens(rows, 2, vocab_size=16)
    assert top.tolist() == [5, 9]
    assert coverage(rows, top) == pytest.approx(6 / 8)


def test_training_lowers_the_loss_resumes_and_refuses_another_spec(base, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    torch.save(_rows(40), data / "chunk-0000.pt")
    spec = DraftSpec(base=str(base), init_layers=[0, 1], draft_vocab=32)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "draft"
    first = train(steps=6, batch_size=4, lr=3e-3, spec=spec, out=out, data=data, ckpt=ckpt,
                  heldout=0.2, eval_every=3)
    assert first["step"] == 6 and (out / "draft.safetensors").is_file()
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 6 and len(state["history"]) == 2
    more = train(steps=12, batch_size=4, lr=3e-3, spec=spec, out=out, data=data, ckpt=ckpt,
                 heldout=0.2, eval_every=3)
    history = torch.load(ckpt, weights_only=False)["history"]
    assert more["step"] == 12 and [h["step"] for h in history] == [3, 6, 9, 12]
    meta = json.loads((out / "speckv_draft.json").read_text())
    assert meta["draft_vocab"] == 32 and 0 < meta["coverage_heldout"] <= 1
    with pytest.raises(RuntimeError, match="another draft"):
        train(steps=14, spec=DraftSpec(base=str(base), init_layers=[0]), out=out, data=data,
              ckpt=ckpt)
    draft = load_draft(out, dtype=torch.float32)
    assert 0.0 <= evaluate_agreement(draft, _rows(5, seed=1), pad=0) <= 1.0


def test_held_out_prompts_stay_held_out_as_answers_arrive():
    from speckv.distill.train import is_heldout, split_rows

    rows = _rows(200)
    _, held_a = split_rows(rows[:100], 0.2, seed=0)
    train_b, held_b = split_rows(rows, 0.2, seed=0)
    ids = {r["prompt_id"] for r in held_a}
    assert ids <= {r["prompt_id"] for r in held_b}
    assert not ids & {r["prompt_id"] for r in train_b}
    assert 0.1 < len(held_b) / len(rows) < 0.3
    assert is_heldout("p7", 0.2, 0) == is_heldout("p7", 0.2, 0)


def test_chunks_written_during_training_join_it(base, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = _rows(60)
    torch.save(rows[:30], data / "chunk-0000.pt")
    spec = DraftSpec(base=str(base), init_layers=[0], draft_vocab=32)
    import speckv.distill.train as distill_train

    real = distill_train.load_data
    calls = []

    def growing(path=None, skip=frozenset()):
        if len(calls) == 1:  # the first reload: the data job wrote another chunk meanwhile
            torch.save(rows[30:], data / "chunk-0001.pt")
        calls.append(set(skip))
        return real(path, skip)

    distill_train.load_data = growing
    try:
        train(steps=4, batch_size=2, spec=spec, out=tmp_path / "d", data=data,
              ckpt=tmp_path / "c.pt", heldout=0.2, eval_every=4, reload_every=2)
    finally:
        distill_train.load_data = real
    meta = json.loads((tmp_path / "d" / "speckv_draft.json").read_text())
    assert meta["train_sequences"] + meta["heldout_sequences"] == 60
    assert calls[1] == {"chunk-0000.pt"}  # a reload reads only the new files
