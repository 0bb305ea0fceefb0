"""The exported controller's contract: tensor names, metadata keys and the format version.

:mod:`speckv.export.graph` writes files by these definitions and :mod:`speckv.runtime` reads them
by the same ones, so the two cannot drift apart. Torch-free.

Signature of a speckv controller graph, format 4 (three decisions per step: the context
lookup's continuation or not, then speculate or not, then the option; chains and trees)::

    inputs   features             float32 [batch, n_features]      step vector (FEATURE_NAMES)
             pre_features         float32 [batch, n_pre_features]  pre-draft vector
             costs                float32 [batch, n_options]       cost of a step verifying each
                                                                   option, its catch-up included
                                                                   (> 0): a chain of each γ, then
                                                                   each tree
             plain_cost           float32 [batch, 1]               cost of a plain step (> 0)
             lookup_features      float32 [batch, n_lookup_features]  the lookup's signals, then
                                                                   the pre-draft vector
             lookup_cost          float32 [batch, 1]               cost of a step verifying the
                                                                   lookup's continuation (> 0)
    outputs  speculate            int64   [batch]   1: draft this step; 0: a plain target step
             gamma                int64   [batch]   the chosen option's code: γ for a chain,
                                                    GAMMA_MAX + 1 + i for the tree TREES[i]
             expected_tokens      float32 [batch, n_options]   E[tokens | option, step vector]
             survival             float32 [batch, survival_width]  P(accepted >= k | step vector)
             pre_expected_tokens  float32 [batch, n_options]   E[tokens | option, pre-draft]
             pre_survival         float32 [batch, survival_width]  P(accepted >= k | pre-draft)
             lookup               int64   [batch]   1: verify the lookup's continuation this
                                                    step (no draft forward); 0: as speculate says
             lookup_expected_tokens  float32 [batch, 1]  E[tokens | verify the continuation]
             lookup_survival      float32 [batch, lookup_max_tokens]  P(its first k accepted)

The options are the chains of ``speckv.gammas`` and then the trees of ``speckv.trees``
(``[size, depth, branch]`` each, :data:`speckv.runtime.proposal.TREES`). ``survival`` holds
one survival curve per option family, one after another: the chains' ``k = 1..max γ``, then
each tree's ``k = 1..depth`` (:meth:`ControllerInfo.segments`); ``E[tokens | option] = 1 +
survival @ option_matrix()`` (a chain of γ sums its first γ entries, a tree its whole curve).

``speculate`` reads only ``pre_features``, ``costs`` and ``plain_cost``: it is 1 when some
option has more expected tokens per unit cost than a plain step's one token per
``plain_cost``. ``gamma``, ``expected_tokens`` and ``survival`` read only ``features`` and
``costs`` (an option >= 1, decided after the draft's first forward). A caller asks twice per
step, with the inputs of the decision at hand; the runtime splits the graph in two so that
each call computes one head. A decoder that cannot verify trees (its engine has no tree
attention mask) passes :data:`UNAVAILABLE_COST` as their costs: they are then never chosen.

``lookup`` reads ``lookup_features``, ``lookup_cost`` and the pre-draft decision's inputs,
and is asked first, before ``speculate``, only when the context lookup proposes tokens
(:mod:`speckv.runtime.lookup`). ``lookup_features[:, 0]`` is the continuation's length ``n``
(1..``lookup_max_tokens``); ``E[tokens | lookup] = 1 + sum_{k<=n} lookup_survival_k``, and
``lookup`` is 1 when that per ``lookup_cost`` beats both a plain step and every option the
pre-draft head prices. A decoder without a draft model passes :data:`UNAVAILABLE_COST` for
every option: the lookup is then weighed against plain steps alone.

``FORMAT_VERSION`` changes whenever that signature, the metadata or the meaning of an input or
output changes; a runtime reads exactly its own format version. Format 1 had one decision
(features and costs in; gamma, expected tokens and survival out); format 2 chose among
chains only; format 3 had no lookup decision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from speckv.runtime.errors import ControllerFormatError, IncompatibleVersionError

FORMAT_VERSION: Final = 4

FEATURES: Final = "features"
PRE_FEATURES: Final = "pre_features"
COSTS: Final = "costs"
PLAIN_COST: Final = "plain_cost"
SPECULATE: Final = "speculate"
GAMMA: Final = "gamma"
EXPECTED_TOKENS: Final = "expected_tokens"
SURVIVAL: Final = "survival"
PRE_EXPECTED_TOKENS: Final = "pre_expected_tokens"
PRE_SURVIVAL: Final = "pre_survival"
LOOKUP_FEATURES: Final = "lookup_features"
LOOKUP_COST: Final = "lookup_cost"
LOOKUP: Final = "lookup"
LOOKUP_EXPECTED_TOKENS: Final = "lookup_expected_tokens"
LOOKUP_SURVIVAL: Final = "lookup_survival"
INPUT_NAMES: Final = (FEATURES, PRE_FEATURES, COSTS, PLAIN_COST, LOOKUP_FEATURES, LOOKUP_COST)
OUTPUT_NAMES: Final = (SPECULATE, GAMMA, EXPECTED_TOKENS, SURVIVAL, PRE_EXPECTED_TOKENS,
                       PRE_SURVIVAL, LOOKUP, LOOKUP_EXPECTED_TOKENS, LOOKUP_SURVIVAL)
#: the three decisions: the inputs each reads and the outputs it gives.
STEP_INPUTS: Final = (FEATURES, COSTS)
STEP_OUTPUTS: Final = (GAMMA, EXPECTED_TOKENS, SURVIVAL)
PRE_INPUTS: Final = (PRE_FEATURES, COSTS, PLAIN_COST)
PRE_OUTPUTS: Final = (SPECULATE, PRE_EXPECTED_TOKENS, PRE_SURVIVAL)
LOOKUP_INPUTS: Final = (LOOKUP_FEATURES, PRE_FEATURES, LOOKUP_COST, COSTS, PLAIN_COST)
LOOKUP_OUTPUTS: Final = (LOOKUP, LOOKUP_EXPECTED_TOKENS, LOOKUP_SURVIVAL)
#: what ``features`` holds: the caller computes the draft statistics ("features"); a future
#: format may take the draft's logits instead and compute them in the graph ("logits").
INPUT_KIND: Final = "features"

KEY_FORMAT_VERSION: Final = "speckv.format_version"
KEY_SPECKV_VERSION: Final = "speckv.version"
KEY_FEATURE_NAMES: Final = "speckv.feature_names"  # JSON list, in input order
KEY_PRE_FEATURE_NAMES: Final = "speckv.pre_feature_names"  # JSON list, in input order
KEY_GAMMAS: Final = "speckv.gammas"  # JSON list of ints, in expected_tokens order
KEY_COMPRESSIONS: Final = "speckv.compressions"  # JSON list
KEY_FEATURE_SET: Final = "speckv.feature_set"
KEY_OBJECTIVE: Final = "speckv.objective"
KEY_DATA_FINGERPRINT: Final = "speckv.data_fingerprint"
KEY_INPUTS: Final = "speckv.inputs"  # INPUT_KIND
KEY_MAX_SKIP_RUN: Final = "speckv.max_skip_run"  # plain steps in a row before a probe
KEY_TREES: Final = "speckv.trees"  # JSON list of [size, depth, branch], in options order
KEY_LOOKUP_FEATURE_NAMES: Final = "speckv.lookup_feature_names"  # JSON list, in input order
KEY_LOOKUP_MAX_TOKENS: Final = "speckv.lookup_max_tokens"  # width of lookup_survival
#: the lookup vector's first entry: the continuation's length (the graph reads it)
LOOKUP_LENGTH: Final = "lookup_length"
#: the cost a decoder passes for an option it cannot run (a tree in an engine without tree
#: masks): finite, so the input check passes, and so large that the option is never chosen
UNAVAILABLE_COST: Final = 1e30
KEY_PREFIX: Final = "speckv."
REQUIRED_KEYS: Final = (KEY_FORMAT_VERSION, KEY_SPECKV_VERSION, KEY_FEATURE_NAMES,
                        KEY_PRE_FEATURE_NAMES, KEY_GAMMAS, KEY_COMPRESSIONS, KEY_FEATURE_SET,
                        KEY_OBJECTIVE, KEY_DATA_FINGERPRINT, KEY_INPUTS, KEY_MAX_SKIP_RUN,
                        KEY_TREES, KEY_LOOKUP_FEATURE_NAMES, KEY_LOOKUP_MAX_TOKENS)
#: what to run when a file is of an older format (formats 1 to 3 predict fewer outcomes, so
#: their checkpoints cannot be re-exported as format 4: the model must be retrained).
RETRAIN: Final = ("retrain and re-export it with this speckv: `python -m speckv.train fit`, then "
                  "`python -m speckv export --out {path}` (format {version} chose among fewer "
                  "options, so its checkpoint cannot simply be re-exported)")


@dataclass(frozen=True)
class ControllerInfo:
    """What a controller file says about itself (its ``speckv.*`` metadata)."""

    feature_names: tuple[str, ...]
    pre_feature_names: tuple[str, ...]
    gammas: tuple[int, ...]
    compressions: tuple[str, ...]
    feature_set: str
    objective: str
    data_fingerprint: str
    speckv_version: str
    max_skip_run: int
    #: the trees among the options, ``(size, depth, branch)`` each (empty: chains only)
    trees: tuple[tuple[int, int, int], ...] = ()
    #: the lookup decision's vector, in input order (its first entry is LOOKUP_LENGTH)
    lookup_feature_names: tuple[str, ...] = ()
    #: the longest continuation the lookup decision prices (lookup_survival's width)
    lookup_max_tokens: int = 8
    inputs: str = INPUT_KIND
    format_version: int = FORMAT_VERSION

    @property
    def gamma_max(self) -> int:
        return max(self.gammas)

    @property
    def n_options(self) -> int:
        """Columns of ``costs`` and ``expected_tokens``: the chains, then the trees."""
        return len(self.gammas) + len(self.trees)

    @property
    def codes(self) -> tuple[int, ...]:
        """The option code of each column (what ``gamma`` returns), :func:`option_codes`."""
        return option_codes(self.gammas, self.trees)

    def segments(self) -> list[tuple[int, int]]:
        return segments(self.gammas, self.trees)

    @property
    def survival_width(self) -> int:
        return survival_width(self.gammas, self.trees)

    def upto(self):
        return upto_matrix(self.gammas, self.trees)

    def option_matrix(self):
        return option_matrix(self.gammas, self.trees)

    def to_metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries (all strings; lists as JSON)."""
        return {
            KEY_FORMAT_VERSION: str(self.format_version),
            KEY_SPECKV_VERSION: self.speckv_version,
            KEY_FEATURE_NAMES: json.dumps(list(self.feature_names)),
            KEY_PRE_FEATURE_NAMES: json.dumps(list(self.pre_feature_names)),
            KEY_GAMMAS: json.dumps(list(self.gammas)),
            KEY_COMPRESSIONS: json.dumps(list(self.compressions)),
            KEY_FEATURE_SET: self.feature_set,
            KEY_OBJECTIVE: self.objective,
            KEY_DATA_FINGERPRINT: self.data_fingerprint,
            KEY_INPUTS: self.inputs,
            KEY_MAX_SKIP_RUN: str(self.max_skip_run),
            KEY_TREES: json.dumps([list(t) for t in self.trees]),
            KEY_LOOKUP_FEATURE_NAMES: json.dumps(list(self.lookup_feature_names)),
            KEY_LOOKUP_MAX_TOKENS: str(self.lookup_max_tokens),
        }

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], *, source: str) -> ControllerInfo:
        """Parse and check ``metadata_props``; ``source`` names the file in messages.

        Raises :class:`ControllerFormatError` when the entries are absent or malformed and
        :class:`IncompatibleVersionError` when the format version is not this runtime's.
        """
        if not any(key.startswith(KEY_PREFIX) for key in props):
            raise ControllerFormatError(
                f"{source} is an ONNX model but not a speckv controller: it has no speckv.* "
                "metadata. Export one with `python -m speckv export --ckpt CHECKPOINT`.")
        _check_format_version(props.get(KEY_FORMAT_VERSION), props.get(KEY_SPECKV_VERSION),
                              source)
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise ControllerFormatError(
                f"{source} lacks the metadata {', '.join(missing)}; the file is damaged or was "
                "edited. Re-export it with `python -m speckv export`.")
        names = _json_list(props, KEY_FEATURE_NAMES, str, source)
        pre_names = _json_list(props, KEY_PRE_FEATURE_NAMES, str, source)
        lookup_names = _json_list(props, KEY_LOOKUP_FEATURE_NAMES, str, source)
        gammas = _json_list(props, KEY_GAMMAS, int, source)
        if not names or not pre_names or not lookup_names or not gammas:
            raise ControllerFormatError(f"{source} lists no features or no candidate γ in its "
                                        "metadata. Re-export it with `python -m speckv export`.")
        if lookup_names[0] != LOOKUP_LENGTH:
            raise ControllerFormatError(f"{source}: the lookup vector must begin with "
                                        f"{LOOKUP_LENGTH!r} (the graph reads it), found "
                                        f"{lookup_names[0]!r}. Re-export it.")
        try:
            lookup_max = int(props[KEY_LOOKUP_MAX_TOKENS])
        except ValueError:
            lookup_max = 0
        if lookup_max < 1:
            raise ControllerFormatError(f"{source}: {KEY_LOOKUP_MAX_TOKENS} must be a positive "
                                        f"count, found {props[KEY_LOOKUP_MAX_TOKENS]!r}. "
                                        "Re-export it with `python -m speckv export`.")
        for listed in (names, pre_names, lookup_names):
            if len(set(listed)) != len(listed):
                raise ControllerFormatError(f"{source} repeats a feature name in {listed}. "
                                            "Re-export it with `python -m speckv export`.")
        if props[KEY_INPUTS] != INPUT_KIND:
            raise ControllerFormatError(
                f"{source} takes {props[KEY_INPUTS]!r} as input; this runtime feeds "
                f"{INPUT_KIND!r} (the decision-time feature vectors). Export the controller "
                "with this speckv (`python -m speckv export`).")
        try:
            max_skip_run = int(props[KEY_MAX_SKIP_RUN])
        except ValueError:
            max_skip_run = -1
        if max_skip_run < 0:
            raise ControllerFormatError(f"{source}: {KEY_MAX_SKIP_RUN} must be a count of "
                                        f"steps, found {props[KEY_MAX_SKIP_RUN]!r}. Re-export "
                                        "it with `python -m speckv export`.")
        if min(gammas) < 1 or list(gammas) != sorted(set(gammas)):
            raise ControllerFormatError(f"{source}: candidate γs {gammas} are not increasing "
                                        "positive integers. Re-export it.")
        trees = _json_list(props, KEY_TREES, list, source)
        if not all(len(t) == 3 and all(isinstance(v, int) and v >= 1 for v in t)
                   and t[1] <= t[0] for t in trees):
            raise ControllerFormatError(f"{source}: {KEY_TREES} must list [size, depth, branch] "
                                        f"positive integers with depth <= size, found {trees}. "
                                        "Re-export it with `python -m speckv export`.")
        return cls(
            feature_names=tuple(names),
            pre_feature_names=tuple(pre_names),
            gammas=tuple(gammas),
            compressions=tuple(_json_list(props, KEY_COMPRESSIONS, str, source)),
            feature_set=props[KEY_FEATURE_SET],
            objective=props[KEY_OBJECTIVE],
            data_fingerprint=props[KEY_DATA_FINGERPRINT],
            speckv_version=props[KEY_SPECKV_VERSION],
            max_skip_run=max_skip_run,
            trees=tuple(tuple(t) for t in trees),
            lookup_feature_names=tuple(lookup_names),
            lookup_max_tokens=lookup_max,
            inputs=props[KEY_INPUTS],
            format_version=FORMAT_VERSION,
        )


# ------------------------------------------------------------------ the options' layout
Trees = Sequence[Sequence[int]]  # (size, depth, branch) each


def option_codes(gammas: Sequence[int], trees: Trees) -> tuple[int, ...]:
    """The code of each option column: γ for a chain, ``max γ + 1 + i`` for tree ``i``
    (:func:`speckv.runtime.proposal.tree_code` for speckv's own trees)."""
    top = max(gammas)
    return (*(int(g) for g in gammas), *(top + 1 + i for i in range(len(trees))))


def segments(gammas: Sequence[int], trees: Trees) -> list[tuple[int, int]]:
    """``(start, length)`` of each survival curve: the chains' (``k = 1..max γ``), then each
    tree's (``k = 1..depth``)."""
    out, start = [(0, max(gammas))], max(gammas)
    for _, depth, _ in trees:
        out.append((start, int(depth)))
        start += int(depth)
    return out


def survival_width(gammas: Sequence[int], trees: Trees) -> int:
    start, length = segments(gammas, trees)[-1]
    return start + length


def upto_matrix(gammas: Sequence[int], trees: Trees):
    """``[W, W]``: ``log_survival = logsigmoid(z) @ upto`` (a cumulative sum within each
    curve, block by block)."""
    import numpy as np

    width = survival_width(gammas, trees)
    out = np.zeros((width, width), np.float32)
    for start, length in segments(gammas, trees):
        out[start : start + length, start : start + length] = np.triu(
            np.ones((length, length), np.float32))
    return out


def option_matrix(gammas: Sequence[int], trees: Trees):
    """``[W, n_options]``: ``expected_tokens = 1 + survival @ option_matrix`` (a chain of γ
    sums its curve's first γ entries, a tree its whole curve)."""
    import numpy as np

    out = np.zeros((survival_width(gammas, trees), len(gammas) + len(trees)), np.float32)
    for j, g in enumerate(gammas):
        out[:g, j] = 1.0
    for i, (start, length) in enumerate(segments(gammas, trees)[1:]):
        out[start : start + length, len(gammas) + i] = 1.0
    return out


def _check_format_version(text: str | None, written_by: str | None, source: str) -> None:
    try:
        version = int(text) if text is not None else None
    except ValueError:
        version = None
    if version is None:
        raise ControllerFormatError(
            f"{source} has no valid {KEY_FORMAT_VERSION} (found {text!r}); it is damaged or was "
            "not written by `speckv export`. Re-export it.")
    if version == FORMAT_VERSION:
        return
    by = f" (written by speckv {written_by})" if written_by else ""
    if version > FORMAT_VERSION:
        todo = ("upgrade speckv in this environment (pip install -U speckv), or re-export the "
                "controller with the speckv you run here")
    else:
        todo = RETRAIN.format(path=source, version=version)
    raise IncompatibleVersionError(
        f"{source} uses controller format {version}{by}; this runtime reads format "
        f"{FORMAT_VERSION}: {todo}.")


def _json_list(props: Mapping[str, str], key: str, kind: type, source: str) -> list:
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError:
        value = None
    ok = isinstance(value, list) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ControllerFormatError(
            f"{source}: metadata {key} must be a JSON list of {kind.__name__}, found "
            f"{props[key]!r}. Re-export the controller with `python -m speckv export`.")
    return value


def describe_difference(found: Sequence[object], expected: Sequence[object]) -> str:
    """Say how two name lists differ: missing, extra, or the same names in another order."""
    found, expected = list(found), list(expected)
    missing = [x for x in expected if x not in found]
    extra = [x for x in found if x not in expected]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"not expected {extra}")
    if not parts and len(found) != len(expected):
        parts.append(f"{len(found)} names instead of {len(expected)}")
    if not parts:
        first = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
        parts.append(f"same names in another order, first at position {first} "
                     f"(file: {found[first]!r}, expected: {expected[first]!r})")
    return "; ".join(parts)
