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
