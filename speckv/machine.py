"""The machine a figure was measured on: CPU model, the instruction sets that change speed
here, threads and library versions.

CPUs of one kind differ: bfloat16 matrix products run natively with AVX-512 BF16 or AMX and
are emulated with AVX2 only, and bitsandbytes' 4-bit CPU path is much slower without
AVX-512. So every record file, cost model and benchmark report carries :func:`fingerprint`,
and a cost model measured on another machine is refused (:func:`mismatch`).

Standard library only (no torch import): the runtime and the base install can call it.
``ATEN_CPU_CAPABILITY`` (which caps the kernels torch dispatches to) is recorded too, since
it changes speed as much as the CPU does.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import cache
from importlib import metadata
from typing import Any, Final

#: CPU flags that matter for speckv's speed (as /proc/cpuinfo spells them).
ISA_FLAGS: Final = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
#: libraries whose versions change numerics or speed.
LIBRARIES: Final = ("torch", "transformers", "bitsandbytes", "onnxruntime", "numpy")
#: the fields that must agree for a measured cost to be reused on this machine.
COST_KEYS: Final = ("cpu", "isa", "aten_cpu_capability", "threads", "torch", "bitsandbytes")


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return model, flags


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of this machine (``threads``: the compute threads in use)."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY") or "auto",
        "cores": os.cpu_count(),
        "threads": threads,
        "python": sys.version.split()[0],
        **{lib: _version(lib) for lib in LIBRARIES},
    }


def describe(fp: dict[str, Any]) -> str:
    """One line for a table's caption: ``Intel Xeon … (avx2, avx512f, amx), 2 cores, 1 thread``."""
    isa = [f for f, on in fp.get("isa", {}).items() if on]
    cap = fp.get("aten_cpu_capability")
    parts = [f"{fp.get('cpu', '?')} ({', '.join(isa) or 'no AVX2'})"]
    if cap and cap != "auto":
        parts.append(f"ATEN_CPU_CAPABILITY={cap}")
    parts.append(f"{fp.get('cores', '?')} cores")
    if fp.get("threads"):
        parts.append(f"{fp['threads']} thread{'s' if fp['threads'] != 1 else ''}")
    parts.append(f"torch {fp.get('torch')}")
    return ", ".join(parts)


def mismatch(recorded: dict[str, Any] | None, current: dict[str, Any] | None = None) -> list[str]:
    """What differs between a recorded fingerprint and this machine, for the fields that
    change measured costs (:data:`COST_KEYS`); empty when they agree. A record without a
    fingerprint (made before speckv wrote one) is a mismatch."""
    if not recorded:
        return ["no machine fingerprint"]
    current = current or fingerprint()
    return [f"{key}: {recorded.get(key)!r} there, {current.get(key)!r} here"
            for key in COST_KEYS if recorded.get(key) != current.get(key)]
