"""Shared fixtures: tiny random causal LMs built from configs (no download, seconds)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(layers: int, seed: int, vocab: int = 96, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def tiny_pair():
    """(draft, target): the draft is a noisy copy of the target, so they agree often.

    A large init range keeps random models from repeating one token forever."""
    target = tiny_llama(2, seed=0)
    draft = tiny_llama(2, seed=0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    return draft, target
