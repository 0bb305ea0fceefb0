"""speckv's runtime: choose γ from an exported ONNX controller, with numpy + onnxruntime only.

Importing this package never imports torch, lightning or transformers (a test holds it to
that), so any decoder can embed it::

    from speckv.runtime import Controller, History, costs_from, step_features

    controller = Controller.load("export/speckv.onnx")
    costs = costs_from(cost_draft_s, cost_verify_s)        # seconds per step, per candidate γ
    history = History()
    ...
    features = step_features(first_draft_logits, history, "int8")
    gamma = controller.choose(features, costs)             # an int among controller.gammas

See ``docs/EMBEDDING.md`` for the feature vector, the costs and the ONNX signature (also for
calling the file from C or C++).
"""

from __future__ import annotations

from speckv.runtime.contract import FORMAT_VERSION, ControllerInfo
from speckv.runtime.controller import DEFAULT_THREADS, Controller, Prediction, session_options
from speckv.runtime.costs import step_costs as costs_from
from speckv.runtime.errors import (
    BadInputError,
    CandidateMismatchError,
    ControllerError,
    ControllerFormatError,
    ControllerNotFoundError,
    FeatureMismatchError,
    IncompatibleVersionError,
)
from speckv.runtime.features import (
    COMPRESSIONS,
    FEATURE_NAMES,
    GAMMAS,
    N_FEATURES,
    History,
    step_features,
    token_stats,
)
from speckv.runtime.reference import NumpyController

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_THREADS",
    "FEATURE_NAMES",
    "FORMAT_VERSION",
    "GAMMAS",
    "N_FEATURES",
    "BadInputError",
    "CandidateMismatchError",
    "Controller",
    "ControllerError",
    "ControllerFormatError",
    "ControllerInfo",
    "ControllerNotFoundError",
    "FeatureMismatchError",
    "History",
    "IncompatibleVersionError",
    "NumpyController",
    "Prediction",
    "costs_from",
    "session_options",
    "step_features",
    "token_stats",
]
