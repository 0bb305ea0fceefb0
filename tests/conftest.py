"""Shared fixtures: tiny random causal LMs built from configs (no download, seconds)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pair():
    """(draft, target): the draft is a noisy copy of the target, so they agree often.

    A large init range keeps random models from repeating one token forever."""
    from tiny_models import noisy_copy, tiny_llama

    target = tiny_llama(2, seed=0, dtype=torch.float32)
    return noisy_copy(target, 0.05, seed=1), target
