"""speckv's causal-LM draft as a GGUF file llama.cpp loads (``speckv draft export-gguf``).

A draft saved by :mod:`speckv.llm.draft` stores only what it does not share with its target:
its decoder layers and final norm (and, with a reduced head, the ids of the head's tokens).
The GGUF written here is the target's own file with those layers in place of the target's:

- every metadata entry of the target (tokenizer, chat template, rope base, norm epsilon,
  head counts) is copied, with ``llama.block_count`` set to the draft's layer count, so
  llama.cpp tokenizes and positions exactly as for the target;
- ``token_embd.weight`` is the target's tensor, bytes as they are (its quantization too): the
  draft was trained on those embeddings de-quantized, which are the same numbers;
- the head is the target's tied embeddings over the **full vocabulary** (no
  ``output.weight``): llama.cpp checks that a model's head covers its vocabulary. A draft
  trained with a reduced head (``draft_vocab`` N: the target's own output embeddings of its N
  most frequent answer tokens, frozen) scores the same N tokens with the same numbers, so the
  two agree wherever the full head's argmax is one of the N tokens; elsewhere the GGUF draft
  can propose a token the reduced head could not (a rare token, where the reduced draft
  proposed its best frequent one), and it pays for a 49,152-row head instead of an N-row
  one, the larger part of its forward;
- the layers are written in ``--type`` (bf16: the stored weights exactly; f16, f32 or q8_0),
  with the query and key projections permuted from Hugging Face's rotate-half layout into
  the interleaved rope layout llama.cpp's ``llama`` architecture uses (what
  ``convert_hf_to_gguf.py`` does for every llama checkpoint).

:func:`check_logits` compares the written file's logits with the torch draft's (with the full
tied head) on a prompt.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Final

import numpy as np

from speckv.atomic import atomic_write
from speckv.engines.llamacpp import EngineError, check_gguf

log = logging.getLogger(__name__)

TYPES: Final = ("bf16", "f16", "f32", "q8_0")
#: the causal-LM draft shipped with the demo: the one llama.cpp can run (the demo's default
#: draft reads the target's hidden states, which llama.cpp cannot pass between models)
GGUF_DRAFT: Final = "models/speckv-draft-v2"
DEFAULT_TYPE: Final = "bf16"
#: Hugging Face's per-layer names -> llama.cpp's
_LAYER_NAMES: Final = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
#: metadata the writer sets itself or that this file overrides
_SKIP_KEYS: Final = ("general.architecture", "llama.block_count", "general.name",
                     "general.file_type")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """``[heads·head_dim, in]`` rows from Hugging Face's rotate-half order (each head's first
    half of dimensions pairs with its second half) into llama.cpp's interleaved order (pairs
    of adjacent dimensions), per head."""
    out_dim = weight.shape[0]
    half = out_dim // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _read_draft(draft_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The draft's card and its own weights as float32 numpy arrays."""
    import torch
    from safetensors.torch import load_file

    meta_path = draft_dir / "speckv_draft.json"
    weights = draft_dir / "draft.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise EngineError(f"{draft_dir} is not a speckv draft (it needs speckv_draft.json and "
                          "draft.safetensors). Pass a folder written by `speckv draft distill`, "
                          "e.g. models/speckv-draft-v2.")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") == "feature":
        raise EngineError(f"{draft_dir} is a feature-conditioned draft: it reads the target's "
                          "hidden states, which llama.cpp cannot pass from one model to "
                          "another. Export a causal-LM draft (e.g. models/speckv-draft-v2).")
    if meta.get("trained_head"):
        raise EngineError(f"{draft_dir} trained its own reduced head, which a full-vocabulary "
                          "GGUF head cannot hold; export a draft whose head is the target's "
                          "(trained_head false, e.g. models/speckv-draft-v2).")
    state = {k: v.to(torch.float32).numpy() for k, v in load_file(str(weights)).items()
             if k != "lm_head.token_ids"}
    return meta, state


def export_gguf(draft_dir: str | os.PathLike[str], target_gguf: str | os.PathLike[str],
                out: str | os.PathLike[str], dtype: str = DEFAULT_TYPE) -> dict[str, Any]:
    """Write the draft in ``draft_dir`` as a GGUF file ``out`` on the target ``target_gguf``
    (see the module docstring); returns what was written."""
    import gguf

    if dtype not in TYPES:
        raise EngineError(f"--type {dtype!r}: use one of {', '.join(TYPES)}.")
    draft_dir, target_gguf, out = Path(draft_dir), check_gguf(target_gguf, "target"), Path(out)
    meta, state = _read_draft(draft_dir)
    reader = gguf.GGUFReader(str(target_gguf))
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    if arch != "llama":
        raise EngineError(f"{target_gguf.name} is a {arch!r} model; the export writes the "
                          "llama architecture (SmolLM2, Llama, Mistral-style targets).")
    heads = int(fields["llama.attention.head_count"].contents())
    kv_heads = int(fields["llama.attention.head_count_kv"].contents())
    hidden = int(fields["llama.embedding_length"].contents())
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None or any(t.name == "output.weight" for t in reader.tensors):
        raise EngineError(f"{target_gguf.name} has no tied head (token_embd.weight without "
                          "output.weight); this export needs a target whose head is its "
                          "embeddings.")
    if state["model.norm.weight"].shape != (hidden,):
        raise EngineError(f"The draft's hidden size {state['model.norm.weight'].shape[0]} is "
                          f"not {target_gguf.name}'s ({hidden}): export it on its own target.")
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "f16": gguf.GGMLQuantizationType.F16,
             "f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    ftype = {"bf16": 32, "f16": 1, "f32": 0, "q8_0": 7}[dtype]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for key, f in fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS:
                continue
            main = f.types[0]
            sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), main, sub)
        writer.add_name(f"speckv draft {draft_dir.name} ({n_layers} layers) on "
                        f"{target_gguf.stem}")
        writer.add_block_count(n_layers)
        writer.add_file_type(ftype)
        writer.add_tensor("token_embd.weight", embd.data, raw_dtype=embd.tensor_type)
        writer.add_tensor("output_norm.weight", state["model.norm.weight"].astype(np.float32))
        for i in range(n_layers):
            for hf, ll in _LAYER_NAMES.items():
                w = state[f"model.layers.{i}.{hf}"]
                if hf == "self_attn.q_proj.weight":
                    w = rope_permute(w, heads)
                elif hf == "self_attn.k_proj.weight":
                    w = rope_permute(w, kv_heads)
                if w.ndim == 1:  # norms stay float32, as llama.cpp expects
                    writer.add_tensor(f"blk.{i}.{ll}", w.astype(np.float32))
                else:
                    data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
                    writer.add_tensor(f"blk.{i}.{ll}", data,
                                      raw_dtype=None if dtype in ("f16", "f32") else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    info = {"out": str(out), "bytes": out.stat().st_size, "layers": n_layers, "type": dtype,
            "target": str(target_gguf), "draft": str(draft_dir),
            "head": "full vocabulary (the target's tied embeddings)",
            "reduced_head_of_the_draft": meta.get("draft_vocab")}
    log.info("wrote %s: %d layers, %s, %.1f MB", out, n_layers, dtype, info["bytes"] / 1e6)
    return info


def torch_full_head_draft(draft_dir: str | os.PathLike[str]):
    """The torch draft of ``draft_dir`` with its head replaced by the target's full tied
    head: the model the GGUF file holds (float32)."""
    import torch

    from speckv.llm.draft import load_draft

    model = load_draft(Path(draft_dir), dtype=torch.float32)
    full = model.get_input_embeddings().weight
    head = torch.nn.Linear(full.shape[1], full.shape[0], bias=False)
    head.weight = full
    model.lm_head = head
    return model.eval()


def check_logits(gguf_path: str | os.PathLike[str], draft_dir: str | os.PathLike[str],
                 token_ids: list[int], threads: int | None = None) -> dict[str, Any]:
    """The GGUF draft's logits against the torch draft's (full head) at every position of
    ``token_ids``: top-1 agreement (and the torch draft's top-1/top-2 margin where they
    disagree), and the largest difference relative to each row's logit range."""
    import torch

    from speckv.engines.llamacpp import GGUFModel

    model = torch_full_head_draft(draft_dir)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([token_ids])).logits[0].float().numpy()
    ggml = GGUFModel(gguf_path, n_ctx=max(256, len(token_ids) + 8), threads=threads,
                     what="draft")
    try:
        got = np.array(ggml.forward(token_ids, "all"), copy=True)
    finally:
        ggml.close()
    spread = ref.max(-1) - ref.min(-1)
    rel = np.abs(got - ref).max(-1) / np.maximum(spread, 1e-6)
    same = got.argmax(-1) == ref.argmax(-1)
    top2 = np.sort(ref, -1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.maximum(spread, 1e-6)
    return {"positions": len(token_ids), "top1_agreement": float(same.mean()),
            "max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
            "disagree_at": np.flatnonzero(~same).tolist(),
            # the torch draft's top-1/top-2 margin where the two disagree, relative to the
            # row's range: a disagreement at a near-tie is rounding, not a wrong export
            "disagree_margins": margin[~same].tolist()}


def cached_export(draft_dir: str | os.PathLike[str], target_gguf: str | os.PathLike[str],
                  dtype: str = DEFAULT_TYPE) -> Path:
    """The draft exported to GGUF once per (draft, target, type), in speckv's cache."""
    from speckv.atomic import made_once
    from speckv.paths import cache_dir

    draft_dir, target_gguf = Path(draft_dir), Path(target_gguf)
    weights = draft_dir / "draft.safetensors"
    if not weights.is_file():
        raise EngineError(f"--draft {draft_dir}: no draft.safetensors there. Pass a saved "
                          "causal-LM draft folder (e.g. models/speckv-draft-v2) or "
                          "--gguf-draft FILE.")
    stamp = (f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}-"
             f"{target_gguf.stat().st_size}")
    out = (cache_dir() / "gguf-drafts"
           / f"{draft_dir.name}-{target_gguf.stem}-{dtype}-{stamp}.gguf")
    return made_once(out, lambda path: export_gguf(draft_dir, target_gguf, path, dtype))
