"""The llama.cpp tests' case: the demo target's own GGUF (Q4_1, 135M: loads in a second and
decodes a few hundred tokens a second on one core), a prompt whose answer repeats its context,
and the causal-LM draft exported to GGUF (fixtures in tests/engines/conftest.py)."""

from __future__ import annotations

from locations import ROOT

DRAFT_DIR = ROOT / "models" / "speckv-draft-v2"
#: a chat-templated prompt's worth of text whose answer repeats its context (so prompt lookup
#: proposes often) - token ids come from the GGUF's own tokenizer via llama.cpp
PROMPT = ("<|im_start|>user\nRepeat this list exactly, then add one more item: apples, "
          "oranges, pears, plums, cherries, apples, oranges, pears.<|im_end|>\n"
          "<|im_start|>assistant\n")
#: a difference from plain decoding must sit where the top two logits are this close
NEAR_TIE: float = 0.5
NEW_TOKENS = 40


def target_path():
    from speckv.llm.weights import DEMO_TARGET, resolve

    return resolve(DEMO_TARGET)


def tokenize(model, text: str) -> list[int]:
    """``text``'s token ids by the GGUF's own tokenizer (special tokens parsed)."""
    ll = model._ll
    buf = (ll.llama_token * 1024)()
    n = ll.llama_tokenize(model._vocab, text.encode(), len(text.encode()), buf, 1024, False,
                          True)
    assert n > 0
    return list(buf[:n])
