"""Write files so that readers never see half of one: temporary file, then rename.

stdlib only (the torch-free runtime may import it). The temporary file lives in the target's
folder, so the rename is atomic; it gets the permissions a plain ``open(path, "w")`` would
(``mkstemp`` makes files private), and it is removed when writing fails, leaving any existing
file untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def new_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then rename it to ``path``.

    ``write`` may also check what it wrote and raise: nothing is renamed then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, new_file_mode())
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
