"""Training the feature-conditioned draft (:mod:`speckv.llm.feature_draft`) on the target's
own answers and hidden states.

The data are ``speckv draft data``'s chunks: the target's greedy answers with its last hidden
state at every answer position. The draft also attends to the prompt, so the target's states
at the prompt positions are computed once per chunk (one teacher-forced target forward) and
kept beside it (``states/chunk-NNNN.pt``).

Loss, per unrolled depth ``d = 1..depth`` (weights ``0.8**(d-1)``), on positions whose next
token is an answer token: cross-entropy of the reduced head, against the target's token (a
token outside the head only counts as a miss) and, with weight ``soft_weight``, against the
target's own distribution over the head's tokens (EAGLE's classification loss: the head is
the target's, so that distribution is the head applied to the target's stored state), plus
``reg_weight`` x smooth-L1 between the draft's output and the target's state at that
position (EAGLE's feature regression: the draft's output is the next step's input, so it
must stay what the target would have computed).
Depth ``d >= 2`` reads the draft's own output of depth ``d - 1`` (training-time test), the
true token, and attends to the teacher-forced prefix and its own chain.

Resumable: a checkpoint every few minutes; chunks that appear while it runs join the
training set (the held-out prompts are fixed by a hash of their ids).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from speckv.atomic import atomic_write, remove_stale_temps
from speckv.distill.data import data_dir
from speckv.distill.train import (
    DistillError,
    check_resume,
    coverage,
    frequent_tokens,
    join_new_chunks,
    optimizer_step,
    split_rows,
)
from speckv.errors import SpeckvError
from speckv.llm.feature_draft import (
    FeatureDraft,
    FeatureDraftConfig,
    build_feature_draft,
    own_tensors,
    save_feature_draft,
)
from speckv.paths import cache_dir

log = logging.getLogger(__name__)

#: prompt tokens a training sequence keeps (the end of the prompt; answers stay whole)
PROMPT_CONTEXT = 256


def _target_weights(base: str) -> tuple[dict[str, torch.Tensor], object]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from speckv.llm.draft import _base_dir

    where = _base_dir(base)
    return load_file(str(where / "model.safetensors")), AutoConfig.from_pretrained(where)


@torch.no_grad()
def _prompt_states(target, rows: list[dict], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The target's last hidden state at prompt positions ``0..P-2`` of each row (the
    answer positions' are in the data already), right-padded batches of similar length."""
    out = {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    for b in range(0, len(order), batch_size):
        group = [rows[i] for i in order[b : b + batch_size]]
        seqs = [r["prompt_ids"][:-1] for r in group]
        width = max(1, max(map(len, seqs)))
        ids = torch.full((len(seqs), width), 2)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, r in enumerate(group):
            out[r["prompt_id"]] = hidden[i, : len(seqs[i])].to(torch.bfloat16).clone()
    return out


def load_rows(path: Path | Sequence[Path] | None = None,
              skip: frozenset[str] | set[str] = frozenset(), target=None
              ) -> tuple[list[dict], set[str]]:
    """Rows of every chunk of the data folder(s) ``path`` (but the files in ``skip``) with
    ``prompt_states`` attached, computing and saving a chunk's prompt states on first use
    (``target``: the loaded target model); and the files read."""
    folders = [data_dir()] if path is None else (
        [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path])
    rows, read = [], set()
    files = [f for folder in folders for f in sorted(folder.glob("chunk-*.pt"))]
    for f in files:
        if str(f) in skip:
            continue
        chunk = torch.load(f, weights_only=False)
        side = f.parent / "states" / f.name
        if side.exists():
            states = torch.load(side, weights_only=False)
        else:
            if target is None:
                from speckv.llm.load import load_model
                from speckv.llm.weights import DEMO_TARGET

                target = load_model(DEMO_TARGET, "fp16", dtype="bfloat16").model
            started = time.time()
            states = _prompt_states(target, chunk)
            side.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(side, lambda tmp, s=states: torch.save(s, tmp))
            log.info("prompt states of %s in %.0f s", f.name, time.time() - started)
        for r in chunk:
            r["prompt_states"] = states[r["prompt_id"]]
        rows.extend(chunk)
        read.add(str(f))
    return rows, read


def make_batch(rows: list[dict], depth: int, hidden: int, pad: int = 2,
               prompt_context: int = PROMPT_CONTEXT, prompt_labels: bool = False
               ) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a training batch (see the module's docstring).

    ``tokens[b, i]`` is the token at relative position ``i``, ``states[b, i]`` the target's
    state at position ``i - 1``; ``labels[b, d - 1, i]`` the token depth ``d`` from origin
    ``i`` must predict (``-100`` where none or not an answer token); ``targets[b, i + d - 1]``
    the target's state that depth's output should equal.

    ``prompt_labels``: also label origins whose depth-``d`` token lies in the prompt (the
    prompt's own token; ``answer[b, d - 1, i]`` is False there). The target did not write
    the prompt, so only its distribution there (from its state) teaches the draft: such
    positions count for the soft cross-entropy and the state regression, never for the
    cross-entropy against the token or for agreement."""
    seqs, full_states, starts = [], [], []
    for r in rows:
        prompt, answer = r["prompt_ids"], r["answer_ids"]
        ids = prompt + answer
        states = torch.cat((torch.zeros(1, hidden, dtype=torch.bfloat16), r["prompt_states"],
                            r["hidden"][: len(answer)]))  # row t + 1 = state at position t
        s = max(0, len(prompt) - prompt_context)
        seqs.append((ids[s:], len(prompt) - s))
        full_states.append(states[s:])
        starts.append(s)
    width = max(len(ids) for ids, _ in seqs)
    n = len(rows)
    tokens = torch.full((n, width + depth), pad, dtype=torch.long)
    states = torch.zeros((n, width, hidden), dtype=torch.bfloat16)
    targets = torch.zeros((n, width + depth, hidden), dtype=torch.bfloat16)
    labels = torch.full((n, depth, width), -100, dtype=torch.long)
    answer = torch.zeros((n, depth, width), dtype=torch.bool)
    for b, ((ids, n_prompt), st) in enumerate(zip(seqs, full_states, strict=True)):
        length = len(ids)
        tokens[b, :length] = torch.tensor(ids)
        states[b, :length] = st[:length]
        targets[b, : length - 1] = st[1:length]  # the state at position i (for origin i)
        lab = torch.tensor(ids)
        for d in range(1, depth + 1):
            # origin i predicts ids[i + d]; answer tokens count (prompt ones if asked)
            lo = max(0, n_prompt - d)
            hi = length - d
            if hi > lo:
                labels[b, d - 1, lo:hi] = lab[lo + d : hi + d]
                answer[b, d - 1, lo:hi] = True
            if prompt_labels and min(lo, hi) > 0:
                labels[b, d - 1, :min(lo, hi)] = lab[d : min(lo, hi) + d]
    return {"tokens": tokens, "states": states, "targets": targets, "labels": labels,
            "answer": answer}


def feature_loss(model: FeatureDraft, batch: dict[str, torch.Tensor], t2d: torch.Tensor,
                 depth: int, reg_weight: float, decay: float = 0.8, soft_weight: float = 0.0):
    """Loss and per-depth agreement (draft argmax == target token) of one batch.

    The cross-entropy term is ``(1 - soft_weight)`` x against the target's token plus
    ``soft_weight`` x against the target's distribution over the head's tokens."""
    tokens, states = batch["tokens"], batch["states"]
    width = states.shape[1]
    positions = torch.arange(width)[None].expand(len(tokens), -1)
    dtype = next(model.fc.parameters()).dtype
    outs = model.unroll(tokens[:, :width], states.to(dtype), positions, depth,
                        next_tokens=tokens)
    total = torch.zeros((), dtype=torch.float32)
    agree = []
    for d, g in enumerate(outs, start=1):
        lab = batch["labels"][:, d - 1]
        valid = lab != -100
        if not valid.any():
            agree.append(float("nan"))
            continue
        rows = g[valid]
        logits = model.logits_small(rows).float()
        small = t2d[lab[valid]]
        answer = batch["answer"][:, d - 1][valid]  # the rest are prompt positions
        held = (small >= 0) & answer
        ce = F.cross_entropy(logits[held], small[held]) if held.any() else logits.sum() * 0
        target = batch["targets"][:, d - 1 : d - 1 + width][valid].to(rows.dtype)
        if soft_weight:
            with torch.no_grad():
                teacher = model.logits_small(target).float().softmax(-1)
            soft = -(teacher * logits.log_softmax(-1)).sum(-1)
            # answer positions mix the two; prompt positions take the soft term alone
            ce = ((1 - soft_weight) * ce * answer.float().mean()
                  + torch.where(answer, soft_weight * soft, soft).mean())
        reg = F.smooth_l1_loss(rows.float(), target.float())
        total = total + decay ** (d - 1) * (ce + reg_weight * reg)
        best = model.lm_head.token_ids[logits.argmax(-1)]
        agree.append(float((best == lab[valid])[answer].float().mean()) if answer.any()
                     else float("nan"))
    return total, agree


@torch.no_grad()
def evaluate(model: FeatureDraft, rows: list[dict], t2d: torch.Tensor, depth: int,
             batch_size: int = 8) -> list[float]:
    """Held-out agreement per depth (depth ``d``: given ``d - 1`` right drafted tokens)."""
    model.eval()
    hits = [0.0] * depth
    counts = [0] * depth
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = make_batch(part, depth, model.cfg.hidden_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, agree = feature_loss(model, batch, t2d, depth, 0.0)
        for d in range(depth):
            n = int((batch["labels"][:, d] != -100).sum())
            if n and not math.isnan(agree[d]):
                hits[d] += agree[d] * n
                counts[d] += n
    model.train()
    return [h / max(c, 1) for h, c in zip(hits, counts, strict=True)]


def _initial_weights(init: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The draft's own tensors from a saved draft folder or a training checkpoint, and the
    seed it was trained with (None where not recorded)."""
    init = Path(init)
    if init.is_dir():
        if not (init / "draft.safetensors").exists():
            raise SpeckvError(f"--init {init}: no draft.safetensors there; name a folder "
                              "`speckv draft distill --arch feature` saved, or its "
                              "checkpoint file.")
        card = init / "speckv_draft.json"
        seed = json.loads(card.read_text()).get("seed") if card.exists() else None
        return own_tensors(init), seed
    if not init.is_file():
        raise SpeckvError(f"--init {init}: no such draft folder or checkpoint.")
    state = torch.load(init, weights_only=False)
    return state["model"], state.get("seed")


def checkpoint_path() -> Path:
    return cache_dir() / "feature-draft-ckpt.pt"


def train_feature_draft(out: Path, *, steps: int = 4000, batch_size: int = 8,
                        lr: float = 5e-4, depth: int = 3, reg_weight: float = 1.0,
                        soft_weight: float = 0.0, init: Path | None = None,
                        feature_noise: float = 0.0, weight_decay: float = 0.0,
                        prompt_labels: bool = False,
                        draft_vocab: int = 8192, heldout: float = 0.03, seed: int = 0,
                        base: str | None = None, data: Path | Sequence[Path] | None = None,
                        ckpt: Path | None = None, ckpt_every_s: float = 300.0,
                        eval_every: int = 200, reload_every: int = 200,
                        threads: int | None = None, max_minutes: float | None = None) -> dict:
    """Train (or resume) the feature-conditioned draft and save it to ``out``.

    ``feature_noise``: uniform noise in ``[-a, a]`` added to the target states the draft reads
    (not to those it is trained to reproduce), EAGLE's augmentation against overfitting and
    against drift when it reads its own states; ``weight_decay``: AdamW's; ``prompt_labels``:
    also learn the target's distribution at prompt positions (:func:`make_batch`; needs
    ``soft_weight`` > 0 to teach anything there but the state).

    ``init``: start from a saved draft's weights (a folder ``save_feature_draft`` wrote, or a
    training checkpoint) with a fresh optimizer and schedule, e.g. to go on training the
    shipped draft with more data or another loss; its head's tokens are kept. Ignored when
    ``ckpt`` exists (that run resumes)."""
    from tqdm import tqdm

    from speckv.llm.weights import DEMO_TARGET

    if threads:
        torch.set_num_threads(threads)
    base = base or DEMO_TARGET
    torch.manual_seed(seed)
    rows, seen = load_rows(data)
    if not rows:
        raise DistillError("No distillation data: run `python -m speckv draft data` first.")
    train_rows, held = split_rows(rows, heldout, seed)
    weights, config = _target_weights(base)
    ckpt = ckpt or checkpoint_path()
    remove_stale_temps(ckpt.parent, ckpt.name)  # what killed runs left
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    # what a resumed run must share with the one it goes on from (--steps may grow)
    settings = {"batch_size": batch_size, "lr": lr, "depth": depth, "reg_weight": reg_weight,
                "soft_weight": soft_weight, "feature_noise": feature_noise,
                "weight_decay": weight_decay, "prompt_labels": prompt_labels,
                "draft_vocab": draft_vocab, "seed": seed, "base": base}
    if state is not None:
        check_resume(ckpt, state.get("settings"), settings)
    start = None
    if state is None and init is not None:
        start, init_seed = _initial_weights(init)
        if init_seed is not None and init_seed != seed:
            # the held-out prompts are drawn by seed: another seed's would include prompts the
            # starting draft trained on, and its held-out agreement would flatter it
            raise SpeckvError(f"--init {init} was trained with --seed {init_seed}; go on with "
                              f"--seed {init_seed} so that its held-out prompts stay held out.")
    own = state["model"] if state is not None else start
    token_ids = (own["lm_head.token_ids"] if own is not None
                 else frequent_tokens(train_rows, draft_vocab, int(config.vocab_size)))
    cfg = FeatureDraftConfig.from_target(base, config, draft_vocab)
    model = build_feature_draft(cfg, weights, token_ids)
    t2d = model.lm_head.to_reduced()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def warmup_cosine(s: int) -> float:
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    step, history, spent = 0, [], 0.0
    if start is not None:
        model.load_state_dict(start, strict=False)
        log.info("starting from the weights of %s", init)
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history, spent = state["step"], state["history"], state.get("seconds", 0.0)
        log.info("resumed feature-draft training at step %d", step)
    card = {"trainer": "speckv.distill.feature", "batch_size": batch_size, "lr": lr,
            "depth": depth, "reg_weight": reg_weight, "soft_weight": soft_weight,
            "feature_noise": feature_noise, "weight_decay": weight_decay,
            "prompt_labels": prompt_labels,
            "init": str(init) if init is not None else None, "seed": seed,
            "steps_planned": steps,
            "coverage_heldout": coverage(held, token_ids)}

    def describe_data() -> None:
        card.update(train_sequences=len(train_rows), heldout_sequences=len(held),
                    train_tokens=sum(len(r["answer_ids"]) for r in train_rows))

    describe_data()
    log.info("draft vocabulary %d covers %.3f of held-out answer tokens; %d training answers "
             "(%d tokens), %d held out", draft_vocab, card["coverage_heldout"],
             len(train_rows), card["train_tokens"], len(held))
    g = torch.Generator().manual_seed(seed + step)
    noise_gen = torch.Generator().manual_seed(seed + step + 1)  # the batches stay as without
    if state is not None and "rng" in state:  # the batches an uninterrupted run would draw
        g.set_state(state["rng"]["batches"])
        noise_gen.set_state(state["rng"]["noise"])
    elif state is not None:
        log.warning("%s holds no random state (an older speckv wrote it): from step %d the "
                    "batches differ from an uninterrupted run's", ckpt, step)
    started, last_save = time.time(), time.time()
    model.train()
    bar = tqdm(total=steps, initial=step, desc="feature draft")

    def save() -> None:
        seconds = spent + time.time() - started
        st = {"model": {k: v for k, v in model.state_dict().items()
                        if not k.startswith("embed_tokens.") and k != "lm_head.weight"},
              "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
              "history": history, "seconds": seconds, "seed": seed, "settings": settings,
              "rng": {"batches": g.get_state(), "noise": noise_gen.get_state()}}
        atomic_write(ckpt, lambda tmp: torch.save(st, tmp))
        save_feature_draft(model, out, {**card, "steps": step, "cpu_seconds": seconds,
                                        "threads": torch.get_num_threads(),
                                        "history": history})

    while step < steps:
        idx = torch.randint(len(train_rows), (batch_size,), generator=g).tolist()
        batch = make_batch([train_rows[i] for i in idx], depth, cfg.hidden_size,
                           prompt_labels=prompt_labels)
        if feature_noise:  # EAGLE's augmentation: the draft must not rely on exact states
            noise = torch.rand(batch["states"].shape, generator=noise_gen) * 2 - 1
            batch["states"] = batch["states"] + (feature_noise * noise).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, agree = feature_loss(model, batch, t2d, depth, reg_weight,
                                       soft_weight=soft_weight)
        optimizer_step(loss, opt, sched, params)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree[0]:.3f}")
        if reload_every and step % reload_every == 0:
            joined = join_new_chunks(load_rows, data, seen, heldout, seed, train_rows, held)
            if joined:
                describe_data()
                log.info("step %d: %d new answers joined (%d training, %d held out)", step,
                         joined, len(train_rows), len(held))
        out_of_time = max_minutes is not None and (time.time() - started) / 60 > max_minutes
        if step % eval_every == 0 or step == steps or out_of_time:
            held_agree = evaluate(model, held, t2d, depth)
            history.append({"step": step, "loss": loss.item(), "train_agree": agree,
                            "heldout_agree": held_agree,
                            "seconds": spent + time.time() - started})
            log.info("step %d loss %.3f train agree %s held-out agree %s", step, loss.item(),
                     [round(a, 3) for a in agree], [round(a, 3) for a in held_agree])
        if time.time() - last_save > ckpt_every_s or step == steps or out_of_time:
            save()
            last_save = time.time()
        if out_of_time:
            log.info("stopping after %.0f minutes (--max-minutes)", max_minutes)
            break
    bar.close()
    return history[-1] if history else {}
