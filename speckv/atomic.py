"""Write files so that readers never see half of one: temporary file, then rename.

stdlib only (the torch-free runtime may import it). The temporary file lives in the target's
folder, so the rename is atomic; it gets the permissions a plain ``open(path, "w")`` would
(``mkstemp`` makes files private), and it is removed when writing fails, leaving any existing
file untouched. A write that cannot happen (a folder that is not writable, a full disk) ends
in :class:`~speckv.errors.OutputError`, which names the file the user asked for, not the
temporary one.

**Temporary files of killed runs.** A process killed while writing leaves its temporary file,
``.NAME.XXXXXXXX.tmp`` beside ``NAME``. :func:`remove_stale_temps` removes them: a job calls it
for the folders it writes before it writes there. It removes only files of that pattern that
were last written before this process began (:data:`STARTED`) and that no live process is
writing: :func:`atomic_write` holds an exclusive ``flock`` on its temporary file from its
creation to its rename, the kernel drops that lock when the writer dies, and a file whose lock
can be taken is therefore an orphan. (Where the file system has no ``flock``, the age alone
decides.)

**Fault injection (tests).** ``SPECKV_KILL_BEFORE_RENAME=GLOB[@N]`` makes the process kill
itself with SIGKILL inside the N-th (default first) :func:`atomic_write` of a file whose name
matches ``GLOB``, after the temporary file is complete and before the rename: the worst moment
a ``kill -9`` can hit. The fault-injection tests use it to stop each long job at chosen points.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from speckv.errors import OutputError, SpeckvError

try:  # POSIX; elsewhere temporary files are told apart by age alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: when this process began using speckv's file writing (this module's import): a temporary
#: file last written before then cannot be one this process is writing.
STARTED: Final = time.time()
#: what ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")`` names a temporary file.
TEMP_NAME: Final = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
#: the test-only fault-injection variable (module docstring).
KILL_ENV: Final = "SPECKV_KILL_BEFORE_RENAME"

_kill_counts: dict[str, int] = {}


def new_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        todo = f"make {path.parent} writable for this user, or choose another output path"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = f"free space on the disk that holds {path.parent}, or write elsewhere"
    else:
        todo = "check the path, or choose another output path"
    return OutputError(f"Cannot write {path}: {reason} ({path.parent}). Nothing was written "
                       f"there and any previous {path.name} is left as it was; {todo}, then "
                       "run the same command again.")


def _maybe_kill(path: Path) -> None:
    """The fault-injection hook (module docstring): SIGKILL this process at the chosen write."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("@")
    if not fnmatch.fnmatch(path.name, pattern):
        return
    _kill_counts[pattern] = _kill_counts.get(pattern, 0) + 1
    if _kill_counts[pattern] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then rename it to ``path``.

    ``write`` may also check what it wrote and raise: nothing is renamed then. An
    :class:`OSError` on the way (the folder is not writable, the disk is full) becomes an
    :class:`~speckv.errors.OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    tmp = Path(name)
    try:
        if fcntl is not None:  # held until the rename: the file is a live writer's
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.chmod(tmp, new_file_mode())
        write(tmp)
        _maybe_kill(path)
        os.replace(tmp, path)
    except SpeckvError:
        raise  # ``write``'s own verdict, already one paragraph
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)
    return path


def _orphaned(path: Path) -> bool:
    """Whether no live process holds ``path``'s lock (see :func:`atomic_write`)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:
        return True  # no flock on this file system: the age decides
    finally:
        os.close(fd)  # closing drops the lock we took
    return True


def remove_stale_temps(folder: str | Path, names: str = "*") -> list[Path]:
    """Remove the temporary files that killed runs left in ``folder``; return them.

    Only files named as :func:`atomic_write` names them, ``.NAME.XXXXXXXX.tmp`` with ``NAME``
    matching the glob ``names``, last modified before this process began (:data:`STARTED`)
    and locked by no live process. Anything else is left alone, so a job may call this for
    every folder it writes, also one that other processes write at the same time.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMP_NAME.match(entry.name)
        if not match or not fnmatch.fnmatch(match["name"], names):
            continue
        try:
            if not entry.is_file() or entry.stat().st_mtime >= STARTED:
                continue
        except OSError:
            continue
        if _orphaned(entry):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) that an interrupted run left in %s: %s",
                 len(removed), folder, ", ".join(p.name for p in removed[:5])
                 + (", ..." if len(removed) > 5 else ""))
    return removed


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block: one
    process at a time in the block, across processes, released when the holder exits or dies.
    Without ``fcntl``, or where the lock file cannot be made, the block runs unlocked."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield
        return
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock


def made_once(path: str | Path, make: Callable[[Path], object]) -> Path:
    """``path``, made by ``make(path)`` unless it is there already: one process makes it while
    others started together wait for it (a lock beside the file), and ``make`` writes it
    atomically, so a file found there is whole."""
    path = Path(path)
    with file_lock(path.parent / f".{path.name}.lock"):
        if not path.is_file():
            make(path)
    return path
