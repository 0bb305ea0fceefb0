"""``speckv draft prompts``: user turns the target writes itself, kept, deduplicated, resumed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_with_tokenizer, tiny_llama

from speckv.distill.self_prompts import LEADS, keep, turn_prefix, write_self_prompts

TEMPLATE = ("{% for m in messages %}<s> w5 w6 {{ m['content'] }} </s>{% endfor %}"
            "{% if add_generation_prompt %}<s> w7 {% endif %}")


@pytest.fixture
def tiny_target(tmp_path, monkeypatch):
    """The tiny target behind ``load_model``, its tokenizer given a chat template."""
    from transformers import AutoTokenizer

    import speckv.llm.load as load_mod

    target = tiny_llama(2, seed=0, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(save_with_tokenizer(target, tmp_path / "base"))
    tok.chat_template = TEMPLATE
    monkeypatch.setattr(load_mod, "load_model",
                        lambda *a, **k: SimpleNamespace(tokenizer=tok, model=target))
    return tok


def test_turn_prefix_is_the_template_up_to_the_users_words(tiny_target):
    assert turn_prefix(tiny_target) == "<s> w5 w6 "


@pytest.mark.parametrize(("task", "text", "kept"), [
    ("chat", "How do I plan a week of meals for a family of four?", True),
    ("chat", "", False),  # the target did not close its turn
    ("chat", "Hi there", False),  # too short
    ("chat", "What is the best way to brew a café latte at home without a machine?", True),
    ("chat", "Ça va très bien, et vous? Où êtes-vous né? Dîtes-moi.", False),  # not ASCII
    ("chat", "Tell me about <|im_start|> tokens in chat templates please", False),
    ("summarization", LEADS["summarization"][0] + "A short line.", False),  # no passage
    ("summarization", LEADS["summarization"][0] + "word " * 60, True),
])
def test_keep_drops_unclosed_short_foreign_and_passageless_turns(task, text, kept):
    assert keep(task, LEADS[task][0], text) is kept


def test_prompts_are_sampled_filtered_and_resumed_as_one_run_would(tiny_target, tmp_path):
    """A run stopped at 3 prompts per task, then resumed for 6, writes the same file as one
    run for 6; every prompt starts with its task's lead, no two share a template key, and the file
    reads back through ``load_jsonl`` (what ``speckv draft data --prompts`` uses)."""
    from speckv.prompts import load_jsonl, template_key

    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    write_self_prompts(whole, 6, ("chat", "code"), batch_size=8)
    write_self_prompts(part, 3, ("chat", "code"), batch_size=8)
    assert 6 <= len(load_jsonl(part)) < len(load_jsonl(whole))
    write_self_prompts(part, 6, ("chat", "code"), batch_size=8)
    assert part.read_text() == whole.read_text()
    prompts = load_jsonl(whole)
    for task in ("chat", "code"):  # whole batches: at least 6, fewer than 6 + a batch
        assert 6 <= [p.task for p in prompts].count(task) < 6 + 8
    for p in prompts:
        assert p.text.startswith(LEADS[p.task]) and p.prompt_id.startswith(f"self-{p.task}-")
        assert "</s>" not in p.text
    assert len({template_key(p.text) for p in prompts}) == len(prompts)
    assert all(set(json.loads(line)) == {"task", "id", "prompt"}
               for line in whole.read_text().splitlines())


def test_a_target_without_a_chat_template_is_refused_with_what_to_do(tiny_target, tmp_path):
    from speckv.prompts import PromptError

    tiny_target.chat_template = None
    with pytest.raises(PromptError, match="--prompts"):
        write_self_prompts(tmp_path / "p.jsonl", 2, ("chat",))
    assert not (tmp_path / "p.jsonl").exists()
