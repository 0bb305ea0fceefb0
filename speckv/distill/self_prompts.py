"""Prompts written by the target itself, for distillation data without a dataset.

An instruction-tuned model continues its own chat template: given the template up to the
start of a user turn (and optionally the first words of that turn), it samples a user
message like those it was tuned on, then closes the turn. Those messages are in-domain by
construction: they are what the target was taught to answer, and what the draft must learn
to predict is the target's answer to them. The technique is Magpie's (Xu et al., 2024); here
it feeds ``speckv draft data --prompts``, which answers the prompts and stores the target's
states, and ``speckv draft distill --data``.

Per task, the user turn starts with a few words that steer it (none for chat; "Write a Python
function" for code; the summarization suite's instruction for summarization, after which the
target writes the passage itself). A sampled turn is kept when the target closed it within
the token budget, it is mostly ASCII text of a sensible length, and no earlier prompt has its
template key (numbers and names masked). Prompts that repeat a profiling-suite prompt are
left out later, by ``speckv draft data``, which names them in its manifest.

Resumable: the file is rewritten atomically after every batch, and batch ``b`` of a task is
sampled with a seed made of (seed, task, b), so a resumed run writes what an uninterrupted
one would have.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import torch

from speckv.llm.weights import DEMO_TARGET
from speckv.prompts import (
    TASKS,
    Prompt,
    PromptError,
    load_jsonl,
    template_key,
    write_jsonl,
)

log = logging.getLogger(__name__)

#: the first words of the user turn per task; the target writes the rest.
LEADS: dict[str, tuple[str, ...]] = {
    "chat": ("",),
    "code": ("Write a Python function", "Write a Python program that", "In Python, how do I"),
    "math": ("Solve this word problem step by step:", "A math question:"),
    "summarization": ("Summarize the following text in two or three sentences.\n\n",),
}
#: tokens the target may spend on one user turn, per task (summarization writes a passage).
TURN_TOKENS = {"chat": 96, "code": 128, "math": 96, "summarization": 256}
MIN_CHARS, MAX_CHARS = 24, 2000
#: a summarization prompt's passage (after the instruction) is at least this long.
MIN_PASSAGE = 200


def turn_prefix(tokenizer) -> str:
    """The chat template rendered up to where the user's words begin."""
    marker = "\x00speckv\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


def keep(task: str, lead: str, text: str) -> bool:
    """Whether a sampled user turn is a prompt worth answering."""
    if not MIN_CHARS <= len(text) <= MAX_CHARS or "<|" in text:
        return False
    if sum(c.isascii() for c in text) < 0.97 * len(text):
        return False
    if task == "summarization" and len(text) - len(lead.strip()) < MIN_PASSAGE:
        return False
    return len(text.split()) >= 4


def _batch_seed(seed: int, task: str, batch: int) -> int:
    return zlib.crc32(f"{seed}/{task}/{batch}".encode())


@torch.no_grad()
def _sample_turns(model, tok, prefix: str, lead: str, n: int, max_new_tokens: int,
                  end_id: int, temperature: float) -> list[str]:
    """``n`` user turns that begin with ``lead``; a turn the target did not close is ''."""
    ids = tok(prefix + lead, return_tensors="pt", add_special_tokens=False).input_ids
    ids = ids.repeat(n, 1).to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=temperature, top_p=1.0, top_k=0,
                         max_new_tokens=max_new_tokens, eos_token_id=end_id,
                         pad_token_id=end_id)
    turns = []
    for row in out[:, ids.shape[1]:].tolist():
        if end_id not in row:
            turns.append("")
            continue
        words = tok.decode(row[: row.index(end_id)])
        turns.append((lead + (words.lstrip() if lead[-1:].isspace() else words)).strip())
    return turns


def _batch_row(p: Prompt) -> tuple[int, int] | None:
    """(batch, row) of a prompt this module wrote (id ``self-<task>-<batch>-<row>``), else
    None (a line of the user's own in the same file)."""
    if not p.prompt_id.startswith(f"self-{p.task}-"):
        return None
    batch, row = p.prompt_id.split("-")[-2:]
    return int(batch), int(row)


def _next_batch(prompts: list[Prompt], task: str) -> int:
    """The batch to sample next for ``task``: one after the last on file."""
    done = [at[0] for p in prompts if p.task == task and (at := _batch_row(p)) is not None]
    return max(done) + 1 if done else 0


def _order(p: Prompt) -> tuple:
    at = _batch_row(p)  # a line of the user's own stays where it is, first
    return (-1, 0, 0) if at is None else (TASKS.index(p.task), *at)


def read_prompts(path: Path) -> list[Prompt]:
    return load_jsonl(path) if path.exists() else []


def write_self_prompts(out: Path, per_task: int, tasks: tuple[str, ...] = TASKS,
                       batch_size: int = 16, seed: int = 0, temperature: float = 1.0,
                       threads: int | None = None, target: str = DEMO_TARGET) -> list[Prompt]:
    """Sample at least ``per_task`` prompts per task from the target into the JSONL file
    ``out`` (``{"task", "id", "prompt"}`` per line; appended to and resumed if it exists).
    Every usable turn of a sampled batch is kept, so a task may end a few prompts over
    ``per_task``; that is what lets a stopped run resume exactly."""
    from tqdm import tqdm

    from speckv.llm.load import load_model

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise PromptError(f"Unknown task {bad[0]!r}: use tasks among {', '.join(TASKS)}.")
    if threads:
        torch.set_num_threads(threads)
    prompts = read_prompts(out)
    loaded = load_model(target, "fp16", dtype="bfloat16")
    tok, model = loaded.tokenizer, loaded.model
    if not getattr(tok, "chat_template", None):
        raise PromptError(f"{target} has no chat template: it cannot write its own user "
                          "turns. Pass your own prompts to `speckv draft data --prompts`.")
    prefix = turn_prefix(tok)
    end_id = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() \
        else tok.eos_token_id
    seen = {template_key(p.text) for p in prompts}
    started, sampled = time.time(), 0
    for task in tasks:
        have = sum(p.task == task for p in prompts)
        bar = tqdm(total=per_task, initial=min(have, per_task), desc=f"{task} prompts")
        batch = _next_batch(prompts, task)
        while have < per_task:
            leads = LEADS[task]
            lead = leads[batch % len(leads)]
            torch.manual_seed(_batch_seed(seed, task, batch))
            turns = _sample_turns(model, tok, prefix, lead, batch_size, TURN_TOKENS[task],
                                  end_id, temperature)
            sampled += len(turns)
            for j, text in enumerate(turns):
                key = template_key(text)
                if keep(task, lead, text) and key not in seen:  # whole batches: resumable
                    seen.add(key)
                    prompts.append(Prompt(task, f"self-{task}-{batch}-{j}", text))
                    have += 1
            bar.update(min(have, per_task) - bar.n)
            prompts.sort(key=_order)  # a resumed file reads as one written in one go
            write_jsonl(out, prompts)
            batch += 1
            if batch > 50 + 4 * per_task // batch_size and have < per_task:
                raise PromptError(f"The target wrote too few usable {task} prompts "
                                  f"({have} of {per_task}); ask for fewer with --per-task.")
        bar.close()
        log.info("%s: %d prompts (%d turns sampled in %.0f s so far)", task, have, sampled,
                 time.time() - started)
    return prompts
