"""The runtime's exceptions: one class per way a controller file or a call can be wrong.

All derive from :class:`ControllerError`, itself a :class:`speckv.errors.SpeckvError`, so the
command line prints their message and exits with status 2, and an embedding decoder can catch
the whole family at once. Each message says what differs and what to do about it.
"""

from __future__ import annotations

from speckv.errors import SpeckvError


class ControllerError(SpeckvError):
    """Base of every error the runtime controller raises."""


class ControllerNotFoundError(ControllerError, FileNotFoundError):
    """The controller path does not exist or is not a file."""


class ControllerFormatError(ControllerError):
    """The file is not ONNX, not a speckv controller, or its metadata or signature is broken."""


class IncompatibleVersionError(ControllerError):
    """The file's speckv format version is not the one this runtime reads."""


class FeatureMismatchError(ControllerError):
    """The controller expects other feature names, or another order, than the caller builds."""


class CandidateMismatchError(ControllerError):
    """The controller chooses among other candidate γs than the caller expects."""


class BadInputError(ControllerError, ValueError):
    """A call's features or costs have the wrong shape, are not finite, or costs are <= 0."""
