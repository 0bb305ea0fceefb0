"""Distillation of the draft: cross-entropy on the target's greedy token plus KL to the
stored top-k distribution, on answer positions only; with a reduced head, over the tokens
it holds. Resumable: a checkpoint every few minutes, continued from when present.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from speckv.atomic import atomic_write, remove_stale_temps
from speckv.distill.data import TOPK, load_data
from speckv.errors import SpeckvError
from speckv.llm.draft import (
    DraftSpec,
    ReducedHead,
    _base_dir,
    _shared_keys,
    build_draft,
    save_draft,
)
from speckv.paths import DRAFT_DIR, cache_dir

log = logging.getLogger(__name__)


class DistillError(SpeckvError, RuntimeError):
    """Distillation cannot start or resume as asked; the message says what to do."""

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


def is_heldout(prompt_id: str, heldout: float, seed: int) -> bool:
    """Whether a prompt's answer is held out: decided by a hash of its id, so the split stays
    the same as more answers arrive."""
    digest = hashlib.sha1(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < heldout


def split_rows(rows: list[dict], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Training answers and held-out answers (whole prompts, :func:`is_heldout`)."""
    held = [r for r in rows if is_heldout(r["prompt_id"], heldout, seed)]
    return [r for r in rows if not is_heldout(r["prompt_id"], heldout, seed)], held


def join_new_chunks(load, data: Path | None, seen: set[str], heldout: float, seed: int,
                    train_rows: list[dict], held: list[dict]) -> int:
    """Add the answers of chunks that appeared since ``seen`` (``load(data, skip=seen)`` ->
    ``(rows, files)``) to the training and held-out lists in place; returns how many."""
    new, files = load(data, skip=seen)
    if new:
        seen |= files
        more, more_held = split_rows(new, heldout, seed)
        train_rows += more
        held += more_held
    return len(new)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params,
                   clip: float = 1.0) -> None:
    """One update: backward, gradient norm clipped to ``clip``, optimizer and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()


def checkpoint_path() -> Path:
    return cache_dir() / "distill-v2-ckpt.pt"


def train(steps: int = 3000, batch_size: int = 8, lr: float = 5e-4, seed: int = 0,
          spec: DraftSpec | None = None, out: Path = DRAFT_DIR, heldout: float = 0.03,
          ckpt_every_s: float = 300.0, threads: int | None = None, eval_every: int = 100,
          data: Path | None = None, ckpt: Path | None = None, reload_every: int = 200) -> dict:
    """Distil the draft on the generated data; resumable from :func:`checkpoint_path`.

    Chunks that ``speckv draft data`` writes while this runs join the training set every
    ``reload_every`` steps (the held-out prompts are fixed by :func:`is_heldout`); the reduced
    vocabulary is chosen once, from the answers there at the start.
    """
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    spec = spec or DraftSpec()
    torch.manual_seed(seed)
    rows, seen_files = load_data(data)
    if not rows:
        raise DistillError("No distillation data: run `python -m speckv draft data` first.")
    train_rows, held = split_rows(rows, heldout, seed)
    ckpt = ckpt or checkpoint_path()
    remove_stale_temps(ckpt.parent, ckpt.name)  # what killed runs left
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state is not None and state.get("spec") != asdict(spec):
        raise DistillError(f"{ckpt} trains another draft ({state.get('spec')}); move it away "
                           f"to start {asdict(spec)}, or pass the same layers and vocabulary.")
    settings = {"batch_size": batch_size, "lr": lr, "seed": seed}
    if state is not None:
        check_resume(ckpt, state.get("settings"), settings)
    token_ids = None
    if spec.draft_vocab:
        token_ids = (state["model"]["lm_head.token_ids"] if state is not None else
                     frequent_tokens(train_rows, spec.draft_vocab,
                                     _vocab_size(spec)))
    model = build_draft(spec, token_ids=token_ids)
    t2d = model.lm_head.to_reduced() if spec.draft_vocab else None
    stored_head = spec.stored_head
    for name, p in model.named_parameters():
        p.requires_grad_(not _shared_keys(name, stored_head))
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
    if state is not None and "rng" in state:  # the batches an uninterrupted run would draw
        g.set_state(state["rng"])
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
        optimizer_step(loss, opt, sched, params)
        step += 1
        bar.update(1)
        bar.set_postfix(ce=f"{ce:.3f}", agree=f"{agree:.3f}")
        if reload_every and step % reload_every == 0:
            joined = join_new_chunks(load_data, data, seen_files, heldout, seed, train_rows,
                                     held)
            if joined:
                card["train_sequences"] = len(train_rows)
                card["train_tokens"] = sum(len(r["answer_ids"]) for r in train_rows)
                card["heldout_sequences"] = len(held)
                log.info("step %d: %d new answers joined (%d training, %d held out)", step,
                         joined, len(train_rows), len(held))
        if step % eval_every == 0 or step == steps:
            held_agree = evaluate_agreement(model, held, pad)
            history.append({"step": step, "train_ce": float(ce), "train_agree": float(agree),
                            "heldout_agree": held_agree, "elapsed_s": time.time() - started})
            log.info("step %d ce %.3f train agree %.3f held-out agree %.3f",
                     step, ce, agree, held_agree)
            model.train()
        if time.time() - last_save > ckpt_every_s or step == steps:
            state = {"model": {k: v for k, v in model.state_dict().items()
                               if not _shared_keys(k, stored_head)},
                     "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "step": step, "history": history, "spec": asdict(spec),
                     "settings": settings, "rng": g.get_state()}
            atomic_write(ckpt, lambda tmp, state=state: torch.save(state, tmp))
            last_save = time.time()
            save_draft(model, spec, out, {**card, "steps": step, "history": history})
    bar.close()
    return history[-1] if history else {}


def check_resume(ckpt: Path, saved: dict | None, settings: dict) -> None:
    """Refuse to resume ``ckpt`` (trained with ``saved``) with other ``settings``: the two
    trainings would mix. A checkpoint from before settings were recorded is resumed as is."""
    if saved is None:
        log.warning("%s records no settings (an older speckv wrote it): resuming without "
                    "checking them", ckpt)
        return
    differ = [f"--{key.replace('_', '-')}: {saved.get(key)!r} there, {value!r} here"
              for key, value in settings.items() if saved.get(key) != value]
    if differ:
        raise DistillError(
            f"{ckpt} was trained with other settings ({'; '.join(differ)}). Resuming would mix "
            "two trainings: pass the settings it was made with, or move it away (or pass "
            "another --ckpt) to train anew.")


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
