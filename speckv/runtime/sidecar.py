"""The controller's metadata beside the file, as JSON, for clients that cannot read ONNX metadata.

onnxruntime's Python, C and C++ APIs hand a program the file's ``metadata_props``; some of
its other bindings (onnxruntime-node, for one) do not. So ``speckv export`` also writes
``NAME.json`` beside ``NAME.onnx``::

    {"onnx": "speckv.onnx", "bytes": 20480, "sha256": "<hex digest of the .onnx file>",
     "metadata_props": {"speckv.format_version": "2", "speckv.feature_names": "[...]", ...}}

``metadata_props`` holds the file's ``speckv.*`` entries exactly as the file holds them
(strings; lists as JSON text), so a client checks the same keys whichever way it reads them,
and ``sha256`` ties the JSON to the bytes of the file beside it: a client that finds another
digest has a file re-exported without its JSON, or the JSON of another file.
:func:`check_sidecar` checks both.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final

from speckv.atomic import atomic_write
from speckv.runtime import onnx_proto
from speckv.runtime.contract import KEY_PREFIX
from speckv.runtime.errors import ControllerFormatError

SUFFIX: Final = ".json"


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """Where the JSON of ``NAME.onnx`` lives: ``NAME.json`` beside it."""
    return Path(onnx_path).with_suffix(SUFFIX)


def sidecar_for(data: bytes, name: str) -> dict[str, Any]:
    """The JSON object for a controller file's bytes ``data`` named ``name``."""
    try:
        metadata = onnx_proto.parse_model(data, graph=False).metadata
    except onnx_proto.ProtoError as exc:
        raise ControllerFormatError(f"{name} is not an ONNX model ({exc}).") from None
    return {"onnx": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "metadata_props": {k: v for k, v in sorted(metadata.items())
                               if k.startswith(KEY_PREFIX)}}


def write_sidecar(onnx_path: str | os.PathLike[str]) -> Path:
    """Write ``NAME.json`` for ``NAME.onnx`` (atomically); return its path."""
    onnx_path = Path(onnx_path)
    text = json.dumps(sidecar_for(onnx_path.read_bytes(), onnx_path.name), indent=2) + "\n"
    out = sidecar_path(onnx_path)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return out


def check_sidecar(onnx_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of ``NAME.json`` once it is known to describe ``NAME.onnx``.

    Raises :class:`~speckv.runtime.errors.ControllerFormatError` when the JSON is absent,
    unreadable, or describes other bytes or other metadata than the file's.
    """
    onnx_path = Path(onnx_path)
    path = sidecar_path(onnx_path)
    redo = (f"Write it for this file (`python -c \"from speckv.runtime.sidecar import "
            f"write_sidecar; write_sidecar('{onnx_path}')\"`), or export both again "
            f"(`python -m speckv export --out {onnx_path}`).")
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ControllerFormatError(f"Cannot read {path} ({exc}). {redo}") from None
    want = sidecar_for(onnx_path.read_bytes(), onnx_path.name)
    for key in ("sha256", "metadata_props"):
        if not isinstance(found, dict) or found.get(key) != want[key]:
            raise ControllerFormatError(f"{path} does not describe {onnx_path}: its {key} "
                                        f"differs from the file's. {redo}")
    return want["metadata_props"]
