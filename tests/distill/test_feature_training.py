"""Training the feature-conditioned draft (speckv.distill.feature) end to end on a tiny base:
it saves a draft that loads, its held-out agreement is recorded, and it resumes."""

from __future__ import annotations

import json

import torch
from tiny_models import VOCAB, save_with_tokenizer, tiny_llama

from speckv.distill.feature import train_feature_draft
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
