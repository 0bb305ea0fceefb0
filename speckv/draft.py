"""The demo draft: a shallow model that speckv distils from the demo target.

No smaller model shares SmolLM2's tokenizer, so speckv trains one. Architecture: the target's
own architecture with ``n_layers`` decoder layers, initialised from the target's first layers,
sharing the target's (tied) token embeddings and LM head, which stay frozen and are not
stored. Only the draft's layers and final norm are saved (bf16 safetensors, a few MB), next
to ``speckv_draft.json`` naming the base model they plug into.

Data: the target's own greedy answers to a pool of prompts of the four task categories
(:func:`speckv.prompts.distill_pool`, disjoint from the profiling suites), generated in
batches once, with the target's top-k log-probabilities at every answer position stored
beside the tokens. Loss: cross-entropy on the target's greedy token plus KL to the stored
top-k distribution, on answer positions only.

Everything is resumable: data chunks are skipped when present; training saves a checkpoint
every few minutes and continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from speckv.atomic import atomic_write
from speckv.models import DEMO_TARGET, DRAFT_DIR, cache_dir, converted_gguf_dir, resolve
from speckv.prompts import chat_ids, distill_pool

log = logging.getLogger(__name__)

TOPK = 8


@dataclass
class DraftSpec:
    """What a draft is made of: the base model it plugs into, the base layers its own layers
    start from, and the size of its reduced vocabulary (``None``: the base's full head)."""

    base: str = DEMO_TARGET
    init_layers: list[int] = field(default_factory=lambda: [0, 1])
    draft_vocab: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.init_layers)


class ReducedHead(torch.nn.Module):
    """An LM head over the ``N`` tokens a draft may propose (FR-Spec's frequency-ranked head,
    EAGLE-3's ``draft_vocab_size`` with its d2t map).

    ``small(hidden)`` gives the ``[.., N]`` logits; calling the head gives full-vocabulary
    logits with every other token at the dtype's lowest value, so every consumer of a
    causal LM's logits (the decoder, the trace profiler, Hugging Face's assisted generation)
    works unchanged: the argmax is always one of the ``N`` tokens, and softmax statistics
    (entropy, top-1, margin) equal those of the ``N`` logits exactly, since the others get
    probability 0. Verification stays over the target's full vocabulary, so a token outside
    the head costs a rejection and never changes the output.
    """

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())
        self.vocab_size = int(vocab_size)

    def small(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.small(hidden)
        full = small.new_full((*small.shape[:-1], self.vocab_size), torch.finfo(small.dtype).min)
        return full.index_copy_(-1, self.token_ids, small)

    def to_reduced(self) -> torch.Tensor:
        """``t2d``: index of every vocabulary token in the head, -1 where it has none."""
        t2d = torch.full((self.vocab_size,), -1, dtype=torch.long)
        t2d[self.token_ids] = torch.arange(len(self.token_ids))
        return t2d


def _base_dir(base: str) -> Path:
    where = resolve(base)
    if isinstance(where, Path) and where.suffix == ".gguf":
        return converted_gguf_dir(where)
    return Path(where)


def _shared_keys(key: str, reduced: bool = False) -> bool:
    """Weights taken from the base model, never stored with the draft."""
    return key.startswith("model.embed_tokens.") or (not reduced and key.startswith("lm_head."))


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

    from speckv.models import _atomic_dir

    reduced = isinstance(model.lm_head, ReducedHead)
    own = {k: (v if k.endswith("token_ids") else v.detach().to(torch.bfloat16)).contiguous()
           for k, v in model.state_dict().items() if not _shared_keys(k, reduced)}
    with _atomic_dir(out) as tmp:
        save_file(own, str(tmp / "draft.safetensors"))
        (tmp / "speckv_draft.json").write_text(json.dumps({**asdict(spec), **card}, indent=2))


def load_draft(path: Path, dtype=torch.bfloat16):
    """Rebuild a saved draft: base embeddings/head + the draft's own layers."""
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / "speckv_draft.json").read_text())
    spec = DraftSpec(base=meta["base"], init_layers=meta["init_layers"],
                     draft_vocab=meta.get("draft_vocab"))
    own = load_file(str(Path(path) / "draft.safetensors"))
    model = build_draft(spec, dtype=torch.float32, token_ids=own.get("lm_head.token_ids"))
    model.load_state_dict({k: v if k.endswith("token_ids") else v.float()
                           for k, v in own.items()}, strict=False)
    if not spec.draft_vocab:
        model.tie_weights()
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------ data
#: the pool the draft is distilled on (prompts per task) and the answer budget per prompt.
POOL_PER_TASK = 1100
ANSWER_TOKENS = 128


def data_dir() -> Path:
    return cache_dir() / "distill-v2"


class _TopK:
    """A logits processor that keeps the target's top-k log-probabilities of every step."""

    def __init__(self, k: int) -> None:
        self.k, self.steps = k, []

    def __call__(self, input_ids, scores):
        top = torch.log_softmax(scores.float(), -1).topk(self.k, dim=-1)
        self.steps.append((top.indices.to(torch.int32), top.values.to(torch.float16)))
        return scores


@torch.no_grad()
def _answer_batch(model, tok, group, pad: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers of one batch, their top-k log-probs and the target's last hidden state
    at every position that predicts an answer token (EAGLE-style drafts read it)."""
    ids = [chat_ids(tok, p.text)[-384:] for p in group]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    topk = _TopK(TOPK)
    gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, logits_processor=[topk], pad_token_id=pad)
    new = gen[:, width:]
    top_ids = torch.stack([s[0] for s in topk.steps], 1)
    top_lp = torch.stack([s[1] for s in topk.steps], 1)
    answers = []
    for r in range(len(group)):
        answer = new[r].tolist()
        if tok.eos_token_id in answer:
            answer = answer[: answer.index(tok.eos_token_id) + 1]
        answers.append(answer)
    # one teacher-forced pass over prompt + answer for the hidden states
    full = [x + a for x, a in zip(ids, answers, strict=True)]
    width2 = max(map(len, full))
    seq = torch.tensor([[pad] * (width2 - len(x)) + x for x in full])
    mask2 = torch.tensor([[0] * (width2 - len(x)) + [1] * len(x) for x in full])
    hidden = model.model(input_ids=seq, attention_mask=mask2).last_hidden_state
    rows = []
    for r, p in enumerate(group):
        n, start = len(answers[r]), width2 - len(full[r]) + len(ids[r]) - 1
        rows.append({
            "task": p.task, "prompt_id": p.prompt_id, "prompt_ids": ids[r],
            "answer_ids": answers[r], "top_ids": top_ids[r, :n], "top_logp": top_lp[r, :n],
            "hidden": hidden[r, start : start + n].to(torch.bfloat16).clone(),
        })
    return rows


def _check_manifest(path: Path, manifest: dict) -> None:
    """Chunks on disk must come from the same pool and settings, or a resume would mix two."""
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            raise RuntimeError(
                f"{path.parent} holds answers to another pool or settings (per_task, seed, "
                "max_new_tokens or the prompts themselves differ). Move that folder away, or "
                "pass the settings it was made with, then run `speckv draft data` again.")
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))


@torch.no_grad()
def generate_data(per_task: int = POOL_PER_TASK, batch_size: int = 16,
                  max_new_tokens: int = ANSWER_TOKENS, chunk: int = 64, seed: int = 0,
                  out: Path | None = None, threads: int | None = None) -> Path:
    """Generate the target's greedy answers to the pool in resumable chunks (one file each,
    written atomically; a chunk already on disk is skipped)."""
    from tqdm import tqdm

    from speckv.models import load_model

    if threads:
        torch.set_num_threads(threads)
    out = out or data_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = load_model(DEMO_TARGET, "fp16", dtype="bfloat16")
    tok, model = target.tokenizer, target.model
    pool = distill_pool(per_task, seed=seed)
    chunks = [pool[i : i + chunk] for i in range(0, len(pool), chunk)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    manifest = {"per_task": per_task, "seed": seed, "max_new_tokens": max_new_tokens,
                "chunks": [[p.prompt_id for p in c] for c in chunks]}
    _check_manifest(out / "manifest.json", manifest)
    todo = [ci for ci in range(len(chunks)) if not (out / f"chunk-{ci:04d}.pt").exists()]
    log.info("%d prompts in %d chunks; %d to generate into %s", len(pool), len(chunks),
             len(todo), out)
    made, started = 0, time.time()
    bar = tqdm(todo, desc="target answers (chunks)")
    for ci in bar:
        # similar lengths share a batch: less padding
        prompts = sorted(chunks[ci], key=lambda p: len(p.text))
        rows = []
        for bi in range(0, len(prompts), batch_size):
            rows += _answer_batch(model, tok, prompts[bi : bi + batch_size], pad, max_new_tokens)
        path = out / f"chunk-{ci:04d}.pt"
        atomic_write(path, lambda tmp, rows=rows: torch.save(rows, tmp))
        made += sum(len(r["answer_ids"]) for r in rows)
        rate = made / (time.time() - started)
        bar.set_postfix(tokens=made, tok_s=f"{rate:.0f}")
        log.info("chunk %d: %d answers, %d tokens so far, %.0f tokens/s", ci, len(rows), made,
                 rate)
    return out


def load_data(path: Path | None = None) -> list[dict]:
    path = path or data_dir()
    rows = []
    for f in sorted(Path(path).glob("chunk-*.pt")):
        rows.extend(torch.load(f, weights_only=False))
    return rows


# -------------------------------------------------------------------------------- training
#: prompt tokens the draft sees in training (the end of the prompt: the question, or the
#: passage a summary copies from); answers are kept whole.
PROMPT_CONTEXT = 256


def _batch(rows: list[dict], pad: int, prompt_context: int = PROMPT_CONTEXT):
    seqs, labels, tops, logps = [], [], [], []
    for r in rows:
        prompt, answer = r["prompt_ids"][-prompt_context:], r["answer_ids"]
        seq = prompt + answer
        labels.append([-100] * len(prompt) + answer)
        seqs.append(seq)
        tops.append(r["top_ids"])
        logps.append(r["top_logp"])
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), pad)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    top_ids = torch.zeros((len(rows), width, TOPK), dtype=torch.long)
    top_lp = torch.full((len(rows), width, TOPK), -1e4)
    for i, (s, lb, ti, tl) in enumerate(zip(seqs, labels, tops, logps, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(s)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
        n = len(ti)
        # label at position j is predicted from position j-1: shift the targets left by one
        top_ids[i, len(s) - n - 1 : len(s) - 1] = ti.long()
        top_lp[i, len(s) - n - 1 : len(s) - 1] = tl.float()
    return ids, mask, lab, top_ids, top_lp


def _answer_logits(model, ids, mask, lab):
    """Logits only where an answer token is predicted (the LM head is most of the cost);
    a reduced head gives its ``N`` logits."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = lab[:, 1:] != -100  # position p predicts the label at p + 1
    head = model.lm_head
    rows = hidden[:, :-1][valid]
    return (head.small(rows) if isinstance(head, ReducedHead) else head(rows)), valid


def draft_loss(logits, labels, top_ids, top_lp, kl_weight: float = 1.0,
               t2d: torch.Tensor | None = None):
    """CE on the target's greedy token + KL(target top-k || draft), one row per answer token.

    With a reduced head (``t2d`` maps vocabulary ids to head indices, -1 outside), CE counts
    the rows whose token the head holds, KL the target's top-k renormalised over the tokens it
    holds; agreement counts every row (a token outside the head is a miss, as when decoding).
    """
    if t2d is not None:
        labels, top_ids = t2d[labels], t2d[top_ids]
        inside = top_ids >= 0
        top_lp = top_lp.masked_fill(~inside, -1e4)
        top_ids = top_ids.clamp(min=0)
        has_top = inside.any(-1)
    else:
        has_top = torch.ones(len(labels), dtype=torch.bool)
    logp = torch.log_softmax(logits.float(), -1)
    ok = labels >= 0
    ce = F.nll_loss(logp[ok], labels[ok]) if ok.any() else logp.sum() * 0
    t_p = torch.softmax(top_lp, -1)  # renormalised top-k of the target
    kl_rows = (t_p * (torch.log(t_p + 1e-9) - logp.gather(-1, top_ids))).sum(-1)
    kl = kl_rows[has_top].mean() if has_top.any() else logp.sum() * 0
    agree = (logp.argmax(-1) == labels).float().mean()
    return ce + kl_weight * kl, ce.detach(), agree.detach()


def frequent_tokens(rows: list[dict], n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent tokens of the target's answers in ``rows`` (most frequent
    first; ties by token id)."""
    counts = torch.bincount(torch.tensor([t for r in rows for t in r["answer_ids"]]),
                            minlength=vocab_size).double()
    order = torch.argsort(-counts + torch.arange(vocab_size) / (2.0 * vocab_size))
    return order[:n]


def coverage(rows: list[dict], token_ids: torch.Tensor) -> float:
    """Share of the answer tokens of ``rows`` that a head over ``token_ids`` could propose."""
    keep = set(token_ids.tolist())
    total = sum(len(r["answer_ids"]) for r in rows)
    return sum(t in keep for r in rows for t in r["answer_ids"]) / max(total, 1)


def split_rows(rows: list[dict], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out answers (whole prompts) and training answers, seeded."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_held = max(8, int(len(rows) * heldout))
    return [rows[i] for i in order[n_held:]], [rows[i] for i in order[:n_held]]


def checkpoint_path() -> Path:
    return cache_dir() / "distill-v2-ckpt.pt"


def train(steps: int = 3000, batch_size: int = 8, lr: float = 5e-4, seed: int = 0,
          spec: DraftSpec | None = None, out: Path = DRAFT_DIR, heldout: float = 0.03,
          ckpt_every_s: float = 300.0, threads: int | None = None, eval_every: int = 100,
          data: Path | None = None, ckpt: Path | None = None) -> dict:
    """Distil the draft on the generated data; resumable from :func:`checkpoint_path`."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    spec = spec or DraftSpec()
    torch.manual_seed(seed)
    rows = load_data(data)
    if not rows:
        raise RuntimeError("No distillation data: run `python -m speckv draft data` first.")
    train_rows, held = split_rows(rows, heldout, seed)
    ckpt = ckpt or checkpoint_path()
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state is not None and state.get("spec") != asdict(spec):
        raise RuntimeError(f"{ckpt} trains another draft ({state.get('spec')}); move it away to "
                           f"start {asdict(spec)}, or pass the same layers and vocabulary.")
    token_ids = None
    if spec.draft_vocab:
        token_ids = (state["model"]["lm_head.token_ids"] if state is not None else
                     frequent_tokens(train_rows, spec.draft_vocab,
                                     _vocab_size(spec)))
    model = build_draft(spec, token_ids=token_ids)
    t2d = model.lm_head.to_reduced() if spec.draft_vocab else None
    reduced = t2d is not None
    for name, p in model.named_parameters():
        p.requires_grad_(not _shared_keys(name, reduced))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def warmup_cosine(s: int) -> float:
        return min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    step, history, started = 0, [], time.time()
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history = state["step"], state["history"]
        log.info("resumed draft training at step %d", step)
    card = {"batch_size": batch_size, "lr": lr, "seed": seed, "steps_planned": steps,
            "train_sequences": len(train_rows),
            "train_tokens": sum(len(r["answer_ids"]) for r in train_rows),
            "heldout_sequences": len(held)}
    if token_ids is not None:
        card["coverage_train"] = coverage(train_rows, token_ids)
        card["coverage_heldout"] = coverage(held, token_ids)
        log.info("draft vocabulary %d covers %.3f of training and %.3f of held-out answer tokens",
                 spec.draft_vocab, card["coverage_train"], card["coverage_heldout"])
    pad = 2
    g = torch.Generator().manual_seed(seed + step)
    last_save = time.time()
    model.train()
    bar = tqdm(total=steps, initial=step, desc="distil draft")
    while step < steps:
        idx = torch.randint(len(train_rows), (batch_size,), generator=g).tolist()
        ids, mask, lab, tids, tlp = _batch([train_rows[i] for i in idx], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, valid = _answer_logits(model, ids, mask, lab)
        loss, ce, agree = draft_loss(logits, lab[:, 1:][valid], tids[:, :-1][valid],
                                     tlp[:, :-1][valid], t2d=t2d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(ce=f"{ce:.3f}", agree=f"{agree:.3f}")
        if step % eval_every == 0 or step == steps:
            held_agree = evaluate_agreement(model, held, pad)
            history.append({"step": step, "train_ce": float(ce), "train_agree": float(agree),
                            "heldout_agree": held_agree, "elapsed_s": time.time() - started})
            log.info("step %d ce %.3f train agree %.3f held-out agree %.3f",
                     step, ce, agree, held_agree)
            model.train()
        if time.time() - last_save > ckpt_every_s or step == steps:
            state = {"model": {k: v for k, v in model.state_dict().items()
                               if not _shared_keys(k, reduced)},
                     "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "step": step, "history": history, "spec": asdict(spec)}
            atomic_write(ckpt, lambda tmp, state=state: torch.save(state, tmp))
            last_save = time.time()
            save_draft(model, spec, out, {**card, "steps": step, "history": history})
    bar.close()
    return history[-1] if history else {}


def _vocab_size(spec: DraftSpec) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(_base_dir(spec.base)).vocab_size)


@torch.no_grad()
def evaluate_agreement(model, rows: list[dict], pad: int = 2, batch_size: int = 8) -> float:
    """Top-1 agreement of the draft with the target's greedy token on answer positions."""
    model.eval()
    head = model.lm_head
    hit = total = 0
    for i in range(0, len(rows), batch_size):
        ids, mask, lab, _, _ = _batch(rows[i : i + batch_size], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, valid = _answer_logits(model, ids, mask, lab)
        best = logits.argmax(-1)
        if isinstance(head, ReducedHead):
            best = head.token_ids[best]
        hit += int((best == lab[:, 1:][valid]).sum())
        total += int(valid.sum())
    return hit / max(total, 1)
