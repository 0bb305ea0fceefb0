"""The distillation data: the target's own greedy answers to the draft's prompt pool
(:func:`speckv.prompts.distill_pool`, disjoint from the profiling suites), generated in
batches once, with the target's top-k log-probabilities and its last hidden state at every
answer position stored beside the tokens. Resumable: one file per chunk of prompts, written
atomically, skipped when present; a chunk's batches are fixed by its prompts and the batch
size, so a resumed run writes what an uninterrupted one would. A manifest records the pool
(every chunk's prompt ids and a digest of their texts) and the settings (target, answer
budget, batch size), and a run whose pool or settings differ is refused
(:class:`DataError`, naming the difference) instead of mixing two data sets. Temporary files
of killed runs are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from speckv.atomic import atomic_write, remove_stale_temps
from speckv.errors import SpeckvError
from speckv.llm.weights import DEMO_TARGET
from speckv.paths import cache_dir
from speckv.prompts import Prompt, PromptError, chat_ids, distill_pool

log = logging.getLogger(__name__)

#: the target's top-k log-probabilities kept per answer position.
TOPK = 8
#: the pool the draft is distilled on (prompts per task) and the answer budget per prompt.
POOL_PER_TASK = 1100
ANSWER_TOKENS = 128
#: prompts per chunk file (the unit a killed run loses), and the target's compute dtype.
CHUNK = 64
DTYPE = "bfloat16"


class DataError(SpeckvError):
    """A distillation data folder that cannot be resumed as asked; the message says why."""


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


#: settings a manifest records beside the pool, and the flag that sets each.
_MANIFEST_FLAGS = {"per_task": "--per-task", "seed": "--seed", "max_new_tokens":
                   "--max-new-tokens", "target": "--target", "batch_size": "--batch-size",
                   "dtype": "the compute dtype", "source": "--prompts",
                   "left_out": "the prompts left out"}


def _check_manifest(path: Path, manifest: dict) -> None:
    """Chunks on disk must come from the same pool and settings, or a resume would mix two.

    A manifest written before a setting was recorded is compared on what it has (and the
    settings it cannot vouch for are logged)."""
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
        return
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}), so the answers in "
            f"{path.parent} cannot be checked against this run's pool and settings. Move that "
            "folder away (or pass another --out) and run `speckv draft data` again.") from None
    unknown = sorted(k for k in manifest if k not in old)
    if unknown:
        log.warning("%s was written by an older speckv that did not record %s; resuming "
                    "without checking them", path, ", ".join(unknown))
    differ = [k for k in manifest if k in old and old[k] != manifest[k]]
    differ += [k for k in old if k not in manifest]
    if not differ:
        return
    shown = []
    for key in differ:
        if key == "chunks":
            shown.append(f"the pool ({sum(map(len, old.get('chunks', [])))} prompts in "
                         f"{len(old.get('chunks', []))} chunks there, "
                         f"{sum(map(len, manifest['chunks']))} in {len(manifest['chunks'])} "
                         "here: --per-task, --seed, --prompts or --chunk)")
        elif key == "prompts_sha256":
            shown.append("the prompts' texts")
        else:
            shown.append(f"{_MANIFEST_FLAGS.get(key, key)}: {old.get(key)!r} there, "
                         f"{manifest.get(key)!r} here")
    raise DataError(
        f"{path.parent} holds answers made with another pool or settings ({'; '.join(shown)}). "
        "Resuming would mix two data sets: pass the settings it was made with (its "
        f"manifest.json), or move that folder away (or pass another --out) to start afresh.")


def without_suite_prompts(prompts: list[Prompt]) -> tuple[list[Prompt], list[str]]:
    """``prompts`` minus those that are, or nearly are, profiling-suite prompts (a draft
    trained on them would flatter every held-out figure), and the ids dropped."""
    from speckv.prompts import SUITE_MAX, overlap, suites

    clash = {pid for pid, _ in overlap(prompts, suites(n=SUITE_MAX))}
    return [p for p in prompts if p.prompt_id not in clash], sorted(clash)


def _pool_digest(chunks: list[list[Prompt]]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        for p in chunk:
            h.update(f"{p.task}\0{p.prompt_id}\0{p.text}\0".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def generate_data(per_task: int = POOL_PER_TASK, batch_size: int = 16,
                  max_new_tokens: int = ANSWER_TOKENS, chunk: int = CHUNK, seed: int = 0,
                  out: Path | None = None, threads: int | None = None,
                  prompts: list[Prompt] | None = None, target: str = DEMO_TARGET) -> Path:
    """Generate the target's greedy answers to the pool in resumable chunks (one file each,
    written atomically; a chunk already on disk is skipped).

    ``prompts``: answer these instead of the pool (a user's own in-domain prompts, e.g. from
    :func:`speckv.prompts.load_jsonl`), minus any that repeat a profiling-suite prompt; train
    on them beside the pool with ``speckv draft distill --data``."""
    from tqdm import tqdm

    from speckv.llm.load import load_model

    if threads:
        torch.set_num_threads(threads)
    out = out or data_dir()
    remove_stale_temps(out)
    dropped: list[str] = []
    if prompts is None:
        pool = distill_pool(per_task, seed=seed)
    else:
        pool, dropped = without_suite_prompts(list(prompts))
        if dropped:
            log.warning("%d of %d prompts repeat profiling-suite prompts and are left out: %s",
                        len(dropped), len(prompts), ", ".join(dropped[:10]))
        if not pool:
            raise PromptError("Every prompt given repeats a profiling-suite prompt; answers to "
                              "them would leak the held-out prompts into the draft.")
    chunks = [pool[i : i + chunk] for i in range(0, len(pool), chunk)]
    ids = [[p.prompt_id for p in c] for c in chunks]
    manifest = ({"per_task": per_task, "seed": seed} if prompts is None else
                {"source": "prompts", "left_out": dropped})
    manifest.update(max_new_tokens=max_new_tokens, chunks=ids,
                    prompts_sha256=_pool_digest(chunks), batch_size=batch_size,
                    target=str(Path(target).resolve()) if Path(target).exists() else target,
                    dtype=DTYPE)
    _check_manifest(out / "manifest.json", manifest)  # before minutes of loading
    loaded = load_model(target, "fp16", dtype=DTYPE)
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
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


def load_data(path: Path | None = None, skip: set[str] | frozenset[str] = frozenset()
              ) -> tuple[list[dict], set[str]]:
    """Rows of every chunk file under ``path`` but those named in ``skip``, and the names of
    the files read (so a training run can pick up chunks that appear while it runs)."""
    path = path or data_dir()
    rows, read = [], set()
    for f in sorted(Path(path).glob("chunk-*.pt")):
        if f.name not in skip:
            rows.extend(torch.load(f, weights_only=False))
            read.add(f.name)
    return rows, read


