"""What `speckv generate` refuses before it decodes: a cost file for another run, a model
whose KV cache cannot be cropped; and that `--dtype` reaches speckv's own draft format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main
from speckv.decode.costs import CostModel
from speckv.llm.load import check_croppable, load_draft_for, load_model
from speckv.llm.weights import ModelError
from speckv.machine import fingerprint
from speckv.runtime.features import GAMMA_MAX

SMALL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def qwen2_sliding():
    """A Qwen2-style model whose second layer uses sliding-window attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1)
    assert "sliding_attention" in config.layer_types
    return Qwen2ForCausalLM(config).eval()


def mistral_sliding():
    """A Mistral-style model: sliding_window set, no layer_types."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=4)).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    from speckv.llm.draft import DraftSpec, build_draft, save_draft

    root = tmp_path_factory.mktemp("models")
    out = {"target": save_with_tokenizer(tiny_llama(2, seed=0, dtype=torch.float32),
                                         root / "target"),
           "qwen2": save_with_tokenizer(qwen2_sliding(), root / "qwen2"),
           "mistral": save_with_tokenizer(mistral_sliding(), root / "mistral")}
    spec = DraftSpec(base=str(out["target"]), init_layers=[0])
    save_draft(build_draft(spec), spec, root / "draft", {})
    out["draft"] = root / "draft"
    return out


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = speckv_main(argv)
    got = capsys.readouterr()
    return code, got.out, got.err


def _one_paragraph(err: str) -> str:
    assert "Traceback" not in err
    text = err.strip().splitlines()[-1]
    assert text.startswith("speckv generate: error:")
    return text


# ------------------------------------------------------------------------------- --dtype
@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32),
                                                 ("bfloat16", torch.bfloat16)])
def test_dtype_applies_to_speckvs_draft_format(dirs, dtype, expected):
    target = load_model(str(dirs["target"]), "fp16", dtype=dtype)
    draft = load_draft_for(str(dirs["draft"]), target, dtype)
    assert draft.compute_dtype == dtype
    assert {p.dtype for p in draft.model.parameters()} == {expected}
    if expected == torch.float32:  # the shared embeddings keep the base's float32 values
        torch.testing.assert_close(draft.model.get_input_embeddings().weight,
                                   target.model.get_input_embeddings().weight, rtol=0, atol=0)


def test_a_dtype_that_is_not_a_float_is_refused(dirs):
    target = load_model(str(dirs["target"]), "fp16", dtype="float32")
    for bad in ("float17", "int8", "Module"):
        with pytest.raises(ModelError, match="--dtype"):
            load_draft_for(str(dirs["draft"]), target, bad)


def test_generate_refuses_an_unknown_dtype_on_the_command_line(capsys):
    code, out, err = _cli(capsys, ["generate", "--prompt", "x", "--dtype", "float17"])
    assert code == 2 and out == "" and "invalid choice" in err and "Traceback" not in err


# -------------------------------------------------------------------- uncroppable caches
def test_full_attention_models_pass(dirs, tiny_pair):
    check_croppable(tiny_pair[1])
    check_croppable(load_model(str(dirs["target"]), "fp16", dtype="float32"), "target")


@pytest.mark.parametrize("build", [qwen2_sliding, mistral_sliding])
def test_sliding_window_models_are_refused_with_what_to_do(build):
    with pytest.raises(ModelError) as err:
        check_croppable(build(), "target")
    msg = str(err.value)
    assert "sliding" in msg and "crop" in msg and "full attention" in msg
    assert "sliding_window null" in msg


def test_a_cache_without_crop_is_refused(monkeypatch, tiny_pair):
    from transformers import DynamicCache

    monkeypatch.setattr(DynamicCache, "crop", None)
    with pytest.raises(ModelError, match="no crop"):
        check_croppable(tiny_pair[1], "draft")


def test_generate_refuses_a_sliding_window_target_at_load(dirs, capsys):
    code, out, err = _cli(capsys, ["generate", "--prompt", "w5 w6", "--target",
                                   str(dirs["qwen2"]), "--draft", "untrained:0", "--policy",
                                   "fixed:2", "--dtype", "float32", "--max-new-tokens", "4"])
    assert code == 2 and out == ""
    line = _one_paragraph(err)
    assert "target" in line and "sliding_attention" in line


def test_load_draft_for_refuses_a_sliding_window_draft(dirs):
    target = load_model(str(dirs["target"]), "fp16", dtype="float32")
    with pytest.raises(ModelError, match=r"The draft .*DynamicSlidingWindowLayer"):
        load_draft_for(str(dirs["mistral"]), target, "float32")


# ------------------------------------------------------------------------ cost files
def _cost_file(path: Path, **changes) -> Path:
    fields = {"cost_draft_s": 0.01, "cost_verify_s": [0.05] * (GAMMA_MAX + 1),
              "compression": "fp16", "compute_dtype": "float32", "draft_model": "untrained:0",
              "target_model": "never-loaded", "threads": 1, "machine": fingerprint(1)}
    return CostModel(**{**fields, **changes}).save(path)


@pytest.mark.parametrize(("change", "named"), [
    ({"compression": "nf4"}, "compression: 'nf4' there, 'fp16' here"),
    ({"target_model": "another"}, "target: 'another' there"),
    ({"draft_model": "speckv-draft"}, "draft: 'speckv-draft' there"),
    ({"threads": 2}, "threads: 2 there, 1 here"),
    ({"machine": {**fingerprint(1), "cpu": "A CPU elsewhere"}}, "machine cpu:"),
    ({"machine": None}, "no fingerprint"),
])
def test_generate_refuses_a_cost_file_for_another_run_before_loading(tmp_path, capsys, change,
                                                                      named):
    """The target is never loaded ('never-loaded' does not exist): the refusal comes first."""
    costs = _cost_file(tmp_path / "costs.json", **change)
    code, out, err = _cli(capsys, ["generate", "--prompt", "x", "--target", "never-loaded",
                                   "--draft", "untrained:0", "--policy", "fixed:2",
                                   "--dtype", "float32", "--threads", "1",
                                   "--costs", str(costs)])
    assert code == 2 and out == ""
    line = _one_paragraph(err)
    assert named in line and str(costs) in line
    assert "--save-costs" in line


def test_generate_reports_a_missing_cost_file(tmp_path, capsys):
    code, _, err = _cli(capsys, ["generate", "--prompt", "x", "--policy", "fixed:2",
                                 "--costs", str(tmp_path / "none.json")])
    assert code == 2 and "--save-costs" in _one_paragraph(err)
