"""`--dtype auto`: the compute dtype chosen from measured plain-step and verify costs, cached
per target, compression, threads and machine (speckv.decode.dtype), and the command lines
that default to it."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from tiny_models import save_with_tokenizer, tiny_llama

import speckv.decode.dtype as dt
from speckv.__main__ import main as speckv_main
from speckv.decode.dtype import (
    CANDIDATES,
    DtypeCosts,
    DtypeError,
    choose_dtype,
    measure_dtype,
    resolve_dtype,
)
from speckv.machine import fingerprint
from speckv.runtime.features import GAMMA_MAX

#: an AVX2-only CPU: bfloat16 emulated, float32 plain steps cheaper, and bfloat16's verify
#: grows by a third of a step per token (seconds: plain, verify of 2 tokens, growth per token)
AVX2 = {"bfloat16": (0.054, 0.072, 0.018), "float32": (0.042, 0.050, 0.004)}
#: an AMX CPU: bfloat16 cheaper on both
AMX = {"bfloat16": (0.030, 0.034, 0.0005), "float32": (0.042, 0.060, 0.004)}
#: this machine (AMX) measured: float32's plain step 7 % cheaper, its verify growing fast
AMX_MEASURED = {"bfloat16": (0.0557, 0.0628, 0.0002), "float32": (0.0517, 0.0555, 0.0075)}


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """The machine counts as quiet (a test run may well load it): choices get cached."""
    monkeypatch.setattr(dt, "machine_busy", lambda threads: None)


def test_a_choice_measured_on_a_busy_machine_is_used_but_not_cached(model_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(dt, "machine_busy", lambda threads: 3.7)
    fake = Fake(AMX)
    first = choose_dtype(str(model_dir), "fp16", measure=fake, directory=tmp_path)
    assert first.dtype == "bfloat16" and first.cache is None
    assert not list(tmp_path.rglob("*.json"))
    choose_dtype(str(model_dir), "fp16", measure=fake, directory=tmp_path)
    assert len(fake.calls) == 2 * len(CANDIDATES), "measured again the next time"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_with_tokenizer(tiny_llama(1, seed=0, dtype=torch.float32),
                               tmp_path_factory.mktemp("m") / "m")


class Fake:
    """A deterministic measuring function: the figures given, and every call recorded."""

    def __init__(self, figures: dict[str, tuple[float, ...]], fail: tuple[str, ...] = ()):
        self.figures, self.fail, self.calls = figures, fail, []

    def __call__(self, target: str, compression: str, dtype: str) -> DtypeCosts:
        self.calls.append((compression, dtype))
        if dtype in self.fail:
            raise RuntimeError(f"{dtype} is not implemented on this CPU\nsecond line")
        plain, verify, growth = self.figures[dtype]
        return DtypeCosts(dtype, plain, [verify + growth * g for g in range(GAMMA_MAX)])


def fp(cpu: str = "Test CPU", threads: int = 1) -> dict:
    return {**fingerprint(threads), "cpu": cpu}


# ------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize(("figures", "expected", "why"), [
    (AVX2, "float32", "fewer target seconds per token"),
    (AMX, "bfloat16", "fewer target seconds per token"),
    # the cheaper plain step loses to the verification that stays cheap as it grows
    (AMX_MEASURED, "bfloat16", "fewer target seconds per token"),
    # within 3 % per token: the cheaper plain step decides
    ({"bfloat16": (0.0410, 0.050, 0.001), "float32": (0.0400, 0.0505, 0.001)}, "float32",
     "within 3%"),
    ({"bfloat16": (0.0400, 0.0505, 0.001), "float32": (0.0410, 0.050, 0.001)}, "bfloat16",
     "within 3%"),
    # verification too dear to pay in either: plain steps, and the cheaper one wins
    ({"bfloat16": (0.030, 0.200, 0.01), "float32": (0.040, 0.150, 0.01)}, "bfloat16",
     "plain steps"),
])
def test_the_choice_follows_the_measured_costs(model_dir, tmp_path, figures, expected, why):
    fake = Fake(figures)
    choice = choose_dtype(str(model_dir), directory=tmp_path, measure=fake, fingerprint=fp())
    assert choice.dtype == expected and why in choice.reason
    assert sorted(d for _, d in fake.calls) == sorted(CANDIDATES)
    assert set(choice.measured) == set(CANDIDATES) and not choice.cached
    line = choice.describe()
    assert line.startswith(f"--dtype auto: {expected} for {model_dir} (fp16, cpu, 1 thread)")
    assert "bfloat16 plain step" in line and "float32 plain step" in line
    assert f"cached in {choice.cache}" in line


def test_explicit_dtypes_pass_through_without_measuring(model_dir, tmp_path):
    fake = Fake(AVX2)
    for dtype in ("bfloat16", "float32", "float64"):
        assert resolve_dtype(dtype, str(model_dir), measure=fake, directory=tmp_path) == (dtype,
                                                                                         None)
    assert fake.calls == [] and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- the cache
def test_the_choice_is_cached_per_machine_threads_and_compression(model_dir, tmp_path):
    fake = Fake(AVX2)
    run = functools.partial(choose_dtype, str(model_dir), directory=tmp_path, measure=fake)
    first = run(fingerprint=fp("CPU A"))
    assert len(fake.calls) == 2 and first.cache.is_file()
    stored = json.loads(first.cache.read_text())
    assert stored["machine"]["cpu"] == "CPU A" and stored["choice"]["dtype"] == "float32"

    again = run(fingerprint=fp("CPU A"))  # read back, nothing measured
    assert len(fake.calls) == 2 and again.cached and again.dtype == "float32"
    assert again.measured == first.measured and again.cache == first.cache
    assert f"cached from {first.cache}" in again.describe()

    fake.figures = AMX  # another machine: its own measurement, its own file
    other = run(fingerprint=fp("CPU B"))
    assert len(fake.calls) == 4 and not other.cached and other.dtype == "bfloat16"
    assert other.cache != first.cache
    assert run(fingerprint=fp("CPU A")).dtype == "float32"  # A's file is untouched
    run(fingerprint=fp("CPU A", threads=2), threads=2)
    run(fingerprint=fp("CPU A"), compression="int8")
    assert len(fake.calls) == 8 and ("int8", "float32") in fake.calls
    assert len(list(tmp_path.glob("*.json"))) == 4


def test_a_cached_choice_made_on_another_machine_is_not_used(model_dir, tmp_path, caplog):
    """A file at this machine's path whose recorded fingerprint is another's (copied over)."""
    fake = Fake(AVX2)
    path = choose_dtype(str(model_dir), directory=tmp_path, measure=fake,
                        fingerprint=fp()).cache
    stored = json.loads(path.read_text())
    isa = stored["machine"]["isa"]  # another machine: this one's AMX flag flipped, either way
    stored["machine"]["isa"] = {**isa, "amx_bf16": not isa["amx_bf16"]}
    stored["choice"]["dtype"] = "bfloat16"
    path.write_text(json.dumps(stored))
    caplog.set_level(logging.WARNING, logger="speckv.decode.dtype")
    choice = choose_dtype(str(model_dir), directory=tmp_path, measure=fake, fingerprint=fp())
    assert len(fake.calls) == 4 and not choice.cached and choice.dtype == "float32"
    assert "machine isa" in caplog.text and "measuring again" in caplog.text
    assert json.loads(path.read_text())["machine"]["isa"] == fp()["isa"]  # replaced


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1}', "",
                                     "CHOICE_INT4", "CHOICE_NEGATIVE"])
def test_a_corrupt_cache_file_is_measured_again(model_dir, tmp_path, caplog, content):
    fake = Fake(AVX2)
    path = choose_dtype(str(model_dir), directory=tmp_path, measure=fake,
                        fingerprint=fp()).cache
    if content.startswith("CHOICE_"):  # the right key, a broken choice
        stored = json.loads(path.read_text())
        if content == "CHOICE_INT4":
            stored["choice"]["dtype"] = "int4"
        else:
            stored["choice"]["measured"]["float32"]["plain_s"] = -1
        content = json.dumps(stored)
    path.write_text(content)
    caplog.set_level(logging.WARNING, logger="speckv.decode.dtype")
    choice = choose_dtype(str(model_dir), directory=tmp_path, measure=fake, fingerprint=fp())
    assert choice.dtype == "float32" and not choice.cached and len(fake.calls) == 4
    assert "not usable here" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text())["choice"]["dtype"] == "float32"  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_cache_still_gives_the_choice(model_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    choice = choose_dtype(str(model_dir), directory=blocker / "dtype", measure=Fake(AMX),
                          fingerprint=fp())
    assert choice.dtype == "bfloat16" and choice.cache is None
    assert "could not cache" in caplog.text


# ------------------------------------------------------------------- candidates and devices
def test_a_candidate_that_does_not_run_is_left_out(model_dir, tmp_path):
    choice = choose_dtype(str(model_dir), directory=tmp_path, fingerprint=fp(),
                          measure=Fake(AMX, fail=("bfloat16",)))
    assert choice.dtype == "float32" and "only candidate" in choice.reason
    assert choice.failed == {"bfloat16": "RuntimeError: bfloat16 is not implemented on this CPU"}
    assert "bfloat16 failed here" in choice.describe()
    with pytest.raises(DtypeError, match=r"no candidate dtype runs.*Pass --dtype explicitly"):
        choose_dtype(str(model_dir), directory=tmp_path / "b", fingerprint=fp(),
                     measure=Fake(AMX, fail=CANDIDATES))


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_cuda_keeps_the_static_rule_without_measuring(monkeypatch, model_dir, tmp_path, bf16,
                                                      expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    fake = Fake(AVX2)
    choice = choose_dtype(str(model_dir), device="cuda", directory=tmp_path, measure=fake)
    assert choice.dtype == expected and "static rule" in choice.reason
    assert fake.calls == [] and not list(tmp_path.iterdir())


def test_the_real_measurement_on_a_tiny_model(model_dir, tmp_path):
    """The default measuring function: both dtypes load and are timed (what wins on this
    machine is its business; the figures must be real and complete)."""
    quick = functools.partial(measure_dtype, repeats=1, warmup=0, context_len=8)
    choice = choose_dtype(str(model_dir), directory=tmp_path, measure=quick, threads=1)
    assert choice.dtype in CANDIDATES and set(choice.measured) == set(CANDIDATES)
    for dtype, costs in choice.measured.items():
        assert costs.dtype == dtype and costs.plain_s > 0
        assert len(costs.verify_s) == GAMMA_MAX and min(costs.verify_s) > 0
    assert choice.threads == 1 and choice.measure_s > 0


# ---------------------------------------------------------------------------- command lines
@pytest.fixture()
def avx2_machine(monkeypatch, tmp_path):
    """--dtype auto on a pretend AVX2 CPU (float32 wins), cached under a test cache."""
    fake = Fake(AVX2)
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dt, "measure_dtype", fake)
    return fake


@pytest.mark.parametrize("command", ["generate", "bench", "profile"])
def test_help_explains_auto(capsys, command):
    assert speckv_main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "auto (the default): on a CPU, the faster of bfloat16 and float32" in text
    assert "within 3% " in text and "cached per target, compression, threads and machine" in text


def test_generate_defaults_to_auto_and_says_what_it_chose(capsys, caplog, avx2_machine,
                                                          model_dir, tmp_path):
    caplog.set_level(logging.INFO)
    costs = tmp_path / "costs.json"
    argv = ["generate", "--prompt", "w5 w6", "--target", str(model_dir), "--draft",
            "untrained:0", "--policy", "fixed:2", "--max-new-tokens", "3", "--threads", "1",
            "--json"]
    assert speckv_main([*argv, "--save-costs", str(costs)]) == 0
    assert len(avx2_machine.calls) == 2
    lines = [r.getMessage() for r in caplog.records if "--dtype auto" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("--dtype auto: float32 for")
    assert "fewer target seconds per token at acceptance 0.6" in lines[0]
    assert "cached in" in lines[0]
    assert "(fp16, float32) loaded" in caplog.text  # the target, and the draft with it:
    saved = json.loads(costs.read_text())
    assert saved["compute_dtype"] == "float32"
    assert saved["extra"]["dtype_auto"]["dtype"] == "float32"
    capsys.readouterr()
    caplog.clear()
    assert speckv_main(argv) == 0  # the next start-up reads the cache
    assert len(avx2_machine.calls) == 2
    assert "--dtype auto: float32" in caplog.text and "cached from" in caplog.text
    # an explicit dtype is taken as is; a cost file for another dtype is refused
    caplog.clear()
    assert speckv_main([*argv, "--dtype", "bfloat16"]) == 0
    assert "--dtype auto" not in caplog.text and "(fp16, bfloat16) loaded" in caplog.text
    capsys.readouterr()
    bf16 = tmp_path / "bf16.json"
    saved["compute_dtype"] = "bfloat16"
    bf16.write_text(json.dumps(saved))
    assert speckv_main([*argv, "--costs", str(bf16)]) == 2
    err = capsys.readouterr().err
    assert "compute dtype: 'bfloat16' there, 'float32' here" in err and "Traceback" not in err


def test_bench_and_profile_default_to_auto(capsys, caplog, avx2_machine, model_dir, tmp_path):
    from speckv.records import read_records

    caplog.set_level(logging.INFO)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"task": "code", "prompt": "w5 w17 w33", "id": "a"}\n')
    assert speckv_main(["bench", "--prompts", str(prompts), "--methods", "ar", "--target",
                        str(model_dir), "--repeats", "1", "--max-new-tokens", "3",
                        "--resamples", "10", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "auto" and result["dtype_auto"]["fp16"]["dtype"] == "float32"
    assert result["by_compression"]["fp16"]["compute_dtype"] == "float32"
    assert "--dtype auto: float32" in caplog.text
    calls = len(avx2_machine.calls)
    out = tmp_path / "r.parquet"
    assert speckv_main(["profile", "--draft", str(model_dir), "--target", str(model_dir),
                        "--compression", "fp16", "--prompts", str(prompts), "--tasks", "code",
                        "--max-new-tokens", "3", "--threads", "1", "--out", str(out)]) == 0
    assert len(avx2_machine.calls) == calls  # bench's choice, cached, for the same run
    assert set(read_records(out)["compute_dtype"]) == {"float32"}
    assert "cached from" in caplog.text
