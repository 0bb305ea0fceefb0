"""speckv's own draft format: a shallow model that plugs into its target.

No smaller model shares SmolLM2's tokenizer, so speckv trains one (:mod:`speckv.distill`).
Architecture: the target's own architecture with ``n_layers`` decoder layers, initialised
from chosen target layers, sharing the target's token embeddings, which stay frozen and are
not stored. Its head is either the target's (tied, not stored) or a :class:`ReducedHead` over
the ``draft_vocab`` most frequent tokens of the target's answers (the target's own output
embeddings of those tokens, so only their ids are stored, or a trained copy). Only
what the draft does not share is saved (bf16 safetensors), next to ``speckv_draft.json``
naming the base model it plugs into. Any Hugging Face causal LM that shares the target's
tokenizer serves as a draft as well (:func:`speckv.llm.load.load_model`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from speckv.llm.head import ReducedHead
from speckv.llm.weights import DEMO_TARGET, atomic_dir, converted_gguf_dir, resolve


@dataclass
class DraftSpec:
    """What a draft is made of: the base model it plugs into, the base layers its own layers
    start from, and the size of its reduced vocabulary (``None``: the base's full head)."""

    base: str = DEMO_TARGET
    init_layers: list[int] = field(default_factory=lambda: [0, 1])
    draft_vocab: int | None = None
    #: train (and store) the reduced head; else it is the target's own output embeddings of
    #: those tokens, frozen and not stored (only their ids are)
    trained_head: bool = False

    @property
    def stored_head(self) -> bool:
        return bool(self.draft_vocab) and self.trained_head

    @property
    def n_layers(self) -> int:
        return len(self.init_layers)


def _base_dir(base: str) -> Path:
    where = resolve(base)
    if isinstance(where, Path) and where.suffix == ".gguf":
        return converted_gguf_dir(where)
    return Path(where)


def _shared_keys(key: str, stored_head: bool = False) -> bool:
    """Weights taken from the base model, never stored with the draft (a reduced head's token
    ids are always the draft's own)."""
    return key.startswith("model.embed_tokens.") or (key == "lm_head.weight" and not stored_head)


def build_draft(spec: DraftSpec, dtype=torch.float32, token_ids: torch.Tensor | None = None):
    """A fresh draft initialised from the base model's layers ``spec.init_layers``.

    With ``spec.draft_vocab``, its head is a :class:`ReducedHead` over ``token_ids`` (the
    base's output embeddings of those tokens; a placeholder range when loading, since the
    saved head replaces it)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    base = _base_dir(spec.base)
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers = spec.n_layers
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[: spec.n_layers]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(str(base / "model.safetensors"))
    own = {}
    for key, value in state.items():
        if key.startswith("model.layers."):
            idx = int(key.split(".")[2])
            if idx in spec.init_layers:
                new = spec.init_layers.index(idx)
                own[key.replace(f"model.layers.{idx}.", f"model.layers.{new}.", 1)] = value
        else:
            own[key] = value
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"draft init mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if spec.draft_vocab:
        if token_ids is None:
            token_ids = torch.arange(spec.draft_vocab)
        if len(token_ids) != spec.draft_vocab:
            raise ValueError(f"draft_vocab {spec.draft_vocab} but {len(token_ids)} token ids")
        full = model.get_output_embeddings().weight
        model.lm_head = ReducedHead(full[token_ids], token_ids, full.shape[0])
        model.config.tie_word_embeddings = False
    return model.to(dtype)


def save_draft(model, spec: DraftSpec, out: Path, card: dict) -> None:
    """Save only what cannot be taken from the base model, atomically."""
    from safetensors.torch import save_file

    own = {k: (v if k.endswith("token_ids") else v.detach().to(torch.bfloat16)).contiguous()
           for k, v in model.state_dict().items() if not _shared_keys(k, spec.stored_head)}
    with atomic_dir(out) as tmp:
        save_file(own, str(tmp / "draft.safetensors"))
        (tmp / "speckv_draft.json").write_text(json.dumps({**asdict(spec), **card}, indent=2))


def load_draft(path: Path, dtype=torch.bfloat16):
    """Rebuild a saved draft: base embeddings/head + the draft's own layers (a
    feature-conditioned one too, :mod:`speckv.llm.feature_draft`)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / "speckv_draft.json").read_text())
    if meta.get("kind") == "feature":
        from speckv.llm.feature_draft import load_feature_draft

        base = _base_dir(meta["base"])
        return load_feature_draft(path, load_file(str(base / "model.safetensors")), dtype)
    spec = DraftSpec(base=meta["base"], init_layers=meta["init_layers"],
                     draft_vocab=meta.get("draft_vocab"),
                     trained_head=bool(meta.get("trained_head", False)))
    own = load_file(str(Path(path) / "draft.safetensors"))
    model = build_draft(spec, dtype=torch.float32, token_ids=own.get("lm_head.token_ids"))
    model.load_state_dict({k: v if k.endswith("token_ids") else v.float()
                           for k, v in own.items()}, strict=False)
    if not spec.draft_vocab:
        model.tie_weights()
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model
