"""``speckv profile``: step-level profiling of real speculative decoding, trace and live.

Trace mode (greedy; :mod:`speckv.profile.trace` defines it) decodes the target's greedy
answer once per prompt and runs the draft teacher-forced over it, with the draft's greedy
continuations after every disagreement: one record per answer position, from which any
up-front-γ or stop-per-token policy replays exactly. It runs batched
(:mod:`speckv.profile.batched`): the target's answers ``--target-batch`` prompts at a time,
the draft's side ``--draft-batch`` rows at a time, continuations from the teacher-forced cache.

Live mode runs the real decoder (:mod:`speckv.decode.decoder`) with a γ policy and records
every step with wall-clock times; replaying the same policy on trace records reproduces its
accepted counts.

Output goes to ``OUT.parts/`` (one parquet file per prompt and compression, written
atomically), and is merged into ``OUT`` at the end. **Resuming.** A killed run is resumed by
running the same command again, and gives what an uninterrupted run gives: the prompts are
put into target batches by their length and ``--target-batch`` alone (:func:`plan_batches`),
whatever was already done, and a batch with any part missing is decoded again whole (its
other parts are the same, and kept), since in bfloat16 a prompt's answer depends on which
prompts share its batch. Each part records the settings it was made with
(:func:`part_settings`); a run whose settings differ refuses to reuse them
(:class:`ProfileError`, naming the difference) instead of mixing two profiles. Temporary
files of killed runs are removed (:func:`speckv.atomic.remove_stale_temps`).

Many processes: ``--shard i/n`` profiles every n-th (compression, prompt) job from the i-th;
``--shard auto`` reads the launcher's rank and world size (``RANK``/``WORLD_SIZE`` from
torchrun, ``SLURM_PROCID``/``SLURM_NTASKS`` from srun). Each shard writes
``OUT.shard{i}of{n}.parquet`` (shards share ``OUT.parts/``); ``speckv records merge`` joins
them. In float32/float64 the merged records equal a one-process run's; in bfloat16 a near-tie
may resolve differently in another batch (:mod:`speckv.profile.batched`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speckv.atomic import atomic_write, remove_stale_temps
from speckv.errors import OutputError, SpeckvError
from speckv.machine import fingerprint
from speckv.profile.batched import DRAFT_BATCH, TARGET_BATCH, trace_batch
from speckv.profile.feature_trace import feature_draft_side
from speckv.profile.trace import TraceResult, _target_answer, agreement_runs, trace_rows
from speckv.profile.trace import trace_prompt as _trace_prompt_lm
from speckv.prompts import Prompt, chat_ids
from speckv.records import read_metadata, read_records, write_records

__all__ = ["ProfileError", "ProfileRun", "TraceResult", "agreement_runs", "parse_shard",
           "part_settings", "plan_batches", "run_profile", "trace_prompt", "trace_rows"]

log = logging.getLogger(__name__)


class ProfileError(SpeckvError):
    """Bad profiling input."""


# ------------------------------------------------------------------------------- sharding
#: (rank, world size) variables of the launchers ``--shard auto`` understands, in order.
LAUNCHERS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``"auto"``: the launcher's rank and world size (torchrun's
    RANK/WORLD_SIZE, SLURM's SLURM_PROCID/SLURM_NTASKS), 0/1 without a launcher."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        spec = "0/1"
        for rank, world in LAUNCHERS:
            if rank in os.environ and world in os.environ:
                spec = f"{os.environ[rank]}/{os.environ[world]}"
                break
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ProfileError(f"--shard {spec!r}: write it as i/n (e.g. 0/4) or 'auto'.") from None
    if not (n >= 1 and 0 <= i < n):
        raise ProfileError(f"--shard {spec!r}: need 0 <= i < n.")
    return i, n


# ------------------------------------------------------------------------------------ run
@dataclass
class ProfileRun:
    """What a :func:`run_profile` call produced, and how fast."""

    out: Path | None  # the merged records (this shard's), None when the shard had no prompts
    mode: str
    shard: tuple[int, int]
    records: int = 0  # records this call computed (not those of parts it found done)
    prompts: int = 0
    busy_s: float = 0.0  # seconds spent profiling them (no loading, no cost measurement)
    per_compression: dict = field(default_factory=dict)

    @property
    def records_per_s(self) -> float | None:
        return self.records / self.busy_s if self.busy_s > 0 else None

    def to_json(self) -> dict:
        return {"out": str(self.out) if self.out else None, "mode": self.mode,
                "shard": list(self.shard), "records": self.records, "prompts": self.prompts,
                "busy_s": round(self.busy_s, 3), "records_per_s": self.records_per_s,
                "per_compression": self.per_compression}



def trace_prompt(draft, target, prompt_ids: list[int], max_new_tokens: int, eos: int | None,
                 pad: int) -> TraceResult:
    """One prompt's trace, the plain way (the reference :func:`trace_batch` is tested
    against): :func:`speckv.profile.trace.trace_prompt` for a causal-LM draft, the target's
    answer then :func:`~speckv.profile.feature_trace.feature_draft_side` for a
    feature-conditioned one."""
    if not getattr(draft, "is_feature_draft", False):
        return _trace_prompt_lm(draft, target, prompt_ids, max_new_tokens, eos, pad)
    answer, target_top1 = _target_answer(target, prompt_ids, max_new_tokens, eos)
    return feature_draft_side(draft, target, [prompt_ids], [answer], max_new_tokens,
                              [target_top1])[0].add_lookup(prompt_ids)

def _part_name(compression: str, prompt: Prompt) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt.prompt_id)
    return f"{compression}__{prompt.task}__{safe}.parquet"


# ------------------------------------------------------------------------ parts and resuming
def plan_batches(prompts: list[Prompt], lengths: dict[Prompt, int], mode: str,
                 target_batch: int) -> list[list[Prompt]]:
    """The batches a run decodes ``prompts`` (one compression level's) in: trace mode sorts
    them by prompt length (less padding; ties keep the given order) and cuts the list every
    ``target_batch`` prompts, live mode decodes each alone. Fixed by the prompts, their
    order and ``target_batch``: a resumed run batches every prompt as an uninterrupted one."""
    if mode != "trace":
        return [[p] for p in prompts]
    ordered = sorted(prompts, key=lambda p: lengths[p])
    return [ordered[i : i + target_batch] for i in range(0, len(ordered), target_batch)]


def part_settings(run: dict, prompt: Prompt, batch: list[Prompt]) -> dict:
    """What one prompt's records depend on, recorded in its part file: the run's settings
    (``run``), the prompt's text and, in trace mode, the prompts decoded beside it."""
    text = hashlib.sha256(prompt.text.encode()).hexdigest()[:16]
    together = [p.prompt_id for p in batch] if run["mode"] == "trace" else []
    return {**run, "prompt_sha256": text, "batch": together}


#: how a mismatch in each setting reads, and which flag sets it.
_SETTING_NAMES = {"draft": "--draft", "target": "--target", "compression": "--compression",
                  "mode": "--mode", "max_new_tokens": "--max-new-tokens", "dtype": "--dtype",
                  "device": "--device", "target_batch": "--target-batch",
                  "draft_batch": "--draft-batch", "policy": "--policy",
                  "temperature": "--temperature", "seed": "--seed",
                  "prompt_sha256": "the prompt's text",
                  "batch": "the prompts batched together (--prompts, --per-task, --tasks, "
                           "--shard or --target-batch)"}


def _check_parts(parts: Path, wanted: dict[str, dict]) -> None:
    """Refuse when a finished part of this run was made with other settings; an unreadable
    part is removed (with a warning) and made again."""
    mismatched: list[tuple[str, dict, dict]] = []
    for name, settings in wanted.items():
        path = parts / name
        if not path.is_file():
            continue
        try:
            found = read_metadata(path).get("part")
        except Exception as exc:  # any reader error: the file is not usable
            log.warning("%s cannot be read (%s: %s): profiling that prompt again", path,
                        type(exc).__name__, exc)
            path.unlink(missing_ok=True)
            continue
        if found != settings:
            mismatched.append((name, found or {}, settings))
    if not mismatched:
        return
    name, found, settings = mismatched[0]
    if not found:
        what = "by a speckv that did not record its settings"
    else:
        keys = [k for k in settings if found.get(k) != settings[k]]
        shown = [f"{_SETTING_NAMES.get(k, k)}: {found.get(k)!r} there, {settings[k]!r} here"
                 if k not in ("prompt_sha256", "batch") else _SETTING_NAMES[k] for k in keys]
        what = "with other settings (" + "; ".join(shown) + ")"
    raise ProfileError(
        f"{parts} holds {len(mismatched)} finished part(s) of this run made {what}, e.g. "
        f"{name}. A profile that mixed them would not equal one made in one go. Run again with "
        f"the settings they were made with to resume, or move {parts} away (or pick another "
        "--out) to profile afresh; to add prompts to a finished profile, profile them into "
        "another --out and join both with `speckv records merge`.")


def run_profile(*, draft: str, target: str, compressions: list[str], prompts: list[Prompt],
                out: Path, mode: str = "trace", max_new_tokens: int = 96,
                shard: tuple[int, int] = (0, 1), dtype: str = "bfloat16",
                policy: str = "fixed:4", threads: int | None = None,
                temperature: float = 0.0, seed: int = 0, device: str = "auto",
                target_batch: int = TARGET_BATCH, draft_batch: int = DRAFT_BATCH,
                engine: str = "hf", gguf_targets: dict[str, str] | None = None) -> ProfileRun:
    """Profile prompts x compressions; the merged record file (or the shard's) and its speed.

    ``engine="llamacpp"``: trace mode in llama.cpp (:mod:`speckv.profile.gguf_trace`);
    ``gguf_targets`` maps each compression level to its target GGUF, ``draft`` is the draft
    GGUF, ``target`` names the tokenizer; ``dtype``, ``device`` and the batch sizes do not
    apply (each prompt is traced alone).
    """
    import torch
    from tqdm import tqdm

    from speckv.llm.load import load_tokenizer, resolve_device

    if threads:
        torch.set_num_threads(threads)
    if engine not in ENGINES:
        raise ProfileError(f"Unknown engine {engine!r}: use one of {', '.join(ENGINES)}.")
    if engine == "llamacpp":
        if mode != "trace":
            raise ProfileError("llama.cpp is profiled in trace mode (--mode trace); its live "
                               "runs are measured by `speckv bench --engine llamacpp`.")
        if not gguf_targets or set(gguf_targets) != set(compressions):
            raise ProfileError("--engine llamacpp needs one target GGUF per compression level.")
        target_batch = 1  # llama.cpp traces one prompt at a time
    if mode == "trace" and temperature > 0:
        raise ProfileError("Trace mode profiles greedy decoding (its outcome for every γ rests "
                           "on greedy decoding being lossless). Profile sampling with --mode "
                           "live, which records per-position acceptance probabilities.")
    if target_batch < 1 or draft_batch < 1:
        raise ProfileError("--target-batch and --draft-batch must be at least 1.")
    result = ProfileRun(None, mode, shard)
    jobs = [(c, p) for c in compressions for p in prompts]
    jobs = jobs[shard[0] :: shard[1]]
    if not jobs:
        log.info("shard %d/%d: no prompts fall into this shard (%d jobs in all)", *shard,
                 len(compressions) * len(prompts))
        return result
    parts = out.with_name(out.name + ".parts")
    if shard[1] > 1:
        out = out.with_name(f"{out.stem}.shard{shard[0]}of{shard[1]}{out.suffix}")
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot make {parts}, where the profile keeps its parts "
                          f"({exc.strerror or exc}): pick an --out in a writable folder.") from None
    remove_stale_temps(parts)
    remove_stale_temps(out.parent, out.name)
    # one metadata file per shard: shards may run at the same time in the same folder
    meta_path = parts / f"runs.{shard[0]}of{shard[1]}.json"
    run_meta = _read_run_meta(parts)
    # every prompt's batch and every part's settings before any model loads, so that a
    # mismatch with the parts already there is refused at once
    tokenizer = load_tokenizer(target)
    lengths = {p: len(chat_ids(tokenizer, p.text)) for _, p in jobs}
    if engine == "llamacpp":  # no dtype, device or batches: llama.cpp's file decides
        settings = {"engine": engine, "draft": _model_key(draft), "mode": mode,
                    "max_new_tokens": max_new_tokens}
    else:
        settings = {"draft": _model_key(draft), "target": _model_key(target), "mode": mode,
                    "max_new_tokens": max_new_tokens, "dtype": dtype,
                    "device": resolve_device(device),
                    **({"target_batch": target_batch, "draft_batch": draft_batch}
                       if mode == "trace" else
                       {"policy": policy, "temperature": temperature, "seed": seed})}
    plan, wanted = {}, {}
    for compression in compressions:
        plan[compression] = plan_batches([p for c, p in jobs if c == compression], lengths,
                                         mode, target_batch)
        level = {"compression": compression}
        if engine == "llamacpp":
            level["target"] = _model_key(gguf_targets[compression])
        for batch in plan[compression]:
            for p in batch:
                wanted[_part_name(compression, p)] = part_settings(
                    {**settings, **level}, p, batch)
    _check_parts(parts, wanted)
    drafters: dict = {}  # the draft, loaded once for every level
    for compression in compressions:
        batches = [b for b in plan[compression]
                   if not all((parts / _part_name(compression, p)).exists() for p in b)]
        todo = [p for b in batches for p in b]
        if not todo:
            continue
        opener = _open_llamacpp if engine == "llamacpp" else _open_hf
        level = opener(draft=draft, target=(gguf_targets or {}).get(compression, target),
                       compression=compression, dtype=dtype, device=device, mode=mode,
                       max_new_tokens=max_new_tokens, shard=shard, threads=threads,
                       policy=policy, target_batch=target_batch, draft_batch=draft_batch,
                       cache=drafters)
        run_id = f"{compression}-{uuid.uuid4().hex[:8]}"
        run_meta[run_id] = level.meta
        mine = {k: v for k, v in run_meta.items() if v.get("shard") == list(shard)}
        atomic_write(meta_path, lambda tmp, mine=mine: tmp.write_text(json.dumps(mine, indent=2)))
        ident = {"run_id": run_id, **level.ident}
        ids = {p: chat_ids(tokenizer, p.text) for p in todo}
        rows_done, busy_s = 0, 0.0
        bar = tqdm(total=len(todo), desc=f"{mode} {compression}", unit="prompt")
        for batch in batches:
            started = time.perf_counter()
            if mode == "trace":
                traces = level.trace([ids[p] for p in batch])
                frames = [trace_rows(tr, {**ident, "task": p.task, "prompt_id": p.prompt_id},
                                     level.costs) for p, tr in zip(batch, traces, strict=True)]
            else:
                frames = [level.live(ids[p], p, ident, temperature, seed) for p in batch]
            busy_s += time.perf_counter() - started
            for p, df in zip(batch, frames, strict=True):
                rows_done += len(df)
                name = _part_name(compression, p)
                if not (parts / name).exists():  # else done before, alike: kept as it is
                    write_records(df, parts / name, {"part": wanted[name]})
            bar.update(len(batch))
        bar.close()
        log.info("%s %s: %d records from %d prompts in %.1f s (%.1f records/s)", mode,
                 compression, rows_done, len(todo), busy_s, rows_done / max(busy_s, 1e-9))
        result.records += rows_done
        result.prompts += len(todo)
        result.busy_s += busy_s
        result.per_compression[compression] = {
            "records": rows_done, "prompts": len(todo), "busy_s": round(busy_s, 3),
            "records_per_s": rows_done / busy_s if busy_s > 0 else None}
        level.close()
    files = sorted(parts.glob("*.parquet"))
    result.out = _merge_parts([f for f in files if f.name in wanted], out, run_meta)
    return result


#: the engines a profile runs in
ENGINES = ("hf", "llamacpp")


@dataclass
class _Level:
    """One compression level, loaded: what its records are made with."""

    meta: dict  # the run's metadata (costs, machine, settings)
    ident: dict  # the identity columns of its records (but run_id, task, prompt_id)
    costs: dict  # its cost columns
    trace: Callable[[list[list[int]]], list[TraceResult]]
    live: Callable[..., Any] | None = None
    close: Callable[[], None] = lambda: None


def _open_hf(*, draft, target, compression, dtype, device, mode, max_new_tokens, shard,
             threads, policy, target_batch, draft_batch, cache) -> _Level:
    """A Hugging Face target at ``compression`` and the draft (loaded once, kept in
    ``cache``), with every cost measured."""
    import torch

    from speckv.decode.decoder import measure_step_costs
    from speckv.llm.feature_draft import is_feature_draft
    from speckv.llm.load import load_draft_for, load_model

    tgt = load_model(target, compression, dtype=dtype, device=device)
    if "hf" not in cache:  # in the target's compute dtype, on its device
        cache["hf"] = load_draft_for(draft, tgt, tgt.compute_dtype)
        cache["hf"].model.to(tgt.device)
    drafter = cache["hf"]
    tok = tgt.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # the catch-up forward (over the tokens the last step emitted, more after plain
    # steps; every emitted token for a feature-conditioned draft) is timed too
    cost = measure_step_costs(drafter, tgt)
    meta = {"draft": draft, "target": target, "compression": compression,
            "compute_dtype": tgt.compute_dtype, "draft_dtype": drafter.compute_dtype,
            "device": str(tgt.device), "mode": mode,
            "machine": fingerprint(torch.get_num_threads()), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "cost": cost.to_json(),
            "max_new_tokens": max_new_tokens, "load_s": tgt.load_s, "shard": list(shard),
            **({"target_batch": target_batch, "draft_batch": draft_batch}
               if mode == "trace" else {"policy": policy})}
    ident = {"draft_model": draft,
             "draft_kind": "feature" if is_feature_draft(drafter.model) else "lm",
             "target_model": target, "compression": compression,
             "compute_dtype": tgt.compute_dtype}
    costs = {"cost_draft_s": cost.cost_draft_s, "cost_verify_s": cost.cost_verify_s,
             "cost_catchup_s": cost.cost_catchup_s, "cost_tree_draft_s": cost.cost_tree_draft_s,
             "cost_tree_verify_s": cost.cost_tree_verify_s}

    def trace(batch: list[list[int]]) -> list[TraceResult]:
        return trace_batch(drafter.model, tgt.model, batch, max_new_tokens, eos, pad,
                           target_batch=target_batch, draft_batch=draft_batch)

    def live(ids, prompt, ident, temperature, seed):
        return _live_rows(drafter, tgt, ids, prompt, ident, cost, policy, max_new_tokens,
                          temperature, seed)

    def close() -> None:
        nonlocal tgt
        del tgt

    return _Level(meta, ident, costs, trace, live, close)


def _open_llamacpp(*, draft, target, compression, max_new_tokens, shard, threads, cache,
                   mode, **_) -> _Level:
    """A GGUF target (``target``, the level's file) and the GGUF draft in llama.cpp, with
    llama.cpp's costs measured at :data:`~speckv.decode.costs.CONTEXT_LEN` cached tokens."""
    from speckv.decode.costs import CONTEXT_LEN
    from speckv.engines.llamacpp import GGUFModel, check_pair
    from speckv.profile.gguf_trace import measure, record_costs, trace_gguf

    n_ctx = 1 << max(CONTEXT_LEN + 2 * max_new_tokens + 64, 512).bit_length()
    tgt = GGUFModel(target, n_ctx=n_ctx, threads=threads or 1, what="target")
    if "llamacpp" not in cache:
        cache["llamacpp"] = GGUFModel(draft, n_ctx=n_ctx, threads=threads or 1, what="draft")
    dft = cache["llamacpp"]
    check_pair(dft, tgt)
    measured = measure(tgt, dft, CONTEXT_LEN)
    meta = {"engine": "llamacpp", "draft": str(draft), "target": str(target),
            "compression": compression, "compute_dtype": tgt.file_type,
            "draft_dtype": dft.file_type, "target_desc": tgt.description,
            "device": "cpu", "mode": mode, "machine": fingerprint(tgt.threads),
            "threads": tgt.threads, "date": time.strftime("%Y-%m-%d"),
            "cost": {**record_costs(measured), "context_len": measured["context"],
                     "repeats": measured["repeats"]},
            "max_new_tokens": max_new_tokens, "shard": list(shard)}
    ident = {"draft_model": str(draft), "draft_kind": "lm", "target_model": str(target),
             "compression": compression, "compute_dtype": tgt.file_type}

    def trace(batch: list[list[int]]) -> list[TraceResult]:
        return [trace_gguf(tgt, dft, ids, max_new_tokens) for ids in batch]

    return _Level(meta, ident, record_costs(measured), trace, None, tgt.close)


def _model_key(spec: str) -> str:
    """A model as the settings name it: a folder or file by its absolute path."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _read_run_meta(parts: Path) -> dict:
    """The runs whose parts are in ``parts`` (their costs, machine, settings), every shard's."""
    meta = {}
    for f in sorted(parts.glob("runs.*.json")):
        try:
            meta.update(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise ProfileError(
                f"{f} cannot be read ({type(exc).__name__}: {exc}); it describes the runs that "
                f"made the parts in {parts} (their measured costs and machine). Move {parts} "
                "away to profile afresh.") from None
    return meta


def _merge_parts(files: list[Path], out: Path, run_meta: dict) -> Path:
    if not files:
        raise ProfileError("Nothing was profiled: no prompts fell into this shard.")
    df = read_records(files)
    used = set(df["run_id"])
    return write_records(df, out, {"runs": {k: v for k, v in run_meta.items() if k in used}})


def _live_rows(drafter, tgt, ids, prompt, ident, cost, policy_spec, max_new_tokens,
               temperature: float = 0.0, seed: int = 0):
    """Step records of one live run of the real decoder (mode=live)."""
    from speckv.decode.decoder import SpeculativeDecoder, records_frame
    from speckv.policies import from_spec

    policy = from_spec(policy_spec)
    if policy is None:
        raise ProfileError("--policy ar decodes without a draft: profile a drafting policy "
                           "(fixed:K, heuristic, confidence:T, onnx:PATH).")
    decoder = SpeculativeDecoder(drafter, tgt, policy, costs=cost, run_id=ident["run_id"])
    result = decoder.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, task=prompt.task, prompt_id=prompt.prompt_id)
    df = records_frame(result.steps)
    for key, value in ident.items():
        df[key] = value
    return df
