"""The suites and the draft's training pool: deterministic, and apart even up to
near-duplicates (the same template with other numbers, the same task in other words)."""

from __future__ import annotations

from collections import Counter

import pytest

from speckv.prompts import (
    FIRST_SUITE,
    SUITE_MAX,
    TASKS,
    Prompt,
    distill_pool,
    overlap,
    suite,
    suites,
    template_key,
)
from speckv.prompts.sources import (
    CHAT_FORMS,
    CODE_FORMS,
    MATH_POOL_TEMPLATES,
    MATH_SUITE_TEMPLATES,
    family,
)


@pytest.fixture(scope="module")
def pool():
    return distill_pool(1100)


@pytest.fixture(scope="module")
def full_suites():
    return suites(n=SUITE_MAX)


def test_suites_are_large_and_unique(full_suites):
    counts = Counter(p.task for p in full_suites)
    assert counts == {t: SUITE_MAX for t in TASKS}
    assert len({p.prompt_id for p in full_suites}) == len(full_suites)
    assert len({p.text for p in full_suites}) == len(full_suites)


@pytest.mark.parametrize("task", TASKS)
def test_a_suite_is_a_prefix_whatever_its_size(task):
    """Records profiled on the first suites keep their prompts when the suites grow."""
    small, big = suite(task, FIRST_SUITE), suite(task, SUITE_MAX)
    assert big[:FIRST_SUITE] == small
    assert suite(task, 7) == small[:7]


def test_pool_is_large_balanced_and_deterministic(pool):
    counts = Counter(p.task for p in pool)
    assert sum(counts.values()) >= 4000
    assert min(counts.values()) >= 800
    assert len({p.prompt_id for p in pool}) == len(pool)
    assert distill_pool(1100) == pool
    assert distill_pool(1100, seed=1) != pool


def test_pool_texts_are_the_same_in_every_process(pool):
    """No per-process memory address (``<function copy2 at 0x7f...>`` in a signature's
    default) may reach a prompt: another process must build the very same texts."""
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib; from speckv.prompts import distill_pool; print(hashlib.sha256("
            "'\\n'.join(p.prompt_id + p.text for p in distill_pool(1100)).encode()).hexdigest())")
    here = hashlib.sha256("\n".join(p.prompt_id + p.text for p in pool).encode()).hexdigest()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=300).stdout.strip()
    assert other == here
    move = next(p for p in pool if p.prompt_id == "dapi-shutil.move")
    assert "copy_function=<function copy2>" in move.text


def test_pool_and_suites_share_no_prompt_and_no_near_duplicate(pool, full_suites):
    assert not {p.text for p in pool} & {p.text for p in full_suites}
    assert overlap(pool, full_suites) == []
    suite_templates = {template_key(p.text) for p in full_suites}
    assert not any(template_key(p.text) in suite_templates for p in pool)


def test_overlap_catches_a_template_with_other_numbers_and_names():
    a = MATH_SUITE_TEMPLATES[0].format(a="Ana", b="Ben", x=3, y=4, z=5, item="apples")
    b = MATH_SUITE_TEMPLATES[0].format(a="Omar", b="Rosa", x=31, y=2, z=7, item="coins")
    c = MATH_POOL_TEMPLATES[0].format(a="Ana", item="apples", x=3, y=4, p=2, t=5)
    held = [Prompt("math", "h", a)]
    assert overlap([Prompt("math", "p", b)], held) == [("p", "h")]
    assert overlap([Prompt("math", "q", c)], held) == []


def test_overlap_catches_a_passage_inside_another_frame():
    passage = ("The quick brown fox jumps over the lazy dog while the farmer watches from the "
               "porch and counts the sheep that graze on the hill behind the old red barn.")
    held = [Prompt("summarization", "h", f"Summarize the following text.\n\n{passage}")]
    pool = [Prompt("code", "p", f"Write a function for this: {passage}"),
            Prompt("chat", "q", "How do bees make honey in winter?")]
    assert overlap(pool, held) == [("p", "h")]


def test_overlap_counts_content_not_the_instructions_around_it():
    """One sentence of a passage, quoted in a coding task whose instructions are longer than
    the sentence: counted against all of the task's 5-grams the sentence is a minority, but
    it is all of the task's content."""
    sentence = "Guess the extensions for a file based on its MIME type."
    frame = ("Write a Python function `{name}(type)` that does the following, without using "
             "the standard library function of the same name. Include a docstring.\n\n{doc}")
    others = [frame.format(name=f"f{i}", doc=f"Return the {w} of the given object at once.")
              for i, w in enumerate(("name", "size", "kind", "owner", "state"))]
    held = [Prompt("code", "task", frame.format(name="guess_all_extensions", doc=sentence)),
            *(Prompt("code", f"other-{i}", text) for i, text in enumerate(others))]
    passage = (f"Summarize the following text in two or three sentences.\n\n{sentence} "
               "Return value is a list of strings giving the possible filename extensions, "
               "including the leading dot. The extension is not guaranteed to have been "
               "associated with any particular data stream.")
    pool = [Prompt("summarization", "passage", passage),
            Prompt("summarization", "unrelated", "Summarize the following text in two or three "
                   "sentences.\n\nA file object reads bytes from a stream until it is closed "
                   "and hands them to the caller in chunks of a fixed size.")]
    assert overlap(pool, held) == [("passage", "task")]


def test_overlap_finds_module_passages_that_quote_a_suite_docstring(full_suites):
    """The standard library's own text, as the pool's module passages and the suite's coding
    tasks quote it: mimetypes' docstrings open two passages with guess_all_extensions's."""
    from speckv.prompts import _module_passages, _summarize

    passages = [Prompt("summarization", f"dsum-{i}", _summarize(p))
                for i, p in enumerate(_module_passages()) if "Guess the extensions" in p]
    assert len(passages) >= 2
    assert {held for _, held in overlap(passages, full_suites)} == \
        {"api-mimetypes.guess_all_extensions"}


def test_families_split_every_source_and_are_stable():
    keys = [f"topic {i}" for i in range(2000)]
    share = sum(family(k) == "suite" for k in keys) / len(keys)
    assert 0.15 < share < 0.25
    assert [family(k) for k in keys[:50]] == [family(k) for k in keys[:50]]



@pytest.mark.parametrize("forms", [CODE_FORMS, CHAT_FORMS])
def test_no_task_or_topic_is_asked_on_both_sides(pool, full_suites, forms):
    """Whatever the wording, a task or topic is either held out or trained on, never both."""
    def subjects(prompts):
        found = set()
        for p in prompts:
            for form in forms:
                head, _, tail = form.partition("{t}")
                if p.text.startswith(head) and p.text.endswith(tail):
                    found.add(p.text[len(head) : len(p.text) - len(tail)])
        return found

    held, trained = subjects(full_suites), subjects(pool)
    assert held and trained
    assert not held & trained
