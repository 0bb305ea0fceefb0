"""``--dtype auto``: the compute dtype of a target's unquantized weights, measured on this machine.

Which of ``bfloat16`` and ``float32`` is faster on a CPU depends on the CPU: with AVX-512
BF16 or AMX bfloat16 matrix products run natively and beat float32; with AVX2 only they are
emulated, a plain one-token step is slower in bfloat16 than in float32 and a verify forward
over several tokens grows faster with its length. No static rule gets both right, so
:func:`choose_dtype` loads the target in each candidate dtype, times what decoding does with
it, picks one, and caches the decision (JSON under ``speckv.paths.cache_dir()/dtype/``) keyed
by target, compression, threads, torch version and the machine fingerprint
(:data:`speckv.machine.COST_KEYS`): a later start-up on the same machine reads the file, any
other machine or thread count measures again. A choice timed while other work loaded the
machine (:func:`machine_busy`) is used for that run and not cached: the two dtypes were timed
at different moments, so the comparison says more about the load than about the CPU.

**What is timed** (:func:`measure_target`, with :func:`speckv.decode.costs.lm_forward`, the
decoder's own forward call, after a context of :data:`~speckv.decode.costs.CONTEXT_LEN`
tokens): a plain step (a target forward over 1 token) and verify forwards over ``2 ..
GAMMA_MAX + 1`` tokens (γ = 1 .. GAMMA_MAX drafted tokens plus the last emitted one).

**The criterion** (:func:`pick`): the fewest expected target seconds per emitted token
(:func:`seconds_per_token`): plain steps, or the best fixed γ when each drafted token is
accepted with probability :data:`REFERENCE_ACCEPTANCE` given the ones before it. Verification
is what speculation buys tokens with, so a dtype whose plain step is a little cheaper but whose
verify forward grows fast with its length (float32 on an AMX CPU: 52 ms for one token, 111 ms
for nine, against bfloat16's 56 and 64) decodes slower once drafts are accepted. Candidates
within :data:`NEAR_TIE` (3 %) per token are told apart by the cheaper plain step, the floor
when speculation does not pay (the controller can always decline to speculate).

**Scope.** On CUDA nothing is measured: the static rule of
:func:`speckv.llm.load.static_dtype` (bfloat16 where the GPU has it, else float16). The
choice applies to unquantized weights (``fp16`` compression) and to the modules int8/nf4 leave
unquantized (embeddings, norms, the head), each compression measured on its own since the
quantized layers change the balance. nf4's 4-bit matrix products keep their own compute
dtype (bfloat16 on a CPU, :func:`speckv.llm.load.load_model`); int8 (LLM.int8) runs in both.
The draft is loaded in the dtype chosen for the target (the command lines do so); it is not
timed here: a draft step is a small share of a step and follows the same CPU.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from speckv.atomic import atomic_write, file_lock, remove_stale_temps
from speckv.decode.costs import CONTEXT_LEN, lm_forward, new_cache
from speckv.errors import SpeckvError
from speckv.machine import COST_KEYS, mismatch
from speckv.machine import fingerprint as machine_fingerprint
from speckv.paths import cache_dir
from speckv.runtime.features import GAMMA_MAX

log = logging.getLogger(__name__)

#: the compute dtypes ``auto`` chooses between on a CPU (float16 is slow there).
CANDIDATES: Final = ("bfloat16", "float32")
#: seconds per token closer than this (relative) are a tie, broken by the plain step.
NEAR_TIE: Final = 0.03
#: the per-token acceptance the choice assumes: the demo draft agrees with the target on
#: about 0.6 of held-out positions (a draft that agrees less moves the choice toward the
#: cheaper plain step, which stays the floor)
REFERENCE_ACCEPTANCE: Final = 0.6
#: token counts of the timed forwards: 1 (a plain step), 2 .. GAMMA_MAX + 1 (verifications).
TOKENS: Final = tuple(range(1, GAMMA_MAX + 2))
#: timed rounds over all token counts (the median is kept) and untimed rounds before them.
REPEATS: Final = 5
WARMUP: Final = 1
#: load average beyond the measuring threads, per core, above which a choice is not cached.
BUSY_LOAD: Final = 0.5
#: bump when the cache's layout or key changes (older files are then re-measured).
DTYPE_CACHE_FORMAT: Final = 1
#: the cache folder under :func:`speckv.paths.cache_dir`.
DTYPE_CACHE_DIR: Final = "dtype"


class DtypeError(SpeckvError, ValueError):
    """``--dtype auto`` could not choose; the message says what to pass instead."""


@dataclass
class DtypeCosts:
    """Seconds of the target's forwards in one compute dtype: ``plain_s`` over 1 token,
    ``verify_s[i]`` over ``i + 2`` tokens (γ = i + 1 drafted tokens)."""

    dtype: str
    plain_s: float
    verify_s: list[float]

    def __post_init__(self) -> None:
        values = [float(self.plain_s), *map(float, self.verify_s)]
        if not self.verify_s or not all(np.isfinite(v) and v > 0 for v in values):
            raise DtypeError(f"{self.dtype}: costs must be positive seconds, got plain "
                             f"{self.plain_s!r} and verify {self.verify_s!r}.")
        self.plain_s, self.verify_s = values[0], values[1:]

    @property
    def mean_verify_s(self) -> float:
        return float(statistics.fmean(self.verify_s))

    def describe(self) -> str:
        return (f"{self.dtype} plain step {self.plain_s * 1e3:.1f} ms, verify "
                f"{self.verify_s[0] * 1e3:.1f}..{self.verify_s[-1] * 1e3:.1f} ms "
                f"(mean {self.mean_verify_s * 1e3:.1f}) over 2..{len(self.verify_s) + 1} tokens")


@dataclass
class DtypeChoice:
    """What ``--dtype auto`` chose and why. ``measured``: the figures it rests on (empty for
    the static CUDA rule); ``failed``: candidates that did not run here, with the error;
    ``cache``: the file the choice was read from or written to; ``cached``: read, not
    measured now."""

    dtype: str
    reason: str
    target: str
    compression: str
    device: str = "cpu"
    threads: int | None = None
    measured: dict[str, DtypeCosts] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    cache: Path | None = None
    cached: bool = False
    measured_at: str | None = None
    measure_s: float | None = None

    def describe(self) -> str:
        """One log line: the choice, the rule or figures behind it, and where it is cached."""
        run = [self.compression, self.device]
        if self.threads:
            run.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        head = f"--dtype auto: {self.dtype} for {self.target} ({', '.join(run)})"
        if not self.measured:
            return f"{head}: {self.reason}"
        figures = "; ".join(c.describe() for c in self.measured.values())
        failed = "".join(f"; {d} failed here ({why})" for d, why in self.failed.items())
        if self.cached:
            where = f"cached from {self.cache} (measured {self.measured_at})"
        else:
            where = (f"measured in {self.measure_s:.1f} s, cached in {self.cache}"
                     if self.cache else "measured")
        return f"{head}: {self.reason} [{figures}{failed}]; {where}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["cache"] = str(self.cache) if self.cache else None
        return out


def seconds_per_token(costs: DtypeCosts, acceptance: float = REFERENCE_ACCEPTANCE
                      ) -> tuple[float, int]:
    """Expected target seconds per emitted token under the best fixed γ (0 = plain steps),
    when each drafted token is accepted with probability ``acceptance`` given the ones before
    it: a step verifying γ drafted tokens emits ``1 + a + ... + a^γ`` tokens on average.
    Returns the seconds and that γ (drafting costs are left out: the draft is the same in
    both dtypes and a small share of a step)."""
    best, best_gamma = costs.plain_s, 0
    for i, verify in enumerate(costs.verify_s):
        gamma = i + 1
        tokens = sum(acceptance**k for k in range(gamma + 1))
        if verify / tokens < best:
            best, best_gamma = verify / tokens, gamma
    return best, best_gamma


def pick(measured: dict[str, DtypeCosts], near_tie: float = NEAR_TIE,
         acceptance: float = REFERENCE_ACCEPTANCE) -> tuple[str, str]:
    """The dtype to decode in, and why: the lowest expected seconds per token
    (:func:`seconds_per_token` at ``acceptance``: plain steps, or the best fixed γ);
    candidates within ``near_tie`` (relative) of it are a tie, won by the cheaper plain step
    (the floor when speculation does not pay)."""
    if not measured:
        raise DtypeError("No candidate dtype was measured.")
    per_token = {d: seconds_per_token(c, acceptance) for d, c in measured.items()}
    if len(measured) == 1:
        return next(iter(measured)), "the only candidate that ran here"
    fastest = min(per_token, key=lambda d: per_token[d][0])
    close = [d for d in measured if per_token[d][0] <= per_token[fastest][0] * (1 + near_tie)]

    def figures(d: str) -> str:
        secs, gamma = per_token[d]
        how = "plain steps" if gamma == 0 else f"γ={gamma}"
        return f"{secs * 1e3:.1f} ms/token {d} ({how})"

    if len(close) == 1:
        others = ", ".join(figures(d) for d in measured if d != fastest)
        return fastest, (f"the fewer target seconds per token at acceptance {acceptance:g} "
                         f"({figures(fastest)} vs {others})")
    best = min(close, key=lambda d: (measured[d].plain_s, per_token[d][0]))
    return best, (f"within {near_tie:.0%} per token at acceptance {acceptance:g} ("
                  + ", ".join(figures(d) for d in close) + "), the cheaper plain step "
                  f"({measured[best].plain_s * 1e3:.1f} ms {best})")


def measure_target(model: torch.nn.Module, dtype: str = "", *, context_len: int = CONTEXT_LEN,
                   tokens: tuple[int, ...] = TOKENS, repeats: int = REPEATS,
                   warmup: int = WARMUP) -> DtypeCosts:
    """Time the target's forwards over ``tokens`` tokens after a ``context_len`` context; the
    median of ``repeats`` rounds after ``warmup``. Each timed call is cropped back (untimed),
    as the decoder's rollback would; token counts are timed round-robin, so a burst of
    background load spreads over all of them (as :func:`speckv.decode.costs.measure_costs`)."""
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    context = rng.integers(3, vocab, size=context_len).tolist()
    probe = rng.integers(3, vocab, size=max(tokens)).tolist()
    cache = new_cache(model)
    lm_forward(model, context, cache)

    def call(n: int) -> float:
        started = time.perf_counter()
        lm_forward(model, probe[:n], cache, keep=n)
        took = time.perf_counter() - started
        cache.crop(-n)
        return took

    for _ in range(warmup):
        for n in tokens:
            call(n)
    times: dict[int, list[float]] = {n: [] for n in tokens}
    for _ in range(max(repeats, 1)):
        for n in tokens:
            times[n].append(call(n))
    medians = [statistics.median(times[n]) for n in tokens]
    return DtypeCosts(dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
                      medians[0], medians[1:])


def measure_dtype(target: str, compression: str, dtype: str, *, repeats: int = REPEATS,
                  warmup: int = WARMUP, context_len: int = CONTEXT_LEN) -> DtypeCosts:
    """Load ``target`` at ``compression`` in ``dtype`` on the CPU and :func:`measure_target`
    it (the model is dropped afterwards: one candidate in memory at a time)."""
    from speckv.llm.load import load_model

    lm = load_model(target, compression, dtype=dtype, device="cpu")
    try:
        return measure_target(lm.model, dtype, context_len=context_len, repeats=repeats,
                              warmup=warmup)
    finally:
        del lm
        gc.collect()


# -------------------------------------------------------------------------------- caching
def target_identity(target: str) -> dict[str, Any]:
    """What names a target in the cache key: the spec, where it resolves to, and the size of
    its files (another model saved at the same path is measured again)."""
    from speckv.llm.weights import resolve

    where = resolve(target)
    size = None
    if isinstance(where, Path):
        where = where.resolve()
        files = [where] if where.is_file() else [f for f in where.iterdir() if f.is_file()]
        size = sum(f.stat().st_size for f in files)
    return {"spec": target, "where": str(where), "bytes": size}


def _key(identity: dict[str, Any], compression: str, threads: int,
         machine: dict[str, Any]) -> dict[str, Any]:
    return {"format": DTYPE_CACHE_FORMAT, "target": identity, "compression": compression,
            "threads": threads, "torch": torch.__version__, "candidates": list(CANDIDATES),
            "tokens": list(TOKENS), "near_tie": NEAR_TIE,
            "machine": {k: machine.get(k) for k in COST_KEYS}}


def cache_path(key: dict[str, Any], directory: str | Path | None = None) -> Path:
    """``<cache>/dtype/<target>-<compression>-t<threads>-<digest>.json`` for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(key["target"]["spec"])).name)[:48]
    folder = Path(directory) if directory is not None else cache_dir() / DTYPE_CACHE_DIR
    return folder / f"{name}-{key['compression']}-t{key['threads']}-{digest[:16]}.json"


def _read_cache(path: Path, key: dict[str, Any], machine: dict[str, Any],
                quiet: bool = False) -> DtypeChoice | None:
    """The cached choice at ``path`` when it was made for ``key`` on this machine; ``None``
    (logged) when the file is missing, unreadable, or made for another run or machine."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        problems = []
        if stored.get("key") != json.loads(json.dumps(key, default=str)):
            problems.append("made for another target, compression, threads or torch")
        problems += [f"machine {m}" for m in mismatch(stored.get("machine"), machine)]
        if not problems:
            choice = stored["choice"]
            if choice["dtype"] not in CANDIDATES:
                raise ValueError(f"dtype {choice['dtype']!r} is not a candidate")
            return DtypeChoice(
                dtype=choice["dtype"], reason=str(choice["reason"]),
                target=key["target"]["spec"], compression=key["compression"],
                threads=key["threads"],
                measured={d: DtypeCosts(**c) for d, c in choice["measured"].items()},
                failed=dict(choice.get("failed") or {}), cache=path, cached=True,
                measured_at=stored.get("measured_at"), measure_s=choice.get("measure_s"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SpeckvError) as exc:
        problems = [f"unreadable ({type(exc).__name__}: {exc})"]
    if not quiet:
        log.warning("--dtype auto: the cached choice %s is not usable here (%s): measuring "
                    "again.", path, "; ".join(problems))
    return None


def choose_dtype(target: str, compression: str = "fp16", *, device: str = "cpu",
                 threads: int | None = None, refresh: bool = False,
                 directory: str | Path | None = None,
                 measure: Callable[[str, str, str], DtypeCosts] | None = None,
                 fingerprint: dict[str, Any] | None = None) -> DtypeChoice:
    """The compute dtype for ``target`` at ``compression`` on this machine (module docstring).

    On a CPU: the cached choice for this target, compression, thread count and machine if
    there is one, else each of :data:`CANDIDATES` measured (``measure(target, compression,
    dtype) -> DtypeCosts``, default :func:`measure_dtype`), :func:`pick` ed and cached
    atomically. A cache file that is unreadable, or was made for another machine (its
    fingerprint, :func:`speckv.machine.mismatch`), is measured again and replaced; so is any
    with ``refresh``. A candidate that fails to load or run here is left out (and named);
    :class:`DtypeError` when none runs. ``threads``: run the measurement with that many torch
    threads (default: torch's current count); ``directory``: the cache folder;
    ``fingerprint``: this machine's (default :func:`speckv.machine.fingerprint`).
    On CUDA: :func:`speckv.llm.load.static_dtype`, nothing measured or cached.
    """
    from speckv.llm.load import check_compression, resolve_device, static_dtype

    check_compression(compression)
    device = resolve_device(device)
    if device != "cpu":
        dtype = static_dtype(device)
        return DtypeChoice(dtype, f"static rule on {device} (bfloat16 where the GPU has it, "
                           "else float16; not measured)", target, compression, device)
    threads = threads or torch.get_num_threads()
    machine = fingerprint or machine_fingerprint(threads)
    key = _key(target_identity(target), compression, threads, machine)
    path = cache_path(key, directory)
    if not refresh:
        cached = _read_cache(path, key, machine)
        if cached is not None:
            return cached
    # processes starting together (shards) measure once, one at a time
    with file_lock(path.with_suffix(".lock")):
        remove_stale_temps(path.parent, path.name)  # a killed measurement's
        if not refresh:
            cached = _read_cache(path, key, machine, quiet=True)
            if cached is not None:
                return cached
        return _measure_and_cache(target, compression, device, threads, key, machine, path,
                                  measure or measure_dtype)


def machine_busy(threads: int) -> float | None:
    """The 1-minute load average when other work competes for the cores (more than
    :data:`BUSY_LOAD` per core beyond the measuring threads), else ``None``."""
    load = os.getloadavg()[0]
    return load if load - threads > BUSY_LOAD * (os.cpu_count() or 1) else None


def _measure_and_cache(target: str, compression: str, device: str, threads: int,
                       key: dict[str, Any], machine: dict[str, Any], path: Path,
                       measure: Callable[[str, str, str], DtypeCosts]) -> DtypeChoice:
    from speckv.llm.weights import ModelError

    before = torch.get_num_threads()
    busy_before = machine_busy(threads)
    measured: dict[str, DtypeCosts] = {}
    failed: dict[str, str] = {}
    started = time.perf_counter()
    torch.set_num_threads(threads)
    try:
        for dtype in CANDIDATES:
            try:
                measured[dtype] = measure(target, compression, dtype)
            except ModelError:
                raise  # the target itself cannot be loaded: no dtype would help
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                failed[dtype] = f"{type(exc).__name__}: {first}"
                log.warning("--dtype auto: %s does not run here for %s (%s)", dtype, target,
                            failed[dtype])
    finally:
        torch.set_num_threads(before)
    if not measured:
        raise DtypeError(f"--dtype auto: no candidate dtype runs {target!r} at {compression} "
                         "here (" + "; ".join(f"{d}: {w}" for d, w in failed.items())
                         + "). Pass --dtype explicitly.")
    dtype, reason = pick(measured)
    took = time.perf_counter() - started
    choice = DtypeChoice(dtype, reason, target, compression, device, threads, measured, failed,
                         path, False, time.strftime("%Y-%m-%dT%H:%M:%S%z"), took)
    record = {"format": DTYPE_CACHE_FORMAT, "key": key, "machine": machine,
              "measured_at": choice.measured_at,
              "choice": {"dtype": dtype, "reason": reason, "measure_s": round(took, 3),
                         "measured": {d: asdict(c) for d, c in measured.items()},
                         "failed": failed}}
    text = json.dumps(record, indent=2, default=str) + "\n"
    busy = busy_before or machine_busy(threads)
    if busy is not None:
        # timed while other processes competed for the cores: the two dtypes were timed at
        # different moments, so the comparison is noise; use it now, measure again next time
        log.warning("--dtype auto: the machine was busy while measuring (load average %.1f "
                    "on %d cores): %s is used for this run and not cached", busy,
                    os.cpu_count() or 1, dtype)
        choice.cache = None
        return choice
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:  # a read-only cache: the choice stands, it is measured next time
        log.warning("--dtype auto: could not cache the choice in %s (%s)", path, exc)
        choice.cache = None
    return choice


def resolve_dtype(dtype: str, target: str, compression: str = "fp16", *,
                  device: str = "auto", threads: int | None = None,
                  **kwargs: Any) -> tuple[str, DtypeChoice | None]:
    """``dtype`` itself unless it is ``auto``; for ``auto`` the :func:`choose_dtype` choice
    (and the choice, to log). What the command lines call before loading the target."""
    if dtype != "auto":
        return dtype, None
    choice = choose_dtype(target, compression, device=device, threads=threads, **kwargs)
    return choice.dtype, choice
