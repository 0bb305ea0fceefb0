"""The llama.cpp backend on the demo target's own GGUF (Q4_1, 135M: loads in a second and
decodes a few hundred tokens a second on one core), and the GGUF draft exported from
models/speckv-draft-v2.

Speed belongs in ``speckv bench --engine llamacpp``; these tests check behaviour: greedy
decoding, the speculative loop's output against plain decoding (llama.cpp's batched forward
is not bit-identical to its one-token forward, so a difference must sit at a near-tie), that
rolled-back cache entries leave no trace, the export's logits against the torch draft's, and
one-paragraph errors.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from locations import ROOT

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the README's "
                    "set-up (make setup) installs it from requirements.lock")

from gguf_case import DRAFT_DIR, NEAR_TIE, NEW_TOKENS

from speckv.engines.llamacpp import (
    EngineError,
    GGUFModel,
    LlamaCppDecoder,
    check_gguf,
    check_pair,
    measure_costs,
)


def _one_token_greedy(model: GGUFModel, ids: list[int], n: int) -> list[int]:
    """Greedy decoding written out: the prompt in one forward, then one token per forward."""
    model.reset()
    token = int(model.forward(ids, "last")[0].argmax())
    out = [token]
    while len(out) < n and not model.is_eog(token):
        token = int(model.forward([token], "last")[0].argmax())
        out.append(token)
    return out


def test_plain_decoding_is_greedy(target, prompt_ids, plain):
    assert plain.token_ids == _one_token_greedy(target, prompt_ids, NEW_TOKENS)
    assert len(plain.token_ids) > 5
    assert all(rows == 1 for rows in plain.forward_rows[1:])  # one token per forward


def _same_or_near_tie(plain, other) -> None:
    """``other`` equals plain decoding, or parts from it at a near-tie that a batched
    forward decided (llama.cpp is not batch-invariant)."""
    for i, (a, b) in enumerate(zip(plain.token_ids, other.token_ids, strict=False)):
        if a != b:
            assert other.forward_rows[i] > 1, f"a one-token forward parted at {i}"
            assert min(plain.margins[i], other.margins[i]) < NEAR_TIE, (
                f"parted from plain at token {i} with top-1 margins {plain.margins[i]:.3f} "
                f"(plain) and {other.margins[i]:.3f}: not a near-tie")
            return
    assert len(other.token_ids) == len(plain.token_ids)


@pytest.mark.parametrize("tokens", [4, 10])
def test_lookup_matches_plain_and_accepts(target, prompt_ids, plain, tokens):
    out = LlamaCppDecoder(target, mode="lookup", lookup_tokens=tokens).generate(prompt_ids,
                                                                                 NEW_TOKENS)
    _same_or_near_tie(plain, out)
    lookups = [s for s in out.steps if s["source"] == "lookup"]
    assert lookups and sum(s["accepted"] for s in lookups) > 0  # the list repeats
    # the cache holds exactly the prompt and every emitted token but the last (the root)
    assert target.n_past == target.cached_positions() == len(prompt_ids) + len(out.token_ids) - 1


@pytest.mark.parametrize("gamma", [1, 3])
def test_fixed_gamma_with_the_gguf_draft_matches_plain(target, draft, prompt_ids, plain, gamma):
    out = LlamaCppDecoder(target, draft, "fixed", gamma=gamma).generate(prompt_ids, NEW_TOKENS)
    _same_or_near_tie(plain, out)
    assert all(s["drafted"] <= gamma for s in out.steps)
    assert sum(out.accepted) > 0
    assert target.cached_positions() == len(prompt_ids) + len(out.token_ids) - 1
    assert draft.cached_positions() == draft.n_past <= target.n_past + gamma


def test_rolled_back_entries_leave_no_trace(target, prompt_ids):
    """Rejected rows are removed from llama.cpp's cache: after feeding 6 wrong tokens and
    rolling back, the next forward's logits equal those of a cache that never saw them.
    Without the removal (seq_rm) the stale rows stay in the cache and llama.cpp refuses the
    next batch's positions or attends to them."""
    target.reset()
    target.forward(prompt_ids, "none")
    n = target.n_past
    target.forward([11, 12, 13, 14, 15, 16], "all")
    target.truncate(n)
    assert target.cached_positions() == n
    after = np.array(target.forward([prompt_ids[0], prompt_ids[1]], "all"), copy=True)
    target.reset()
    target.forward(prompt_ids, "none")
    fresh = np.array(target.forward([prompt_ids[0], prompt_ids[1]], "all"), copy=True)
    np.testing.assert_array_equal(after, fresh)


def test_rollback_without_seq_rm_is_caught(target, prompt_ids, monkeypatch):
    """The same sequence with the removal switched off: the cache keeps the rejected rows."""
    target.reset()
    target.forward(prompt_ids, "none")
    n = target.n_past
    target.forward([11, 12, 13], "all")
    monkeypatch.setattr(target._ll, "llama_memory_seq_rm", lambda *a: True)
    target.truncate(n)
    assert target.cached_positions() == n + 3  # what the loop's own check would catch
    monkeypatch.undo()
    target.reset()


def test_controller_decides_on_llamacpp_costs(target, draft, prompt_ids, plain):
    from speckv.paths import DEFAULT_CONTROLLER, find_file
    from speckv.runtime import Controller

    measured = measure_costs(target, draft, prompt_ids, repeats=2)
    assert len(measured["t_verify"]) == 9 and min(measured["t_verify"]) > 0
    assert measured["t_draft"] > 0 and len(measured["t_catchup"]) >= 2
    controller = Controller.load(find_file(DEFAULT_CONTROLLER))
    dec = LlamaCppDecoder(target, draft, "controller", controller=controller,
                          costs=measured["step_costs"])
    out = dec.generate(prompt_ids, NEW_TOKENS)
    _same_or_near_tie(plain, out)
    # chains only: trees are priced as unavailable, so every drafting step is a chain
    assert all(s["source"] in ("plain", "draft") for s in out.steps)
    assert all(1 <= s["gamma"] <= 8 for s in out.steps if s["source"] == "draft")
    # plain steps come in runs of at most the priced probe interval
    assert dec.probe_every >= controller.max_skip_run
    run = longest = 0
    for s in out.steps:
        run = run + 1 if s["source"] == "plain" else 0
        longest = max(longest, run)
    assert longest <= dec.probe_every


def test_the_probe_interval_keeps_probes_within_their_budget():
    """Where a probe (a catch-up over the skipped tokens, then γ = 1) costs about what a plain
    step does, the contract's interval stands; where it is dear, the interval grows until
    the probe's extra cost is at most PROBE_BUDGET of the plain steps before it."""
    from speckv.engines.llamacpp import PROBE_BUDGET, probe_interval
    from speckv.runtime import StepCosts

    verify = [0.055 * (1 + 0.05 * g) for g in range(9)]  # Hugging Face-like: flat verify
    cheap = StepCosts(0.001, verify, [0.001 * (1 + 0.01 * n) for n in range(8)])
    assert probe_interval(cheap, 16) == 16
    steep = StepCosts(0.0077, [0.0247, 0.0425, 0.0512, 0.0817, 0.0882, 0.1093, 0.1295, 0.146,
                               0.1635], [0.0052, 0.0095, 0.0137, 0.0164, 0.0221, 0.0257, 0.0282,
                                         0.0274])  # llama.cpp, Q4_1, measured
    every = probe_interval(steep, 16)
    extra = float(steep.drafting(17)[0]) - steep.plain
    assert every > 16
    assert extra <= PROBE_BUDGET * every * steep.plain < extra + PROBE_BUDGET * steep.plain


@pytest.mark.slow
def test_gguf_draft_logits_match_the_torch_draft(draft_gguf, target, prompt_ids):
    """The exported file holds the torch draft (full tied head): on a prompt, every logit
    within 2% of its row's range (measured: 0.7%; llama.cpp rounds activations to bf16 for
    bf16 weights, torch computes in float32), and the same top-1 at every position but
    near-ties, where the torch draft's own top-2 are within 1% of the row's range."""
    from speckv.engines.gguf_draft import check_logits

    got = check_logits(draft_gguf, DRAFT_DIR, prompt_ids, threads=1)
    assert got["max_rel_diff"] < 0.02, got
    assert got["top1_agreement"] >= 0.9, got
    assert all(m < 0.01 for m in got["disagree_margins"]), got


def test_missing_and_foreign_files_are_one_paragraph(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(EngineError, match="is not a GGUF file"):
        GGUFModel(bad)


class _Vocab:
    def __init__(self, n, path, shift=0):
        self.n_vocab, self.path, self._shift = n, path, shift

    def token_text(self, t):
        return f"tok{t + self._shift}".encode()


def test_a_draft_of_another_vocabulary_is_refused(tmp_path):
    target = _Vocab(100, tmp_path / "t.gguf")
    with pytest.raises(EngineError, match="does not share the target's vocabulary"):
        check_pair(_Vocab(90, tmp_path / "d.gguf"), target)
    with pytest.raises(EngineError, match="token 0 is"):
        check_pair(_Vocab(100, tmp_path / "d.gguf", shift=1), target)
    check_pair(_Vocab(100, tmp_path / "d.gguf"), target)


def test_cli_errors_are_one_paragraph(tmp_path):
    for args in (["bench", "--engine", "llamacpp", "--gguf-target", str(tmp_path / "x.gguf"),
                  "--prompts", str(tmp_path / "p.jsonl")],
                 ["draft", "export-gguf", "--draft", str(tmp_path), "--out",
                  str(tmp_path / "d.gguf")]):
        run = subprocess.run([sys.executable, "-m", "speckv", *args], capture_output=True,
                             text=True, cwd=ROOT)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        assert run.stderr.count("error:") == 1, run.stderr


def test_bench_protocol_on_llamacpp(target, draft, prompt_ids):
    """The benchmark's shape (speed itself is the benchmark's business): every method on
    every slot in a rotated order, ratios to llama.cpp's plain decoding, differences from it
    listed with the margins that explain them."""
    from speckv.engines.bench import PLAIN, bench_llamacpp, format_result

    methods = ["llamacpp:lookup:4", "llamacpp:fixed:2"]
    out = bench_llamacpp(target, draft, [prompt_ids, prompt_ids[:-3]], ["a", "b"], methods,
                         8, repeats=1, resamples=50)
    assert list(out["methods"]) == [PLAIN, *methods]
    assert out["methods"][PLAIN]["ratio_to_plain"] == pytest.approx(1.0)
    assert all(row["tokens"] > 0 and row["tokens_per_s"] > 0 for row in out["methods"].values())
    assert len(out["costs"]["t_verify"]) == 9 and out["costs"]["t_draft"] > 0
    for d in out["differences"]:
        assert d["forward_rows"] > 1 and min(d["plain_margin"], d["method_margin"]) < NEAR_TIE
    assert "x plain" in format_result({**out, "repeats": 1, "max_new_tokens": 8})


def test_the_controller_chooses_the_lookup_in_llamacpp(target, draft, prompt_ids, plain):
    """``learned_lookup``: where the context proposes, the controller's lookup decision picks
    the source. On flat costs (a verify over 9 tokens at 1.2x a plain step, as in Hugging
    Face) it takes the repeated list's continuations; the lookup steps' tokens wait for the
    draft's catch-up (deferred), and the output is still plain decoding's."""
    from speckv.paths import DEFAULT_CONTROLLER, find_file
    from speckv.runtime import Controller, StepCosts

    controller = Controller.load(find_file(DEFAULT_CONTROLLER))
    flat = StepCosts(0.004, [0.020 * (1 + 0.025 * k) for k in range(9)],
                     [0.004 * (1 + 0.3 * k) for k in range(8)])
    dec = LlamaCppDecoder(target, draft, "controller", controller=controller, costs=flat,
                          learned_lookup=True)
    out = dec.generate(prompt_ids, NEW_TOKENS)
    _same_or_near_tie(plain, out)
    lookups = [s for s in out.steps if s["source"] == "lookup"]
    assert lookups and sum(s["accepted"] for s in lookups) > 0
    assert all(s["drafted"] <= controller.info.lookup_max_tokens for s in lookups)
    # the draft reads every token a lookup step emitted at its next catch-up
    assert draft.n_past <= target.n_past
    with pytest.raises(EngineError, match="lookup decision"):
        LlamaCppDecoder(target, draft, "fixed", gamma=2, learned_lookup=True)


def test_controller_methods_are_named_by_their_file():
    from speckv.engines.bench import short_name

    assert short_name("llamacpp:onnx:export/speckv.onnx") == "llamacpp:onnx"
    assert short_name("llamacpp:onnx:runs/a/speckv-llamacpp.onnx") == \
        "llamacpp:onnx:speckv-llamacpp.onnx"
    assert short_name("llamacpp:lookup:auto+onnx") == "llamacpp:lookup:auto+onnx"
    assert short_name("llamacpp:lookup:auto+onnx:x/c.onnx") == "llamacpp:lookup:auto+onnx:c.onnx"
    assert short_name("llamacpp:lookup:4") == "llamacpp:lookup:4"
