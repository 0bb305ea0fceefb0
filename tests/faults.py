"""Helpers of the fault-injection tests: run a command in a child process that kills itself
at a chosen write (``speckv.atomic``'s test-only hook), find the temporary files a run left,
and make a folder unwritable even for root."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from locations import ROOT

from speckv.atomic import KILL_ENV, TEMP_NAME


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a speckv child process: this checkout first on the path, one
    thread, no launcher variables (a test runner's would make it a shard)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", KILL_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})
    return env


def run_speckv(args: list[str], *, module: str = "speckv", kill_at: str | None = None,
               cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a child process; with ``kill_at`` (``GLOB[@N]``) it
    SIGKILLs itself in the N-th atomic write of a matching file, before the rename."""
    extra = {KILL_ENV: kill_at} if kill_at else {}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=cwd, env={**child_env(**extra), **(env or {})},
                          timeout=timeout)


def was_killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def temp_files(*folders: Path) -> list[Path]:
    """Every ``.NAME.XXXXXXXX.tmp`` file :func:`speckv.atomic.atomic_write` names, under
    ``folders`` (recursively)."""
    return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*")
                  if TEMP_NAME.match(p.name))


@contextlib.contextmanager
def unwritable(folder: Path, monkeypatch):
    """``folder`` read-only for this process. Root ignores permission bits, so as root the
    temporary file's creation there fails as the kernel would fail it for anyone else."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(13, "Permission denied",
                                      str(Path(dir) / f"{kwargs.get('prefix', '')}x9nexha0.tmp"))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr("speckv.atomic.tempfile.mkstemp", refuse)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
