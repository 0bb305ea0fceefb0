"""Checkpoints a killed training run can resume from, exactly.

- :class:`AtomicCheckpointIO` writes every checkpoint as speckv writes every file: a temporary
  file beside it, then a rename (Lightning's own writer stages it in ``/tmp`` and moves it,
  which is a copy, not a rename, when ``/tmp`` is another file system, so a kill could leave
  a truncated ``last.ckpt``).
- :func:`rng_states` / :func:`restore_rng_states`: the random state of Python, numpy and torch
  at a checkpoint. The training data's order comes from torch's global generator (the
  shuffling sampler draws its seed from it every epoch), so a run resumed from epoch ``k``
  shuffles epoch ``k + 1`` as the uninterrupted run did only when that state comes back too.
- :func:`newest_readable`: the newest checkpoint that loads, skipping (and naming) files a
  kill or a full disk damaged; ``--ckpt_path=last`` and ``speckv export --ckpt DIR`` use it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from speckv.atomic import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing through :func:`speckv.atomic.atomic_write`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


# ----------------------------------------------------------------------------- random state
def rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's (CPU and CUDA) global random states, in types a
    ``weights_only`` checkpoint load accepts (tensors, tuples of numbers)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` took."""
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------- choosing a file
def unreadable(path: Path, weights_only: bool = True) -> str | None:
    """Why the training checkpoint ``path`` cannot be used, or ``None`` when it loads (as
    Lightning loads it, or with ``weights_only=False`` as ``speckv export`` does) and carries
    speckv's entry."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # any loader error: truncated, not a checkpoint, unreadable
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first}"
    if not isinstance(ckpt, dict) or "speckv" not in ckpt or "state_dict" not in ckpt:
        return "not a speckv training checkpoint (no 'speckv' entry)"
    return None


def newest_readable(files: Iterable[Path], weights_only: bool = True
                    ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest of ``files`` (by modification time) that :func:`unreadable` passes, and the
    newer ones it skipped with the reason (each logged as a warning)."""
    found = sorted({Path(f) for f in files if Path(f).is_file()},
                   key=lambda f: (f.stat().st_mtime, str(f)), reverse=True)
    skipped: list[tuple[Path, str]] = []
    for path in found:
        why = unreadable(path, weights_only)
        if why is None:
            return path, skipped
        log.warning("skipping checkpoint %s: it cannot be read (%s)", path, why)
        skipped.append((path, why))
    return None, skipped


# ------------------------------------------------------------------------------ resuming
#: settings a resumed run may change: where the records are (their bytes are compared
#: instead) and how many workers load them.
MAY_CHANGE = frozenset({"records", "num_workers", "_instantiator"})


def _plain(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def resume_mismatches(checkpoint: dict[str, Any], model_hparams: dict[str, Any],
                      data_hparams: dict[str, Any] | None, fingerprint: str | None) -> list[str]:
    """What differs between the run that saved ``checkpoint`` and this one (the model's and
    the data's settings, and the records' bytes), as ``--flag: X there, Y here`` phrases."""
    differ = []
    for group, saved, now in (("model", checkpoint.get("hyper_parameters") or {}, model_hparams),
                              ("data", checkpoint.get("datamodule_hyper_parameters") or {},
                               data_hparams)):
        if now is None:
            continue
        for key in sorted(set(saved) | set(now)):
            if key not in MAY_CHANGE and _plain(saved.get(key)) != _plain(now.get(key)):
                differ.append(f"--{group}.{key}: {saved.get(key)!r} there, {now.get(key)!r} here")
    saved_print = (checkpoint.get("speckv") or {}).get("data_fingerprint")
    if fingerprint is not None and saved_print is not None and saved_print != fingerprint:
        differ.append(f"the records' contents: fingerprint {saved_print} there, {fingerprint} "
                      "here")
    return differ
