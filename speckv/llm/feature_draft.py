"""A feature-conditioned draft (EAGLE-style): one decoder layer that extends the full target.

A plain draft re-derives the target's state from the tokens with a few layers of its own.
This one reads what the target has already computed: at sequence position ``t`` its input is
the embedding of token ``x[t]`` (the target's own embeddings, shared and frozen) together
with the target's last hidden state ``f[t-1]`` (after the final norm, the vector the target's
LM head turns into the logits for ``x[t]``), fused by one linear map and one decoder layer
initialised from the target's last, then the target's final norm. Its output ``g[t]`` is
trained to *be* ``f[t]``: the head
(a :class:`~speckv.llm.head.ReducedHead` over the target's most frequent answer tokens,
the target's own output embeddings of them) turns it into the next token's logits.

Where does ``f[t-1]`` come from? After a verify forward the target has computed it for every
position it accepted, so the draft's catch-up forward reads the target's states
(:class:`TargetStates`). Beyond the last verified position the draft feeds its own output
back: drafted token ``k + 1`` reads ``g`` of drafted token ``k``. Its cache entries made from
its own states are discarded after verification and recomputed from the target's in the next
catch-up, so the draft's cache only ever holds positions conditioned on the target.

Training (:mod:`speckv.distill.feature`) unrolls exactly that (EAGLE-3's training-time test):
the positions of depth 2.. read the draft's own outputs, attending to the teacher-forced
prefix and to their own chain (:meth:`FeatureDraft.unroll`), and the trace profiler uses the
same :meth:`FeatureDraft.unroll` with the draft's own greedy tokens, so a trace scores every
γ exactly as the live decoder drafts it.

The module answers the causal-LM call the decoder makes (``model(input_ids=, cache=,
logits_to_keep=)`` with ``.logits``), so the decoder's forward calls, the cost model and the
catch-up timing need nothing special; :meth:`new_cache` makes the cache that carries the
target's states in.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speckv.llm.head import ReducedHead

#: the ``kind`` a saved feature-conditioned draft names in its ``speckv_draft.json``.
KIND = "feature"


@dataclass
class FeatureDraftConfig:
    """The shapes of a feature-conditioned draft (the target's, read from its config)."""

    base: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    draft_vocab: int
    init_layer: int  # the target layer the draft's layer starts from

    @classmethod
    def from_target(cls, base: str, config: Any, draft_vocab: int,
                    init_layer: int | None = None) -> FeatureDraftConfig:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = int(config.num_attention_heads)
        return cls(base=base, hidden_size=int(config.hidden_size), num_attention_heads=heads,
                   num_key_value_heads=int(getattr(config, "num_key_value_heads", heads)),
                   head_dim=int(getattr(config, "head_dim", None)
                                or config.hidden_size // heads),
                   intermediate_size=int(config.intermediate_size),
                   rms_norm_eps=float(config.rms_norm_eps), rope_theta=float(theta),
                   vocab_size=int(config.vocab_size), draft_vocab=int(draft_vocab),
                   init_layer=int(config.num_hidden_layers - 1 if init_layer is None
                                  else init_layer))


class _RMSNorm(nn.Module):
    """Llama's RMSNorm (statistics in float32, as the target computes them)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if dtype in (torch.bfloat16, torch.float16) else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class _Layer(nn.Module):
    """One Llama decoder layer, with the attention split into its parts so that the same
    weights serve a cached forward and the unrolled one."""

    def __init__(self, c: FeatureDraftConfig) -> None:
        super().__init__()
        h, d = c.hidden_size, c.head_dim
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, d
        self.input_layernorm = _RMSNorm(h, c.rms_norm_eps)
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.post_attention_layernorm = _RMSNorm(h, c.rms_norm_eps)
        self.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, h, bias=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # positions [B, T] -> x [B, H, T, d]
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """Normed input ``[B, T, H]`` -> rotated queries ``[B, heads, T, d]``, keys and values
        ``[B, kv_heads, T, d]``."""
        b, t, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return self._rope(q, positions), self._rope(k, positions), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after the attention output ``[B, heads, T, d]`` and the MLP."""
        b, _, t, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        """Grouped-query keys/values repeated to one per query head."""
        rep = self.heads // self.kv_heads
        return kv if rep == 1 else kv.repeat_interleave(rep, dim=1)


class TargetStates:
    """The target's last hidden state at every position it has computed, for one sequence.

    ``capture(target, start)`` is a context manager around one target forward whose first
    fed token sits at position ``start``: it writes the target's final-norm output for the
    fed tokens into rows ``start..``. Rows are valid up to ``valid`` (the decoder keeps it at
    the target cache's length: states of rejected tokens are never read).
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
                 ) -> None:
        self.rows = torch.zeros(256, hidden_size, dtype=dtype, device=device)
        self.valid = 0

    def _room(self, size: int) -> None:
        if size > len(self.rows):
            grown = self.rows.new_zeros(max(size, 2 * len(self.rows)), self.rows.shape[1])
            grown[: len(self.rows)] = self.rows
            self.rows = grown

    def write(self, start: int, states: torch.Tensor) -> None:
        self._room(start + len(states))
        self.rows[start : start + len(states)] = states.to(self.rows.dtype)

    @contextlib.contextmanager
    def capture(self, target: nn.Module, start: int) -> Iterator[TargetStates]:
        handle = final_norm(target).register_forward_hook(
            lambda _m, _i, out: self.write(start, out[0]))
        try:
            yield self
        finally:
            handle.remove()


def final_norm(target: nn.Module) -> nn.Module:
    """The target's final norm module (its output is what the LM head reads)."""
    inner = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise TypeError(f"{type(target).__name__} has no final norm at .model.norm: a "
                        "feature-conditioned draft needs a Llama-style target.")
    return norm


class FeatureCache:
    """The draft's KV cache for one sequence, with where its input states come from.

    ``states``: the target's (:class:`TargetStates`, rows below ``states.valid``); positions
    past them read the draft's own output of the position before (``own``). Croppable like
    Hugging Face's ``DynamicCache`` (``crop(n)``: keep ``n`` tokens; negative: drop ``-n``).
    """

    def __init__(self, draft: FeatureDraft, states: TargetStates | None = None,
                 batch: int = 1) -> None:
        c = draft.cfg
        p = next(draft.parameters())
        self.k = p.new_zeros(batch, c.num_key_value_heads, 256, c.head_dim)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.states = states
        self.own: torch.Tensor | None = None  # the draft's output at position length - 1

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        if keep < self.length:
            self.own = None  # the kept prefix's last output is no longer at hand
        self.length = keep

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            size = max(end, 2 * self.k.shape[2])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], size, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end


class FeatureDraft(nn.Module):
    """See the module's docstring. ``embed`` is the target's input embedding (frozen, shared)."""

    is_feature_draft = True

    def __init__(self, cfg: FeatureDraftConfig, embed: nn.Embedding, head: ReducedHead) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = embed
        self.embed_tokens.requires_grad_(False)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layer = _Layer(cfg)
        self.norm = _RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = head
        # what the decoder, the cost model, the profiler and Hugging Face's assisted
        # generation read from a causal LM's config
        self.config = SimpleNamespace(vocab_size=cfg.vocab_size, hidden_size=h,
                                      model_type="speckv-feature-draft", eos_token_id=None,
                                      is_encoder_decoder=False)
        self.config.get_text_config = lambda *a, **k: self.config
        self.generation_config = None

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def _supports_logits_to_keep(self) -> bool:
        return True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    # ------------------------------------------------------------------------ the parts
    def _inputs(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        emb = self.embed_tokens(tokens).to(states.dtype)
        return self.fc(torch.cat((emb, states), -1))

    def features(self, tokens: torch.Tensor, states: torch.Tensor, positions: torch.Tensor
                 ) -> torch.Tensor:
        """Teacher-forced outputs ``g`` ``[B, T, H]``: token ``t`` with state ``states[:, t]``
        (the target's at position ``t - 1``) at ``positions[:, t]``, causal (right padding
        never reaches a real position)."""
        x = self._inputs(tokens, states)
        q, k, v = self.layer.qkv(x, positions)
        attn = F.scaled_dot_product_attention(q, self.layer.expand(k), self.layer.expand(v),
                                              is_causal=True)
        return self.norm(self.layer.finish(x, attn)), (k, v)

    def logits_small(self, g: torch.Tensor) -> torch.Tensor:
        return self.lm_head.small(g)

    # ----------------------------------------------------------------- the causal-LM call
    def new_cache(self, states: TargetStates | None = None) -> FeatureCache:
        return FeatureCache(self, states)

    def forward(self, input_ids: torch.Tensor, cache: FeatureCache, logits_to_keep: int = 1,
                **_: Any) -> SimpleNamespace:
        """The decoder's forward: ``input_ids`` ``[1, n]`` after ``cache``'s tokens; the input
        state of each is the target's where it has one, else the draft's own last output."""
        g = self.encode(input_ids, cache)
        return SimpleNamespace(logits=self.lm_head(g[:, -logits_to_keep:]))

    def encode(self, input_ids: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """:meth:`forward`'s outputs ``g`` ``[1, n, H]`` at every fed position (a trace's
        tree roots read them)."""
        n, start = input_ids.shape[1], cache.length
        p = next(self.parameters())
        states = p.new_zeros(1, n, self.cfg.hidden_size)
        # token t reads row t - 1 (position 0 reads zeros): the target's where it has one
        covered = 0 if cache.states is None else cache.states.valid
        lo, hi = max(start, 1), min(start + n - 1, covered)
        if hi >= lo:
            states[0, lo - start : hi - start + 1] = cache.states.rows[lo - 1 : hi]
        first_own = max(start, hi + 1, 1)
        if first_own < start + n:
            if first_own == start and cache.own is not None:
                states[0, 0] = cache.own  # a drafted token reads the draft's own last output
                first_own += 1
            if first_own < start + n and cache.states is not None:
                raise ValueError(
                    f"feature draft: the token(s) at positions {first_own}..{start + n - 1} "
                    f"have no target state (the target has {covered}); catch the draft up "
                    "on verified tokens only, and feed drafted tokens one at a time.")
            # without target states (cost timing) the rest read zeros
        positions = torch.arange(start, start + n, device=p.device)[None]
        x = self._inputs(input_ids.to(p.device), states)
        q, k, v = self.layer.qkv(x, positions)
        cache.append(k, v)
        keys = self.layer.expand(cache.k[:, :, : cache.length])
        values = self.layer.expand(cache.v[:, :, : cache.length])
        if n == 1:
            attn = F.scaled_dot_product_attention(q, keys, values)
        else:
            allowed = torch.ones(n, cache.length, dtype=torch.bool, device=p.device).tril(start)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        g = self.norm(self.layer.finish(x, attn))
        cache.own = g[0, -1]
        return g

    def tree_forward(self, tokens: torch.Tensor, states: torch.Tensor, positions: torch.Tensor,
                     cache: FeatureCache, allowed: torch.Tensor) -> torch.Tensor:
        """Tree nodes after ``cache``'s tokens (:mod:`speckv.decode.tree`): ``tokens``
        ``[q]`` with their input ``states`` ``[q, H]`` (each its parent's output, the way a
        drafted chain token reads the one before) at ``positions`` ``[q]``, attending where
        ``allowed`` ``[q, cache.length + q]`` says. Appends their keys; returns their outputs
        ``g`` ``[q, H]`` (the head turns them into logits)."""
        p = next(self.parameters())
        x = self._inputs(tokens.to(p.device)[None], states.to(p.dtype)[None])
        q, k, v = self.layer.qkv(x, positions.to(p.device)[None])
        cache.append(k, v)
        keys = self.layer.expand(cache.k[:, :, : cache.length])
        values = self.layer.expand(cache.v[:, :, : cache.length])
        attn = F.scaled_dot_product_attention(q, keys, values,
                                              attn_mask=allowed.to(p.device))
        return self.norm(self.layer.finish(x, attn))[0]

    # -------------------------------------------------------------------- the unrolled call
    def unroll(self, tokens: torch.Tensor, states: torch.Tensor, positions: torch.Tensor,
               depth: int, next_tokens: torch.Tensor | None = None,
               origins: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Outputs ``g`` of depths ``1..depth`` from every origin at once, ``[B, T, H]`` each.

        Depth 1 is :meth:`features` (origin ``t`` = token ``t`` with the target's state).
        Depth ``d`` at origin ``t`` is the draft's ``d``-th drafted step from there: the token
        at position ``t + d - 1`` with the depth ``d - 1`` output as its state, attending to the
        teacher-forced keys up to ``t`` and to its own chain. Its token is
        ``next_tokens[:, t + d - 1]`` (training: the true token, as only a chain that
        stayed right matters) or, with ``next_tokens=None``, the draft's own greedy token of
        depth ``d - 1`` (what the live decoder drafts; ``origins`` ``[B, T]`` bool may limit
        the work to the origins a trace needs).
        """
        g, (k1, v1) = self.features(tokens, states, positions)
        outs = [g]
        t = tokens.shape[1]
        idx = torch.arange(t, device=tokens.device)
        causal = idx[None, :] <= idx[:, None]  # [query origin, key]
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        k1e, v1e = self.layer.expand(k1), self.layer.expand(v1)
        chain_k: list[torch.Tensor] = []
        chain_v: list[torch.Tensor] = []
        prev = g
        for d in range(2, depth + 1):
            if next_tokens is None:
                tok = self.lm_head.token_ids[self.logits_small(prev).argmax(-1)]
            else:
                tok = next_tokens[:, d - 1 : d - 1 + t]
            x = self._inputs(tok, prev)
            q, k, v = self.layer.qkv(x, positions + (d - 1))
            k, v = self.layer.expand(k), self.layer.expand(v)
            chain_k.append(k)
            chain_v.append(v)
            s1 = (q @ k1e.transpose(-1, -2)) * scale
            s1 = s1.masked_fill(~causal, float("-inf"))
            sc = torch.stack([(q * kk).sum(-1) for kk in chain_k], -1) * scale  # [B,h,T,d-1]
            scores = torch.cat((s1, sc), -1)
            wide = torch.float32 if scores.dtype in (torch.bfloat16, torch.float16) else None
            weights = torch.softmax(scores, -1, dtype=wide).to(q.dtype)
            attn = weights[..., :t] @ v1e
            attn = attn + (weights[..., t:, None] * torch.stack(chain_v, -2)).sum(-2)
            prev = self.norm(self.layer.finish(x, attn))
            outs.append(prev)
        return outs


# ------------------------------------------------------------------------------ building
def build_feature_draft(cfg: FeatureDraftConfig, target_state: dict[str, torch.Tensor],
                        token_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                        ) -> FeatureDraft:
    """A fresh draft from the target's weights: its embeddings (shared), its layer
    ``cfg.init_layer`` and its output embeddings of ``token_ids`` (the reduced head); the
    fusing map starts as the sum of the two inputs."""
    emb_w = target_state["model.embed_tokens.weight"]
    embed = nn.Embedding.from_pretrained(emb_w.float(), freeze=True)
    head_w = target_state.get("lm_head.weight", emb_w)
    head = ReducedHead(head_w[token_ids].float(), token_ids, cfg.vocab_size)
    head.weight.requires_grad_(False)
    model = FeatureDraft(cfg, embed, head)
    prefix = f"model.layers.{cfg.init_layer}."
    own = {}
    for key, value in target_state.items():
        if key.startswith(prefix):
            name = key[len(prefix):].replace("self_attn.", "").replace("mlp.", "")
            own[name] = value.float()
    missing, unexpected = model.layer.load_state_dict(own, strict=False)
    if [m for m in missing if m != "inv_freq"] or unexpected:
        raise RuntimeError(f"feature draft init: missing={missing} unexpected={unexpected}")
    h = cfg.hidden_size
    with torch.no_grad():
        eye = torch.eye(h)
        model.fc.weight.copy_(torch.cat((eye, eye), 1))
        # the layer starts as the identity (its output projections at zero): the draft's
        # first output is the target's state it read, and training grows the layer from there
        model.layer.o_proj.weight.zero_()
        model.layer.down_proj.weight.zero_()
        model.norm.weight.copy_(target_state["model.norm.weight"].float())
    return model.to(dtype)


#: weights a saved feature draft does not store (they are the target's)
def _shared(key: str) -> bool:
    return key.startswith("embed_tokens.") or key == "lm_head.weight"


def save_feature_draft(model: FeatureDraft, out: Path, card: dict) -> None:
    """Save what is the draft's own (bf16 safetensors) and its config, atomically."""
    from safetensors.torch import save_file

    from speckv.llm.weights import atomic_dir

    own = {k: (v if k.endswith("token_ids") else v.detach().to(torch.bfloat16)).contiguous()
           for k, v in model.state_dict().items() if not _shared(k)}
    with atomic_dir(out) as tmp:
        save_file(own, str(tmp / "draft.safetensors"))
        meta = {"kind": KIND, **asdict(model.cfg), **card}
        (tmp / "speckv_draft.json").write_text(json.dumps(meta, indent=2))


def own_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a saved feature draft stores (``draft.safetensors``), in float32 but the
    head's token ids, ready for ``load_state_dict(..., strict=False)``."""
    from safetensors.torch import load_file

    own = load_file(str(Path(path) / "draft.safetensors"))
    return {k: v if k.endswith("token_ids") else v.float() for k, v in own.items()}


def load_feature_draft(path: Path, target_state: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.bfloat16) -> FeatureDraft:
    """Rebuild a saved feature draft on the target's weights ``target_state``."""
    meta = json.loads((Path(path) / "speckv_draft.json").read_text())
    fields = FeatureDraftConfig.__dataclass_fields__
    cfg = FeatureDraftConfig(**{k: meta[k] for k in fields})
    own = own_tensors(path)
    model = build_feature_draft(cfg, target_state, own["lm_head.token_ids"])
    model.load_state_dict(own, strict=False)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


def is_feature_draft(model: Any) -> bool:
    return bool(getattr(model, "is_feature_draft", False))
