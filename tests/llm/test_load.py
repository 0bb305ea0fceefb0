"""Model loading: name resolution, compression levels, tokenizer checks, the demo pair."""

from __future__ import annotations

import time

import pytest
import torch
from tiny_models import save_with_tokenizer, tiny_llama

from speckv.llm.feature_draft import is_feature_draft
from speckv.llm.load import check_same_tokenizer, load_model, load_tokenizer
from speckv.llm.weights import DEMO_DRAFT, DEMO_TARGET, ModelError, resolve


def test_unknown_names_and_levels_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="neither a file, a directory, nor a Hugging Face id"):
        resolve("no-such-model")
    with pytest.raises(ModelError, match=r"Unknown compression 'fp8'.*fp16, int8, nf4"):
        load_model(str(tmp_path), "fp8")


def test_local_directory_loads_for_inference(tmp_path):
    path = save_with_tokenizer(tiny_llama(1, seed=0, dtype=torch.float32), tmp_path / "m")
    lm = load_model(str(path), "fp16", dtype="float32")
    assert lm.compression == "fp16" and lm.compute_dtype == "float32"
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training


def test_pairs_with_different_vocabularies_are_refused(tmp_path):
    a = save_with_tokenizer(tiny_llama(1, seed=0, vocab=64), tmp_path / "a")
    b = save_with_tokenizer(tiny_llama(1, seed=0, vocab=96), tmp_path / "b")
    check_same_tokenizer(load_tokenizer(str(a)), load_tokenizer(str(a)))
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_same_tokenizer(load_tokenizer(str(a)), load_tokenizer(str(b)))


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["fp16", "nf4", "int8"])
def test_demo_pair_loads_offline_and_shares_a_tokenizer(compression):
    target = load_model(DEMO_TARGET, compression, dtype="bfloat16")
    draft = load_model(DEMO_DRAFT, "fp16", dtype="bfloat16")
    check_same_tokenizer(draft.tokenizer, target.tokenizer)
    assert target.model.config.num_hidden_layers == 30
    # the demo draft is feature-conditioned: one layer reading the target's hidden states,
    # with a reduced head
    assert is_feature_draft(draft.model)
    assert draft.model.cfg.hidden_size == target.model.config.hidden_size
    assert draft.model.cfg.draft_vocab < target.model.config.vocab_size
    if compression != "fp16":  # bitsandbytes replaced the linear layers
        names = {type(m).__name__ for m in target.model.modules()}
        assert names & {"Linear8bitLt", "Linear4bit"}
    # the draft shares the target's embeddings: the same token maps to the same vector
    ids = torch.tensor([[1, 100, 2000]])
    emb_t = target.model.get_input_embeddings()(ids).float()
    emb_d = draft.model.get_input_embeddings()(ids).float()
    assert torch.allclose(emb_t, emb_d, atol=1e-2)


def test_a_saved_speckv_draft_loads_in_the_dtype_asked_for(tmp_path):
    import torch
    from tiny_models import save_with_tokenizer, tiny_llama

    from speckv.llm.draft import DraftSpec, build_draft, save_draft
    from speckv.llm.load import load_model

    base = save_with_tokenizer(tiny_llama(2, seed=0, dtype=torch.float32), tmp_path / "base")
    spec = DraftSpec(base=str(base), init_layers=[0])
    save_draft(build_draft(spec), spec, tmp_path / "draft", {})
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(str(tmp_path / "draft"), dtype=dtype)
        assert loaded.compute_dtype == dtype
        assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)


# ------------------------------------------------------------- the converted-weights cache
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file whose "conversion" saves a tiny model (counted), in a private
    cache: the cache's locking, checking and rebuilding without a real GGUF file."""
    from speckv.llm import weights

    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def convert(source, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for a second process to arrive meanwhile
        with weights.atomic_dir(out) as tmp:
            save_with_tokenizer(tiny_llama(1, seed=0, dtype=torch.float32), tmp)

    monkeypatch.setattr(weights, "_convert_gguf", convert)
    return gguf, calls


def test_loads_racing_on_an_empty_cache_convert_once(fake_gguf):
    """Whatever the dtype (auto measures under its own lock; an explicit one does not), the
    conversion itself is locked: the second load waits and reads the first one's copy."""
    from concurrent.futures import ThreadPoolExecutor

    gguf, calls = fake_gguf
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda dtype: load_model(str(gguf), "fp16", dtype=dtype,
                                                        device="cpu"),
                               ["float32", "bfloat16"]))
    assert len(calls) == 1
    assert [lm.compute_dtype for lm in loaded] == ["float32", "bfloat16"]


def test_a_truncated_converted_copy_is_rebuilt_with_a_warning(fake_gguf, caplog):
    gguf, calls = fake_gguf
    load_model(str(gguf), "fp16", dtype="float32", device="cpu")
    (folder,) = calls
    weights_file = folder / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # a disk that filled up
    stale = folder.parent / f".{folder.name}.k1ll3d00"  # a killed conversion's half folder
    stale.mkdir()
    with caplog.at_level("WARNING", logger="speckv.llm.weights"):
        lm = load_model(str(gguf), "fp16", dtype="float32", device="cpu")
    assert len(calls) == 2 and lm.model(torch.tensor([[1, 5, 7]])).logits.isfinite().all()
    assert "cannot be read" in caplog.text and "incomplete metadata" in caplog.text
    assert not stale.exists()


def test_a_truncated_weights_file_elsewhere_is_one_paragraph(tmp_path):
    path = save_with_tokenizer(tiny_llama(1, seed=0, dtype=torch.float32), tmp_path / "m")
    weights_file = path / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated or corrupt; save or download the model"):
        load_model(str(path), "fp16", dtype="float32", device="cpu")
