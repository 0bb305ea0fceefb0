"""Tiny random Llama models for decoder tests: built from configs, seeded, no download.

The greedy-equivalence tests run in float64, so that a chunked verification forward and a
one-token forward order the logits identically (in float32 or bfloat16 near-ties could flip
and blur a real bug with rounding). A saved pair (weights + a word-level tokenizer) lets the
command lines run end to end on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
EOS = 2
#: prompts the decoder tests decode (a tiny feature-conditioned draft is trained on them too)
DECODE_PROMPTS = ([1, 5, 17, 33, 8], [1, 3, 40], [1, 19, 9], [1, 77, 3, 3, 12, 60])


def tiny_llama(layers: int, seed: int, vocab: int = VOCAB, hidden: int = 32,
               dtype: torch.dtype = torch.float64, init: float = 0.5):
    """A random causal LM; a large ``init`` keeps it from repeating one token forever."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=init, bos_token_id=1,
                         eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


def noisy_copy(model, scale: float, seed: int):
    """``model`` with Gaussian noise (``scale`` x each tensor's std) on every weight."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out


def save_with_tokenizer(model, out: Path) -> Path:
    """Save ``model`` with a word-level tokenizer over its vocabulary ("w3" is id 3, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": EOS}
    vocab.update({f"w{i}": i for i in range(3, model.config.vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<pad>")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_feature_draft(target, draft_vocab: int = 96, steps: int = 300, seed: int = 0,
                       prompts: int = 24, answer: int = 32, extra: tuple = ()):
    """A feature-conditioned draft (speckv.llm.feature_draft) of a tiny ``target``, trained
    for a few seconds with speckv's own loss on the target's greedy answers and states to
    :data:`DECODE_PROMPTS`, ``extra`` and ``prompts`` random ones, so that it agrees with the target
    often on what the tests decode, though not everywhere (a random tiny model leaves nothing
    to generalise from); with ``draft_vocab`` < vocabulary some tokens it can never propose."""
    from speckv.distill.feature import feature_loss, make_batch
    from speckv.llm.feature_draft import FeatureDraftConfig, build_feature_draft

    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    rows = []
    with torch.no_grad():
        randoms = [[1, *torch.randint(3, vocab, (int(torch.randint(2, 8, (1,), generator=gen)),),
                                      generator=gen).tolist()] for _ in range(prompts)]
        for i, prompt in enumerate([*DECODE_PROMPTS, *extra, *randoms]):
            out = target.generate(input_ids=torch.tensor([prompt]), max_new_tokens=answer,
                                  do_sample=False, pad_token_id=0, eos_token_id=-1)
            seq = out[0].tolist()
            states = target.model(input_ids=out).last_hidden_state[0].to(torch.bfloat16)
            n_prompt = len(prompt)
            rows.append({"prompt_id": f"p{i}", "prompt_ids": prompt, "answer_ids": seq[n_prompt:],
                         "prompt_states": states[: n_prompt - 1],
                         "hidden": states[n_prompt - 1 : len(seq) - 1]})
    counts = torch.bincount(torch.tensor([t for r in rows for t in r["answer_ids"]]),
                            minlength=vocab)
    token_ids = torch.argsort(-counts.double() + torch.arange(vocab) / (2.0 * vocab))[:draft_vocab]
    cfg = FeatureDraftConfig.from_target("tiny", target.config, draft_vocab)
    state = {k: v.float() for k, v in target.state_dict().items()}
    torch.manual_seed(seed)
    draft = build_feature_draft(cfg, state, token_ids)
    t2d = draft.lm_head.to_reduced()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        pick = torch.randint(len(rows), (8,), generator=gen).tolist()
        batch = make_batch([rows[i] for i in pick], 3, cfg.hidden_size)
        loss, _ = feature_loss(draft, batch, t2d, 3, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    draft = draft.to(next(target.parameters()).dtype).eval()
    draft.requires_grad_(False)
    return draft


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """Greedy decoding by full recomputation at every token (no cache at all).

    The tests compare the decoder with it exactly. That is sound here, unlike on a real
    model: the tiny models compute in float64, where chunked and one-token forwards differ by
    ~1e-16 relative while their top two logits lie ~1e-2 apart, so a flipped tie would take
    a gap some 13 orders of magnitude below the typical one. The tests that decode greedily
    also check the exact invariant (:func:`speckv.decode.invariant.greedy_invariant`), which holds
    whatever the numerics.
    """
    seq = list(prompt)
    for _ in range(n):
        tok = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt):]
