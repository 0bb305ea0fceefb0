"""Every default path of speckv, in one place.

Relative defaults name the project's layout (``datamodules/``, ``export/``,
``lightning_logs/``) and are looked up in the working directory first, then in the checkout
speckv runs from (:func:`find`), so commands work from the repository root and from
anywhere else in a development install. What ships inside the package (the training
configuration) is read with :mod:`importlib.resources` instead, so an installed wheel trains
with the same settings.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Final

#: the checkout speckv runs from (the bundled records, controller and draft live there).
REPO: Final = Path(__file__).resolve().parent.parent
#: what training reads: one folder per record set (records, data card, ``--data`` config).
DATAMODULES: Final = "datamodules"
#: the record set the repository ships, and its files.
DEMO_RECORD_SET: Final = "smollm2-demo"
DEMO_RECORDS: Final = f"{DATAMODULES}/{DEMO_RECORD_SET}/{DEMO_RECORD_SET}.parquet"
DEMO_FIGURES: Final = f"{DATAMODULES}/{DEMO_RECORD_SET}/figures"
#: what ``speckv.train`` and ``speckv evaluate`` read by default: the Hugging Face demo's
#: record set (another, such as llama.cpp's ``smollm2-llamacpp``, is passed by name: its costs
#: are another engine's, and a controller is trained for the engine it will decide in)
DEFAULT_RECORDS: Final = f"{DATAMODULES}/{DEMO_RECORD_SET}/*.parquet"
#: llama.cpp's record set (``speckv profile --engine llamacpp``) and the controller trained
#: on it
LLAMACPP_RECORD_SET: Final = "smollm2-llamacpp"
LLAMACPP_RECORDS: Final = f"{DATAMODULES}/{LLAMACPP_RECORD_SET}/{LLAMACPP_RECORD_SET}.parquet"
#: what ships: the trained controller.
DEFAULT_CONTROLLER: Final = "export/speckv.onnx"
#: the controller trained on llama.cpp's records (``llamacpp:onnx:`` this path)
LLAMACPP_CONTROLLER: Final = "export/speckv-llamacpp.onnx"
#: where training writes (Lightning's own default).
LOG_DIR: Final = "lightning_logs"
#: the demo draft's weights and model card.
DRAFT_DIR: Final = REPO / "models" / "speckv-draft"


def cache_dir() -> Path:
    """Root of speckv's cache (``$SPECKV_CACHE``, default ``~/.cache/speckv``)."""
    return Path(os.environ.get("SPECKV_CACHE", Path.home() / ".cache" / "speckv"))


def find(pattern: str | os.PathLike[str]) -> list[Path]:
    """Files matching ``pattern`` (a glob) in the working directory, else in :data:`REPO`."""
    pattern = str(pattern)
    hits = sorted(glob.glob(pattern))
    if not hits and not os.path.isabs(pattern):
        hits = sorted(glob.glob(str(REPO / pattern)))
    return [Path(h) for h in hits]


def find_file(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists (or is absolute), else the checkout's file of that name;
    the caller reports a missing file."""
    found = find(glob.escape(str(path)))
    return found[0] if found else Path(path)
