"""The one base class of speckv's user-facing errors (torch-free, imported by the runtime)."""


class SpeckvError(Exception):
    """An error whose message tells the user what is wrong and what to do.

    The command line prints the message alone (no traceback) and exits with status 2.
    """
