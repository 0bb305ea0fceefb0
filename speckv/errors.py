"""The base class of speckv's user-facing errors, and the error of an output that cannot be
written (torch-free, imported by the runtime)."""

import errno


class SpeckvError(Exception):
    """An error whose message tells the user what is wrong and what to do.

    The command line prints the message alone (no traceback) and exits with status 2.
    """


class OutputError(SpeckvError, OSError):
    """An output file could not be written (a folder that is not writable, a full disk); the
    message names the file the user asked for and what to do."""


#: errno values of an environment that refuses a write (never a bug in speckv): permission
#: denied, a read-only file system, a full disk or quota.
REFUSED_WRITES = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def refused_write(exc: BaseException) -> str | None:
    """One paragraph for an :class:`OSError` the environment caused (see
    :data:`REFUSED_WRITES`) and that no speckv code turned into an :class:`OutputError`
    (a library creating its own folder), or ``None`` for any other exception."""
    if not isinstance(exc, OSError) or exc.errno not in REFUSED_WRITES:
        return None
    where = exc.filename or "a file"
    return (f"Cannot write {where}: {exc.strerror or exc}. Make that folder writable (or free "
            "space on its disk), or write elsewhere, then run the same command again.")


def refusal(exc: BaseException) -> str | None:
    """What a command prints before it exits 2: a :class:`SpeckvError`'s own paragraph, or
    :func:`refused_write`'s for a write the environment refused; ``None`` for anything else
    (a bug, which should raise with its traceback)."""
    if isinstance(exc, SpeckvError):
        return str(exc)
    return refused_write(exc)
