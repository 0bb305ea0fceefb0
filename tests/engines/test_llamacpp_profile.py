"""``speckv profile --engine llamacpp``: traces computed by llama.cpp, the records they make,
and a controller trained on them deciding in llama.cpp's loop.

A trace stands for every live decoding of its prompt; in llama.cpp that holds up to its
batch variance (a batched forward may decide a near-tie another way), so the live check
counts agreeing steps rather than demanding all of them.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf_case import NEW_TOKENS, target_path
from locations import ROOT

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the README's "
                    "set-up (make setup) installs it from requirements.lock")

from speckv.profile.gguf_trace import _continuations, live_agreement, trace_gguf
from speckv.profile.trace import plan_branches
from speckv.runtime.features import GAMMA_MAX, token_stats


@pytest.fixture(scope="module")
def trace(target, draft, prompt_ids):
    return trace_gguf(target, draft, prompt_ids, NEW_TOKENS)


def test_the_traced_answer_is_llamacpp_plain_decoding(trace, plain):
    assert trace.answer.tolist() == plain.token_ids
    assert ((trace.target_top1 > 0) & (trace.target_top1 <= 1)).all()
    assert trace.tree_accept is None  # llama.cpp verifies no trees
    lengths = np.asarray(trace.lookup["length"])
    assert (lengths > 0).sum() > 5  # the answer repeats its prompt: the lookup proposes
    # the accepted lengths are runs of agreement, capped by the budget and γmax
    assert (trace.accept_len <= trace.accept_cap).all()
    assert trace.accept_len.max() >= 2 and trace.agree.mean() > 0.2


@pytest.mark.parametrize("gamma", [1, 3, GAMMA_MAX])
def test_live_decoding_accepts_what_the_trace_says(target, draft, prompt_ids, trace, gamma):
    """A live fixed-γ decoding in llama.cpp, step by step, against the trace's accepted
    length at the step's position (up to where its output parts from the trace's answer, if
    it does: a near-tie decided by a batched forward)."""
    got = live_agreement(target, draft, prompt_ids, trace, gamma)
    assert got["steps"] >= 5
    assert got["agreeing"] >= 0.9 * got["steps"], got


def test_off_track_statistics_are_the_drafts_own_continuation(target, draft, prompt_ids,
                                                              trace):
    """The continuation after a disagreement, from the trace's reused cache, against the
    draft decoding that context from scratch one token at a time."""
    from speckv.profile.gguf_trace import _teacher_forced

    logits = _teacher_forced(draft, prompt_ids, trace.answer)
    plan = plan_branches(trace.answer, logits.argmax(-1), NEW_TOKENS)
    assert len(plan.off) >= 2
    branches = plan.branches[:3]
    cont = _continuations(draft, len(prompt_ids), trace.answer, branches)
    for (p, token), got in zip(branches, cont, strict=True):
        draft.reset()
        draft.forward([*prompt_ids, *trace.answer[:p].tolist()], "none")
        for s in range(len(got)):
            row = draft.forward([token], "last")[0]
            np.testing.assert_allclose(got[s], token_stats(row[None])[0, :2], atol=2e-2)
            token = int(row.argmax())
    draft.reset()


def _prompts(n_per_task: int):
    from speckv.prompts import suites

    return suites(["chat", "code", "math", "summarization"], n=n_per_task)


def _profile(tmp_path, draft_gguf, prompts, max_new_tokens=16, out="r.parquet"):
    from speckv.llm.weights import DEMO_TARGET
    from speckv.profile.profiler import run_profile

    return run_profile(draft=str(draft_gguf), target=DEMO_TARGET, compressions=["nf4"],
                       prompts=prompts, out=tmp_path / out, max_new_tokens=max_new_tokens,
                       threads=1, engine="llamacpp", gguf_targets={"nf4": str(target_path())})


def test_profile_writes_llamacpp_records_and_resumes(tmp_path, draft_gguf):
    from speckv.profile.profiler import ProfileError
    from speckv.records import read_metadata, read_records

    prompts = _prompts(1)
    run = _profile(tmp_path, draft_gguf, prompts)
    df = read_records([run.out])
    assert set(df["compression"]) == {"nf4"} and set(df["compute_dtype"]) == {"Q4_1"}
    assert df["prompt_id"].nunique() == 4 and (df["max_new_tokens"] == 16).all()
    assert df["tree_accept_len"].isna().all() and df["cost_tree_verify_s"].isna().all()
    assert df["lookup_length"].notna().all()
    verify = np.stack(df["cost_verify_s"].to_numpy())
    assert verify.shape[1] == GAMMA_MAX + 1 and (verify > 0).all()
    assert verify[0, -1] > verify[0, 0]  # nine tokens cost more than one in llama.cpp
    assert len(df["cost_catchup_s"].iloc[0]) >= 2
    meta = next(iter(read_metadata(run.out)["runs"].values()))
    assert meta["engine"] == "llamacpp" and len(meta["cost"]["cost_verify_s"]) == GAMMA_MAX + 1
    # killed after three prompts: the same command redoes the missing one alone
    parts = sorted((tmp_path / "r.parquet.parts").glob("*.parquet"))
    parts[0].unlink()
    again = _profile(tmp_path, draft_gguf, prompts)
    assert again.prompts == 1
    redone = read_records([again.out])
    cols = ["prompt_id", "position", "accept_len", "lookup_accept", "agree_ema"]
    key = ["prompt_id", "position"]
    assert redone[cols].sort_values(key).reset_index(drop=True).equals(
        df[cols].sort_values(key).reset_index(drop=True))
    with pytest.raises(ProfileError, match="--max-new-tokens"):
        _profile(tmp_path, draft_gguf, prompts, max_new_tokens=12)


def test_a_controller_trained_on_llamacpp_records_decides_in_llamacpp(
        tmp_path, draft_gguf, target, draft, prompt_ids, plain):
    """Records of llama.cpp -> the DataModule (llama.cpp's costs, no trees) -> a fitted and
    exported controller -> deciding in llama.cpp's loop, output still plain decoding's."""
    import lightning as L
    import torch

    from speckv.engines.llamacpp import LlamaCppDecoder, measure_costs
    from speckv.export.graph import export_controller
    from speckv.runtime import Controller
    from speckv.runtime.features import FEATURE_NAMES
    from speckv.train.datamodule import SpeckvDataModule
    from speckv.train.module import SpeckvModule
    from speckv.train.network import load_checkpoint

    run = _profile(tmp_path, draft_gguf, _prompts(3), max_new_tokens=24)
    dm = SpeckvDataModule(records=str(run.out), batch_size=256)
    assert not dm.trees  # records without trees train a controller of chains
    model = SpeckvModule(len(FEATURE_NAMES), list(range(1, GAMMA_MAX + 1)), list(FEATURE_NAMES),
                         hidden=[16], lr=1e-2, trees=dm.trees)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", deterministic=True)
    torch.manual_seed(0)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    mlp, meta = load_checkpoint(tmp_path / "c.ckpt")
    export_controller(mlp, meta, tmp_path / "c.onnx", latency_calls=0)
    controller = Controller.load(tmp_path / "c.onnx")
    costs = measure_costs(target, draft, prompt_ids, repeats=2)["step_costs"]
    out = LlamaCppDecoder(target, draft, "controller", controller=controller,
                          costs=costs).generate(prompt_ids, NEW_TOKENS)
    drafted = [s for s in out.steps if s["source"] == "draft"]
    assert out.token_ids[:5] == plain.token_ids[:5]
    assert all(1 <= s["gamma"] <= GAMMA_MAX for s in drafted)


@pytest.mark.parametrize("args, says", [
    (["--compression", "fp16"], "--quantization"),
    (["--quantization", "q4_1,q4_k_m"], "separate"),
    (["--quantization", "q3"], "Unknown llama.cpp quantization"),
    (["--mode", "live"], "trace mode"),
])
def test_profile_cli_refuses_in_one_paragraph(tmp_path, args, says):
    run = subprocess.run([sys.executable, "-m", "speckv", "profile", "--engine", "llamacpp",
                          "--per-task", "1", "--out", str(tmp_path / "r.parquet"), *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1, run.stderr
    assert says in run.stderr
    assert not (tmp_path / "r.parquet").exists()


def test_the_target_is_requantized_by_llamacpp(tmp_path, prompt_ids):
    from speckv.engines.llamacpp import GGUFModel
    from speckv.engines.quantize import cached_target, requantize

    assert cached_target("q4_1") == target_path()  # the shipped level is the file itself
    out = requantize(target_path(), tmp_path / "q8.gguf", "q8_0", threads=1)
    model = GGUFModel(out, n_ctx=256, threads=1)
    assert (model.file_type, model.compression) == ("Q8_0", "int8")
    assert model.forward(prompt_ids, "last").shape == (1, model.n_vocab)
    model.close()
    assert [p.name for p in tmp_path.iterdir()] == ["q8.gguf"]  # no temporary left behind
