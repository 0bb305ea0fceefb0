"""speckv's runtime: choose γ from an exported ONNX controller, with numpy + onnxruntime only.

Importing this package never imports torch, lightning or transformers (a test holds it to
that), so any decoder can embed it::

    from speckv.runtime import Controller, History, StepCosts

    controller = Controller.load("export/speckv.onnx")
    costs = StepCosts(t_draft, t_verify, t_catchup)        # seconds, measured once
    history = History()                                    # one per sequence
    ...                                                    # before the draft's forward:
    if controller.speculate_for(history, "int8", costs):
        step_costs = costs.drafting(history.unsettled + 1)
        ...                                                # the draft's catch-up forward
        history.settle_deferred(verdicts)                  # its rows score deferred tokens
        gamma = controller.choose_from_logits(first_logits, history, "int8", step_costs)

See ``docs/EMBEDDING.md`` for the feature vector, the costs and the ONNX signature (also for
calling the file from C or C++).
"""

from __future__ import annotations

from speckv.runtime.contract import FORMAT_VERSION, ControllerInfo
from speckv.runtime.controller import (
    DEFAULT_THREADS,
    Controller,
    Prediction,
    PrePrediction,
    session_options,
)
from speckv.runtime.costs import StepCosts, drafting_costs
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
    MAX_SKIP_RUN,
    N_FEATURES,
    N_PRE_FEATURES,
    PRE_FEATURE_NAMES,
    History,
    RowStats,
    pre_features,
    step_features,
    token_stats,
)
from speckv.runtime.reference import NumpyController
from speckv.runtime.sidecar import check_sidecar

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_THREADS",
    "FEATURE_NAMES",
    "FORMAT_VERSION",
    "GAMMAS",
    "MAX_SKIP_RUN",
    "N_FEATURES",
    "N_PRE_FEATURES",
    "PRE_FEATURE_NAMES",
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
    "PrePrediction",
    "Prediction",
    "RowStats",
    "StepCosts",
    "check_sidecar",
    "costs_from",
    "drafting_costs",
    "pre_features",
    "session_options",
    "step_features",
    "token_stats",
]
