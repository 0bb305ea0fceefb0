"""`--device` and `--dtype auto`: where profiling runs and in which dtype (tiny saved models)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_with_tokenizer, tiny_llama

from speckv.__main__ import main as speckv_main
from speckv.llm.load import load_model
from speckv.llm.weights import ModelError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_with_tokenizer(tiny_llama(1, seed=0, dtype=torch.float32),
                               tmp_path_factory.mktemp("m") / "m")


def test_auto_picks_the_device_there_is_and_bfloat16_on_a_cpu(model_dir):
    lm = load_model(str(model_dir), "fp16", dtype="auto", device="cpu")
    assert lm.device.type == "cpu" and lm.compute_dtype == "bfloat16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    auto = load_model(str(model_dir), "fp16", dtype="float32", device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_devices_and_missing_cuda_are_refused_with_what_to_do(model_dir):
    with pytest.raises(ModelError, match="use cpu, cuda"):
        load_model(str(model_dir), "fp16", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="sees no CUDA device"):
            load_model(str(model_dir), "fp16", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_profile_on_cuda_without_one_exits_2(model_dir, tmp_path, capsys):
    code = speckv_main(["profile", "--draft", str(model_dir), "--target", str(model_dir),
                        "--compression", "fp16", "--per-task", "1", "--device", "cuda",
                        "--out", str(tmp_path / "r.parquet")])
    assert code == 2
    assert "--device cuda" in capsys.readouterr().err
