"""Fixtures the decoder's tests share: a tiny target and drafts that agree with it always,
often and rarely."""

from __future__ import annotations

import pytest
from tiny_models import noisy_copy, tiny_llama


@pytest.fixture(scope="module")
def target():
    return tiny_llama(2, seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    """Drafts from always agreeing (a copy) through often to rarely agreeing."""
    return {
        "copy": noisy_copy(target, 0.0, seed=1),
        "noisy": noisy_copy(target, 0.08, seed=1),
        "random": tiny_llama(1, seed=7),
    }
