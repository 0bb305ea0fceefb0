"""Shared fixtures: tiny random causal LMs built from configs (no download, seconds)."""

from __future__ import annotations

import os

# ATEN_CPU_CAPABILITY caps torch's own kernels, but oneDNN and MKL still see the CPU: on a
# machine with AMX, ``ATEN_CPU_CAPABILITY=avx2`` alone crashes bfloat16 attention
# ("pack_vnni2 is only supported when avx512 is supported"), which no real AVX2 machine
# would. Cap the other two libraries to match (before torch loads them), so that asking for
# avx2 or default simulates such a CPU instead of a mix that exists nowhere.
_ISA = {"avx2": ("AVX2", "AVX2"), "default": ("SSE41", "SSE4_2")}
if os.environ.get("ATEN_CPU_CAPABILITY") in _ISA:
    onednn, mkl = _ISA[os.environ["ATEN_CPU_CAPABILITY"]]
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", onednn)
    os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", mkl)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); restore after.

    torch's default dtype is restored too: transformers sets that process-wide value while it
    builds a model, so two threads loading at once (tests/llm/test_load.py races two loads
    in threads) can leave bfloat16 behind for every later test, depending on timing."""
    before = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_pair():
    """(draft, target): the draft is a noisy copy of the target, so they agree often.

    A large init range keeps random models from repeating one token forever."""
    from tiny_models import noisy_copy, tiny_llama

    target = tiny_llama(2, seed=0, dtype=torch.float32)
    return noisy_copy(target, 0.05, seed=1), target


@pytest.fixture(scope="session")
def tiny_feature_pair(tiny_pair):
    """(draft, target): a feature-conditioned draft trained briefly on ``tiny_pair``'s target."""
    from tiny_models import tiny_feature_draft

    target = tiny_pair[1]
    return tiny_feature_draft(target), target
