"""A chooser backed by a training checkpoint, so a controller can be evaluated or decoded
with before it is exported (torch; the exported ONNX file needs none).

:func:`policy_from_spec` is :func:`speckv.policies.from_spec` with ``ckpt:PATH`` enabled.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from speckv.policies import Objective, Policy, PolicyError, from_spec
from speckv.runtime.features import FEATURE_NAMES, GAMMAS
from speckv.train.checkpoint import newest_readable
from speckv.train.network import ControllerGraph, load_checkpoint


class TorchChooser:
    """A chooser backed by a training checkpoint (torch; for evaluation before export)."""

    def __init__(self, graph: Any, meta: Mapping[str, Any] | None = None) -> None:
        self.graph = graph.eval()
        self.meta = dict(meta or {})

    @classmethod
    def load(cls, path: str | Path) -> TorchChooser:
        """Read ``path`` with :func:`speckv.train.network.load_checkpoint`; check features and γs.

        A directory stands for the newest readable ``*.ckpt`` file under it (a training run's
        folder; a damaged newer one is skipped with a warning).
        """
        path = Path(path)
        if path.is_dir():
            found = list(path.rglob("*.ckpt"))
            if not found:
                raise PolicyError(f"{path} holds no *.ckpt file. Train with `python -m "
                                  "speckv.train fit`, or pass the checkpoint file itself.")
            newest, skipped = newest_readable(found, weights_only=False)
            if newest is None:
                raise PolicyError(f"No checkpoint under {path} can be read ({skipped[0][0]}: "
                                  f"{skipped[0][1]}). Train again with `python -m speckv.train "
                                  "fit`.")
            path = newest
        mlp, meta = load_checkpoint(path)
        names = tuple(meta.get("feature_names", ()))
        if names != FEATURE_NAMES:
            raise PolicyError(
                f"Checkpoint {path} was trained on features {list(names)}, not speckv's "
                f"decision-time features {list(FEATURE_NAMES)} (a checkpoint on the paper's "
                "post-drafting features cannot choose γ before drafting). Retrain with the "
                "default feature set."
            )
        gammas = tuple(int(g) for g in meta.get("gammas", ()))
        if gammas != GAMMAS:
            raise PolicyError(f"Checkpoint {path} scores γ in {list(gammas)}; speckv replays "
                              f"γ in {list(GAMMAS)}. Retrain with the default candidates.")
        trees = tuple(tuple(int(v) for v in t) for t in meta.get("trees") or ())
        return cls(ControllerGraph(mlp, GAMMAS, meta.get("pre_mlp"), trees), meta)

    @property
    def n_options(self) -> int:
        """The width of ``costs``: the chains, then the checkpoint's trees."""
        return len(self.graph.gammas)

    def choose_batch(self, features: np.ndarray, costs: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            gamma, _, _ = self.graph(torch.as_tensor(np.asarray(features, np.float32)),
                                     torch.as_tensor(np.asarray(costs, np.float32)))
        return gamma.numpy().astype(np.int64)

    def choose(self, features: np.ndarray, costs: np.ndarray) -> int:
        return int(self.choose_batch(np.asarray(features)[None], np.asarray(costs)[None])[0])


def policy_from_spec(spec: str, *, objective: Objective = "tokens_per_s") -> Policy | None:
    """:func:`speckv.policies.from_spec`, with ``ckpt:PATH`` read by :class:`TorchChooser`."""
    return from_spec(spec, objective=objective, load_checkpoint=TorchChooser.load)
