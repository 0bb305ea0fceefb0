"""A chooser backed by a training checkpoint, so a controller can be evaluated or decoded
with before it is exported (torch; the exported ONNX file needs none).

It makes the decisions of a step as the file exported from the same checkpoint does
(:class:`speckv.train.network.ControllerGraph` is what ``speckv export`` writes): where the
context lookup proposes, its continuation or not from the lookup network; before the draft
runs, speculate or not from the pre-draft network; after its first proposal, γ from the step
network. :func:`policy_from_spec` is :func:`speckv.policies.from_spec` with
``ckpt:PATH`` enabled.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from speckv.policies import Objective, Policy, PolicyError, from_spec
from speckv.runtime.features import FEATURE_NAMES, GAMMAS, MAX_SKIP_RUN, PRE_FEATURE_NAMES
from speckv.train.checkpoint import newest_readable
from speckv.train.network import ControllerGraph, load_checkpoint


class TorchChooser:
    """Both decisions from a training checkpoint (torch; for evaluation before export).

    The same calls as the runtime ``Controller`` that :class:`speckv.policies.Learned` uses:
    ``speculate`` / ``speculate_batch`` (pre-draft features, costs, plain-step cost -> draft
    this step?), ``choose`` / ``choose_batch`` (step features, costs -> γ),
    ``use_lookup`` (the context lookup's continuation instead?) and ``max_skip_run`` (plain
    steps in a row before a probe).
    """

    def __init__(self, graph: ControllerGraph, meta: Mapping[str, Any] | None = None) -> None:
        if graph.pre_mlp is None:
            raise PolicyError("This controller has no pre-draft network, so it cannot decide "
                              "whether to speculate: retrain it (`python -m speckv.train fit`).")
        self.graph = graph.eval()
        self.meta = dict(meta or {})
        self.max_skip_run = int(self.meta.get("max_skip_run", MAX_SKIP_RUN))

    @classmethod
    def load(cls, path: str | Path) -> TorchChooser:
        """Read ``path`` with :func:`speckv.train.network.load_checkpoint`; check both feature
        vectors, the γs and that it has the pre-draft network.

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
        pre_mlp = meta.get("pre_mlp")
        if pre_mlp is None:
            raise PolicyError(f"Checkpoint {path} has no pre-draft network (it was trained "
                              "before controller format 2), so it cannot decide whether to "
                              "speculate as an exported controller does. Retrain it with this "
                              "speckv (`python -m speckv.train fit`) and evaluate the new "
                              "checkpoint.")
        pre_names = tuple(meta.get("pre_feature_names", ()))
        if pre_names != PRE_FEATURE_NAMES:
            raise PolicyError(f"Checkpoint {path} was trained on pre-draft features "
                              f"{list(pre_names)}, not speckv's {list(PRE_FEATURE_NAMES)}. "
                              "Retrain it with this speckv (`python -m speckv.train fit`).")
        trees = tuple(tuple(int(v) for v in t) for t in meta.get("trees") or ())
        return cls(ControllerGraph(mlp, GAMMAS, pre_mlp, trees, meta.get("lookup_mlp")), meta)

    @property
    def n_options(self) -> int:
        """The width of ``costs``: the chains, then the checkpoint's trees."""
        return len(self.graph.gammas)

    def choose_batch(self, features: np.ndarray, costs: np.ndarray) -> np.ndarray:
        """γ for each row: ``[n, F]``, ``[n, G]`` -> int64 ``[n]``."""
        import torch

        with torch.inference_mode():
            gamma, _, _ = self.graph(torch.as_tensor(np.asarray(features, np.float32)),
                                     torch.as_tensor(np.asarray(costs, np.float32)))
        return gamma.numpy().astype(np.int64)

    def choose(self, features: np.ndarray, costs: np.ndarray) -> int:
        return int(self.choose_batch(np.asarray(features)[None], np.asarray(costs)[None])[0])

    def speculate_batch(self, pre_features: np.ndarray, costs: np.ndarray,
                        plain_cost: np.ndarray) -> np.ndarray:
        """Draft this step? ``[n, P]``, ``[n, G]``, ``[n]`` -> bool ``[n]``."""
        import torch

        pre = np.asarray(pre_features, np.float32)
        plain = np.asarray(plain_cost, np.float32).reshape(-1, 1)
        with torch.inference_mode():
            speculate, _, _ = self.graph.pre(torch.as_tensor(pre),
                                             torch.as_tensor(np.asarray(costs, np.float32)),
                                             torch.as_tensor(plain))
        return speculate.numpy().astype(bool)

    def speculate(self, pre_features: np.ndarray, costs: np.ndarray, plain_cost: float) -> bool:
        return bool(self.speculate_batch(np.asarray(pre_features)[None],
                                         np.asarray(costs)[None], np.array([plain_cost]))[0])


    @property
    def has_lookup(self) -> bool:
        """Whether the checkpoint has the lookup network (trained since format 4)."""
        return self.graph.lookup_mlp is not None

    def use_lookup(self, lookup_features: np.ndarray, lookup_cost: float,
                   pre_features: np.ndarray, costs: np.ndarray, plain_cost: float) -> bool:
        """Verify the context lookup's continuation this step (no draft forward)?"""
        import torch

        if self.graph.lookup_mlp is None:
            raise PolicyError("This checkpoint has no lookup network (trained before the "
                              "lookup decision existed): retrain it with this speckv "
                              "(`python -m speckv.train fit`).")
        def t(a) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, np.float32).reshape(1, -1))

        with torch.inference_mode():
            _, pre_expected, _ = self.graph.pre(t(pre_features), t(costs), t(plain_cost))
            take, _, _ = self.graph.lookup(t(lookup_features), t(lookup_cost), pre_expected,
                                           t(costs), t(plain_cost))
        return bool(take[0])


def policy_from_spec(spec: str, *, objective: Objective = "tokens_per_s") -> Policy | None:
    """:func:`speckv.policies.from_spec`, with ``ckpt:PATH`` read by :class:`TorchChooser`."""
    return from_spec(spec, objective=objective, load_checkpoint=TorchChooser.load)
