"""The base class of speckv's user-facing errors, and the error of an output that cannot be
written (torch-free, imported by the runtime)."""


class SpeckvError(Exception):
    """An error whose message tells the user what is wrong and what to do.

    The command line prints the message alone (no traceback) and exits with status 2.
    """


class OutputError(SpeckvError, OSError):
    """An output file could not be written (a folder that is not writable, a full disk); the
    message names the file the user asked for and what to do."""
