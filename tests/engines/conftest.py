"""Fixtures of the llama.cpp tests (the case: tests/gguf_case.py)."""

from __future__ import annotations

import pytest
from gguf_case import DRAFT_DIR, PROMPT, target_path, tokenize


@pytest.fixture(scope="module")
def target():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the README's "
                        "set-up (make setup) installs it from requirements.lock")
    from speckv.engines.llamacpp import GGUFModel

    model = GGUFModel(target_path(), n_ctx=512, threads=1, what="target")
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompt_ids(target):
    return tokenize(target, PROMPT)


@pytest.fixture(scope="module")
def draft_gguf(tmp_path_factory):
    from speckv.engines.gguf_draft import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "draft.gguf"
    export_gguf(DRAFT_DIR, target_path(), out, "bf16")
    return out


@pytest.fixture(scope="module")
def draft(draft_gguf, target):
    from speckv.engines.llamacpp import GGUFModel

    model = GGUFModel(draft_gguf, n_ctx=512, threads=1, what="draft")
    yield model
    model.close()


@pytest.fixture(scope="module")
def plain(target, prompt_ids):
    from gguf_case import NEW_TOKENS

    from speckv.engines.llamacpp import LlamaCppDecoder

    return LlamaCppDecoder(target).generate(prompt_ids, NEW_TOKENS)
