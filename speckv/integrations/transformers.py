"""speckv's controller inside Hugging Face ``generate``: adaptive γ for any target/assistant pair.

One call::

    from speckv.integrations.transformers import generate_with_speckv

    out = generate_with_speckv(target, assistant, "export/speckv.onnx", None, input_ids,
                               max_new_tokens=128, streamer=streamer)   # any generate kwargs

or, around your own ``generate`` calls (pipelines, code you do not own)::

    with speckv_assisted(target, "export/speckv.onnx"):
        out = target.generate(input_ids, assistant_model=assistant, max_new_tokens=128)

At every step the assistant's first forward (it catches up on the tokens the target just
emitted and yields the first proposal) gives the decision-time features
(:func:`speckv.runtime.features.step_features`: the proposal's entropy, top-1 and margin, the
agreement history, the position, the target's compression); the controller
(:class:`speckv.runtime.Controller`, or any :class:`speckv.policies.Policy`) chooses γ from
them and the pair's measured step costs (:func:`pair_costs`: measured once per pair, machine
and thread count, cached under ``speckv.paths.cache_dir()``); the assistant drafts γ tokens
and Hugging Face verifies them. The step is the one :mod:`speckv.policies` defines and
speckv's own decoder runs, both decisions included: before the assistant runs, the policy's
``speculate`` (the controller's pre-draft head) may decline to speculate, and then the
assistant does not run at all and Hugging Face's loop makes a plain target step (its next
forward catches up on every token it skipped and scores their agreement; after the
controller's ``max_skip_run`` plain steps in a row it drafts anyway); after the assistant's
first forward, ``choose`` may also answer γ = 0 (``speckv.policies.PLAIN``).

Which door, and why
-------------------
transformers 5 offers two ways in. ``generate(custom_generate=callable)`` replaces the whole
decoding loop: the callable would have to redo verification, sampling, the streamer, the
stopping criteria and every ``return_dict_in_generate`` output (scores, logits, attentions,
hidden states) itself. In transformers 5.24 it also never receives ``streamer`` or
``assistant_model``: ``_extract_generation_mode_kwargs`` hands a callable only the arguments
its signature adds to ``_sample``'s, so a user's streamer sees the prompt and never ``end()``.

The other door is the candidate generator of Hugging Face's own assisted loop
(``GenerationMixin._assisted_decoding``), the machinery its heuristic schedule and
``assistant_confidence_threshold`` plug into. Through it Hugging Face keeps everything it
does today: the verification forward, greedy matching and, under ``do_sample``, its
speculative-sampling acceptance test (``_speculative_sampling``); logits processors; cache
rollback; EOS and length truncation; ``streamer.put`` per step; stopping criteria;
``return_dict_in_generate`` with scores, logits, attentions and hidden states. speckv replaces
only the drafting, in :class:`SpeckvCandidateGenerator`: ``get_candidates`` runs the assistant
itself (catch-up forward, decision, γ − 1 more forwards), and ``update_candidate_strategy``,
which Hugging Face calls with the verification's logits after every step, settles the
agreement history exactly as speckv's own decoder does (:mod:`speckv.decode.decoder`).
HF's stock ``AssistedCandidateGenerator`` is not reused: it fixes the step's maximum before the
assistant runs (its ``generate`` call takes ``max_new_tokens``), its stopping criteria see
neither the target's probabilities nor the agreement history, and it cannot skip a step.

Hugging Face has no public argument for a candidate generator: ``_assisted_decoding`` asks
``self._get_candidate_generator(...)``. :func:`speckv_assisted` shadows that one method on the
target *instance* for the length of a ``with`` block (per thread, nestable, removed on exit),
so no class and no other model is touched. That method's keyword arguments and the
``CandidateGenerator`` interface are the private surface this module depends on;
``tests/integrations/`` checks them against the installed transformers.

Guarantees (``tests/integrations/``): greedy output equals the target's own greedy
``generate`` (tiny float64 Llama and Qwen2 models, exactly); under sampling the output has the
target's distribution (Hugging Face's acceptance test, fed the distribution each drafted
token was sampled from); the features at every decision equal those of a trace of the same
answer. Limits: batch size 1 and one shared vocabulary (as Hugging Face's assisted
generation), decoder-only models, no padding. Under sampling, ``target_top1_prev`` is the
target's probability after Hugging Face's logits processors (temperature, top-k/p: the
distribution it verifies with; speckv's own decoder reads it at temperature 1), and the costs
are measured on the CPU path of :func:`~speckv.decode.costs.measure_costs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from transformers.generation.candidate_generator import CandidateGenerator

from speckv.atomic import atomic_write
from speckv.decode.costs import CostError, CostModel, measure_costs, new_cache
from speckv.decode.decoder import with_catchup
from speckv.errors import SpeckvError
from speckv.llm.feature_draft import TargetStates, final_norm, is_feature_draft
from speckv.machine import COST_KEYS, fingerprint, mismatch
from speckv.paths import cache_dir
from speckv.policies import PLAIN, Learned, Policy, PreContext, StepContext
from speckv.runtime.costs import StepCosts
from speckv.runtime.features import GAMMA_MAX, History, pre_features, step_features

log = logging.getLogger(__name__)

#: bump when the cost cache's file layout or key changes (older files are then re-measured).
COST_CACHE_FORMAT: Final = 1
#: where :func:`pair_costs` keeps measured costs, under :func:`speckv.paths.cache_dir`.
COST_CACHE_DIR: Final = "hf-costs"

ControllerLike = Any  # a Policy, a chooser with choose(features, costs), or an .onnx path
CostsLike = Any  # a CostModel, a cost file path, or None (measure once, cached)


class IntegrationError(SpeckvError, ValueError):
    """The integration cannot run this call; the message says what to change."""


# ------------------------------------------------------------------------------ inputs
def _module(model: Any) -> torch.nn.Module:
    """The ``nn.Module`` of a Hugging Face model or of a :class:`speckv.llm.load.LoadedModel`."""
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise IntegrationError(f"Expected a Hugging Face causal LM (a torch.nn.Module), got "
                           f"{type(model).__name__}.")


def detect_compression(model: Any) -> str:
    """The target's compression as the controller knows it: ``fp16``, ``int8`` or ``nf4``.

    A :class:`~speckv.llm.load.LoadedModel` says so itself; a bitsandbytes model is ``int8``
    (``load_in_8bit``) or ``nf4`` (any 4-bit load: NF4 is the nearest level the controller
    was trained at); anything else is unquantized, ``fp16`` (whatever its float dtype).
    """
    named = getattr(model, "compression", None)
    if isinstance(named, str):
        return named
    module = _module(model)
    if getattr(module, "is_loaded_in_8bit", False):
        return "int8"
    if getattr(module, "is_loaded_in_4bit", False):
        return "nf4"
    return "fp16"


def as_policy(controller: ControllerLike) -> Policy:
    """A speckv policy from what a user passes as the controller.

    - a path (``str``/``os.PathLike``) to an exported ``.onnx`` file: loaded with
      :meth:`speckv.runtime.Controller.load` (which validates it) and wrapped in
      :class:`speckv.policies.Learned`;
    - a chooser with ``choose(features, costs) -> int`` (a loaded ``Controller``, a
      ``NumpyController``): wrapped in ``Learned``;
    - a :class:`speckv.policies.Policy` (``FixedGamma``, ``Heuristic``, ``Learned``, …): as is.
    """
    if isinstance(controller, str | os.PathLike):
        from speckv.runtime import Controller

        return Learned(Controller.load(controller), name="onnx")
    if callable(getattr(controller, "keep_drafting", None)) and callable(
            getattr(controller, "choose", None)):
        return controller
    if callable(getattr(controller, "choose", None)):
        return Learned(controller, name="onnx")
    raise IntegrationError(
        f"controller must be an exported .onnx path, a speckv.runtime.Controller (anything with "
        f"choose(features, costs) -> int) or a speckv.policies.Policy; got "
        f"{type(controller).__name__}.")


def step_costs_of(costs: CostModel | None) -> StepCosts | None:
    """The runtime's :class:`~speckv.runtime.costs.StepCosts` of measured costs (as speckv's
    decoder builds them: the catch-up table when it was measured)."""
    if costs is None:
        return None
    return StepCosts(costs.cost_draft_s, costs.cost_verify_s,
                     getattr(costs, "cost_catchup_s", None))


def _load_costs(costs: CostsLike) -> CostModel | None:
    if costs is None or isinstance(costs, CostModel):
        return costs
    if isinstance(costs, str | os.PathLike):
        return CostModel.load(costs)
    raise IntegrationError(f"costs must be a speckv.decode.costs.CostModel, a cost file path or "
                           f"None (measure once for the pair, cached); got {type(costs).__name__}.")


# ---------------------------------------------------------------------- measured costs
def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model for a cost cache: name, class, dtype, size, and digests of its
    configuration and of a few weights (so two random models of one config differ)."""
    module = _module(model)
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else {}
    params = list(module.parameters())
    probe = hashlib.sha256()
    for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        flat = p.detach().reshape(-1)[:256].cpu()
        probe.update(str((tuple(p.shape), flat.dtype)).encode())
        probe.update((flat.double() if flat.is_floating_point() else flat.long()).numpy()
                     .tobytes())
    floats = [p.dtype for p in params if p.is_floating_point()]
    name = getattr(model, "name", None) or config.get("_name_or_path") or type(module).__name__
    return {
        "name": str(name),
        "class": type(module).__name__,
        "dtype": str(floats[0]).removeprefix("torch.") if floats else None,
        "parameters": int(sum(p.numel() for p in params)),
        "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        .hexdigest()[:16],
        "weights": probe.hexdigest()[:16],
    }


def _cost_key(identity: dict[str, Any], machine: dict[str, Any]) -> str:
    keyed = {"format": COST_CACHE_FORMAT, **identity,
             "machine": {k: machine.get(k) for k in COST_KEYS}}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _stale(stored: Any, identity: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """Why a cached cost file cannot price this pair on this machine (empty: it can)."""
    if not isinstance(stored, dict) or stored.get("format") != COST_CACHE_FORMAT:
        return ["another cache format"]
    problems = [f"{k}: {stored.get('identity', {}).get(k)!r} there, {v!r} here"
                for k, v in identity.items() if stored.get("identity", {}).get(k) != v]
    return problems + mismatch(stored.get("machine"), machine)


def pair_costs(target: Any, assistant: Any, *, compression: str | None = None,
               refresh: bool = False, directory: str | os.PathLike[str] | None = None,
               catchup: bool = True, measure: Callable[..., CostModel] = measure_costs,
               **measure_kwargs: Any) -> CostModel:
    """The step costs of this target/assistant pair on this machine, measured once.

    Measured with :func:`speckv.decode.costs.measure_costs` (median forward times at a
    realistic context) and, with ``catchup``, the assistant's catch-up forwards over several
    tokens (:func:`speckv.decode.decoder.with_catchup`, which prices the step after plain
    steps), and kept as JSON under ``speckv.paths.cache_dir()/hf-costs/``, named by
    a digest of both models (:func:`model_identity`), the compression, the measuring options
    and the machine fields that change costs (:data:`speckv.machine.COST_KEYS`: CPU, ISA,
    ATEN capability, threads, torch and bitsandbytes versions). A cached file is used only
    when it still matches all of them (:func:`speckv.machine.mismatch`); otherwise, or with
    ``refresh=True``, the pair is measured again and the file replaced. ``directory``
    overrides the cache folder (a file path there is used as is).
    """
    compression = compression or detect_compression(target)
    threads = torch.get_num_threads()
    machine = fingerprint(threads)
    identity = {"target": model_identity(target), "assistant": model_identity(assistant),
                "compression": compression, "catchup": bool(catchup),
                "measure": {k: measure_kwargs[k] for k in sorted(measure_kwargs)}}
    key = _cost_key(identity, machine)
    path = Path(directory) if directory is not None else cache_dir() / COST_CACHE_DIR
    path = path if path.suffix == ".json" else path / f"{key}.json"
    if path.is_file() and not refresh:
        try:
            stored = json.loads(path.read_text())
            problems = _stale(stored, json.loads(json.dumps(identity, default=str)), machine)
            if not problems:
                return CostModel.from_json(stored["costs"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CostError) as exc:
            problems = [f"unreadable ({type(exc).__name__}: {exc})"]
        log.info("Cost cache %s does not fit this pair or machine (%s): measuring again.", path,
                 "; ".join(problems))
    started = time.perf_counter()
    costs = measure(_module(assistant), _module(target), compression=compression,
                    **measure_kwargs)
    if catchup:
        costs = with_catchup(costs, _module(assistant))
    costs.target_model = identity["target"]["name"]
    costs.draft_model = identity["assistant"]["name"]
    costs.extra = {**costs.extra, "measured_by": "speckv.integrations.transformers.pair_costs",
                   "measure_s": round(time.perf_counter() - started, 3)}
    record = {"format": COST_CACHE_FORMAT, "key": key, "identity": identity, "machine": machine,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "costs": costs.to_json()}
    text = json.dumps(record, indent=2, default=str) + "\n"
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:  # a read-only cache: the costs stand, they are measured next time
        log.warning("Could not cache the pair's step costs (%s)", exc)
    else:
        log.info("Measured step costs of the pair in %.1f s; cached in %s.",
                 time.perf_counter() - started, path)
    return costs


# ---------------------------------------------------------------- the candidate generator
@dataclass
class SpeckvStep:
    """One step of a :class:`SpeckvCandidateGenerator`, as ``trace`` lists receive it.

    ``gamma``: the decision (0 = no speculation this step; ``None``: no decision, one token
    left); ``drafted``: tokens proposed (fewer than γ when a per-token stop ends drafting);
    ``accepted``: drafted tokens the target kept; ``emitted``: tokens the step added (accepted
    plus the target's own, fewer at EOS); ``features``: the decision's feature vector.
    """

    position: int
    gamma: int | None
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    features: np.ndarray | None = None
    seconds: float = 0.0  # drafting, decision included (the target's verification is not)


def _stats(logits: torch.Tensor) -> tuple[float, float]:
    """Entropy (nats) and top-1 probability of one row of logits."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    return float(-(p * logp.nan_to_num(neginf=0.0)).sum()), float(p.max())


class SpeckvCandidateGenerator(CandidateGenerator):
    """Drafting for Hugging Face's assisted loop, each step decided by a speckv policy.

    The step of :mod:`speckv.policies`, as speckv's decoder runs it: ``policy.speculate``
    before the assistant runs (when the policy has it), the assistant's catch-up forward,
    ``policy.choose`` on the step features, drafting with ``policy.keep_drafting``, and
    ``policy.observe`` once Hugging Face has verified. State between steps: the assistant's
    KV cache and the ids it holds (``seen``); the agreement
    :class:`~speckv.runtime.features.History`, whose deferred tokens (the bonus token after a
    fully accepted step, every token of a plain step decided before drafting) are always the
    last ``history.unsettled`` ids; the draft's greedy token at each position it scored this
    step. Hugging Face builds one per ``generate`` call (see :func:`speckv_assisted`).
    """

    def __init__(self, assistant: torch.nn.Module, policy: Policy, costs: StepCosts | None, *,
                 generation_config: Any, logits_processor: Any, compression: str,
                 vocab_size: int, max_gamma: int = GAMMA_MAX,
                 trace: list[SpeckvStep] | None = None) -> None:
        self.assistant = assistant
        self.policy = policy
        self.costs = costs
        self._nan_costs = np.full(GAMMA_MAX, np.nan, np.float32)
        self._speculate = getattr(policy, "speculate", None)
        self.skipped = 0  # plain steps in a row the policy chose before drafting
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = int(generation_config.max_length)
        self.logits_processor = logits_processor if logits_processor else None
        self.compression = compression
        self.vocab_size = int(vocab_size)
        self.max_gamma = int(max_gamma)
        self.trace = trace
        self.cache = new_cache(assistant)
        self.seen = torch.empty(0, dtype=torch.long)  # the ids the assistant's cache holds
        #: a feature-conditioned assistant (speckv.llm.feature_draft) reads the target's last
        #: hidden states: a hook on the target's final norm keeps them (see record_states)
        self.states: TargetStates | None = None
        self.states_end = 0  # the position after the target's next forward
        if is_feature_draft(assistant):
            param = next(assistant.parameters())
            self.states = TargetStates(assistant.cfg.hidden_size, param.dtype, param.device)
            self.cache.states = self.states
        self.history = History()
        self.greedy: list[int] = []  # the draft's argmax at ids[start], ids[start + 1], ...
        self.start = 0
        self.n_prompt: int | None = None
        self.step: SpeckvStep | None = None
        self._keep_logits = bool(getattr(assistant, "_supports_logits_to_keep", lambda: False)())
        policy.reset()

    def _step_costs(self, unseen: int) -> np.ndarray:
        return self.costs.drafting(unseen) if self.costs is not None else self._nan_costs

    def record_states(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        """The target's final-norm output of one forward, which ends at ``states_end``."""
        if self.states is not None:
            self.states.write(self.states_end - output.shape[1], output[0])

    # ---------------------------------------------------------------- assistant forwards
    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """The assistant over ``ids`` appended to its cache: float32 ``[keep, vocab_size]``."""
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._keep_logits else {}
        out = self.assistant(input_ids=ids.to(self.assistant.device)[None], cache=self.cache,
                             use_cache=True, **kwargs)
        logits = out.logits[0, -keep:].float()
        width = logits.shape[-1]
        if width > self.vocab_size:  # padded head rows are no token of the target's
            logits = logits[:, : self.vocab_size]
        elif width < self.vocab_size:
            pad = logits.new_full((logits.shape[0], self.vocab_size - width),
                                  torch.finfo(logits.dtype).min)
            logits = torch.cat([logits, pad], -1)
        return logits

    def _catch_up(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Crop the assistant's cache to the prefix it shares with ``ids`` (never past the
        deferred tokens, whose rows must be computed), feed the rest in one forward and settle
        the deferred agreements from its rows. Returns the last row (the first proposal's
        logits) and the number of tokens fed."""
        n_ids = ids.shape[0]
        rows = self.history.unsettled + 1
        n = min(self.seen.shape[0], n_ids - rows)
        same = self.seen[:n] == ids[:n].cpu()
        keep_len = n if bool(same.all()) else int((~same).nonzero()[0, 0])
        cached = self.cache.get_seq_length()
        if cached > keep_len:
            self.cache.crop(keep_len - cached)
        logits = self._forward(ids[keep_len:], rows)
        self.seen = ids.cpu().clone()
        if rows > 1:  # row r scores ids[n_ids - rows + r + 1], a deferred token
            verdicts = logits[:-1].argmax(-1).cpu() == ids[n_ids - rows + 1 :].cpu()
            self.history.settle_deferred(verdicts.tolist())
        return logits[-1], n_ids - keep_len

    # ------------------------------------------------------------------------- the API
    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one step drafts (transformers >= 5.25 asks, to size what a cache
        with recurrent layers records for rollback; speckv's targets have none)."""
        return self.max_gamma

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any,
                       ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        started = time.perf_counter()
        ids = input_ids[0]
        n_ids = ids.shape[0]
        first_step = self.n_prompt is None
        if first_step:
            self.n_prompt = n_ids
        self.start, self.greedy = n_ids, []
        self.states_end = n_ids  # a plain step; drafted tokens move it below
        if self.states is not None:
            self.states.valid = 0 if first_step else n_ids - 1
        position = n_ids - self.n_prompt
        max_gamma = min(self.max_gamma, self.max_length - n_ids - 1)
        if max_gamma <= 0 or (first_step and self.states is not None):
            # one token left: a plain target step, no decision (as speckv's); a
            # feature-conditioned assistant also lets the first step be plain, since Hugging
            # Face's loop runs the target over the prompt only then (it has no prefill)
            self.step = SpeckvStep(position, None)
            return input_ids, None
        if not self._decide_to_speculate(position, max_gamma):
            # a plain step decided before drafting: the assistant does not run at all
            self.step = SpeckvStep(position, PLAIN, seconds=time.perf_counter() - started)
            return input_ids, None
        first, unseen = self._catch_up(ids)
        features = step_features(first.cpu().numpy(), self.history, self.compression)
        ctx = StepContext(features=features, compression=self.compression, position=position,
                          max_gamma=max_gamma, costs=self._step_costs(unseen))
        choice = int(self.policy.choose(ctx))
        if not PLAIN <= choice <= GAMMA_MAX:
            raise IntegrationError(f"Policy {getattr(self.policy, 'name', self.policy)!r} "
                                   f"chose γ={choice}; choose() must return 1..{GAMMA_MAX}, or "
                                   f"{PLAIN} for a plain target step.")
        gamma = min(choice, max_gamma)
        self.step = SpeckvStep(position, gamma, features=features)
        self.greedy.append(int(first.argmax()))
        if gamma == PLAIN:  # drafted once, then a plain step: the proposal scores the token
            self.step.seconds = time.perf_counter() - started
            return input_ids, None
        tokens, rows = self._draft(input_ids, first, gamma)
        self.step.drafted = len(tokens)
        self.states_end = n_ids + len(tokens)
        self.step.seconds = time.perf_counter() - started
        drafted = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, drafted], -1), torch.stack(rows)[None].to(input_ids.device)

    def _decide_to_speculate(self, position: int, max_gamma: int) -> bool:
        """The policy's pre-draft decision (a policy without ``speculate`` always drafts)."""
        if self._speculate is None:
            return True
        unseen = self.history.unsettled + 1
        ctx = PreContext(pre_features(self.history, self.compression), self.compression,
                         position, max_gamma, self._step_costs(unseen),
                         self.costs.plain if self.costs is not None else math.nan, unseen,
                         self.skipped)
        go = bool(self._speculate(ctx))
        self.skipped = 0 if go else self.skipped + 1
        return go

    def _draft(self, input_ids: torch.Tensor, first: torch.Tensor, gamma: int,
               ) -> tuple[list[int], list[torch.Tensor]]:
        """Propose up to ``gamma`` tokens; returns them and the (processed) logits each was
        chosen from, which Hugging Face's sampling acceptance test reads as the draft's q."""
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        current = input_ids
        raw = first
        entropy, top1 = _stats(raw)
        while True:
            scores = raw[None].to(input_ids.device)
            if self.logits_processor is not None:
                scores = self.logits_processor(current, scores.clone())
            if self.do_sample:
                token = int(torch.multinomial(torch.softmax(scores[0], -1), 1))
            else:
                token = int(scores[0].argmax())
            tokens.append(token)
            rows.append(scores[0])
            k = len(tokens)
            if k >= gamma or not self.policy.keep_drafting(k, top1, entropy):
                return tokens, rows
            current = torch.cat([current, current.new_tensor([[token]])], -1)
            raw = self._forward(torch.tensor([token]), 1)[0]
            if self.states is None:  # a feature-conditioned assistant's drafted positions
                # read its own states: the next catch-up recomputes them from the target's
                self.seen = torch.cat([self.seen, torch.tensor([token])])
            self.greedy.append(int(raw.argmax()))
            entropy, top1 = _stats(raw)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor,
                                  num_matches: int) -> None:
        """Hugging Face's report after verification: settle each emitted token's agreement
        (the draft's greedy token at that position, given the true prefix, equals it) and the
        target's probability of it, in position order; a token the draft has not scored (the
        bonus token after a fully accepted step, a plain step's token) is deferred to the
        assistant's next catch-up forward."""
        emitted = input_ids[0, self.start :]
        n = emitted.shape[0]
        probs = torch.softmax(scores[0, :n].float(), -1)
        top1 = probs.gather(1, emitted[:, None].to(probs.device))[:, 0].tolist()
        scored = len(self.greedy) if self.states is None else min(len(self.greedy), 1)
        for i, token in enumerate(emitted.tolist()):
            if i < scored:
                self.history.settle(self.greedy[i] == token, top1[i])
            else:
                self.history.defer(top1[i])
        step = self.step
        if step is None:
            return
        step.accepted, step.emitted = min(int(num_matches), step.drafted), n
        if step.drafted:
            self.policy.observe(step.drafted, step.accepted)
        if self.trace is not None:
            self.trace.append(step)
        self.step = None


# ------------------------------------------------------------------------- the hook
@dataclass
class _Session:
    """What one :func:`speckv_assisted` block asks of the target's assisted generation."""

    target: torch.nn.Module
    policy: Policy
    costs: CostModel | None
    compression: str
    max_gamma: int
    trace: list[SpeckvStep] | None
    measure_kwargs: dict[str, Any] = field(default_factory=dict)
    hook: Any = None  # the target-state hook of a feature-conditioned assistant

    def build(self, *, generation_config: Any, input_ids: torch.Tensor,
              logits_processor: Any, model_kwargs: dict[str, Any],
              assistant_model: torch.nn.Module | None = None, target_tokenizer: Any = None,
              assistant_tokenizer: Any = None, **_: Any) -> SpeckvCandidateGenerator:
        if assistant_model is None:
            raise IntegrationError("speckv drafts with an assistant model: pass "
                                   "assistant_model=... to generate (or use "
                                   "generate_with_speckv(target, assistant, ...)).")
        if target_tokenizer is not None and assistant_tokenizer is not None:
            raise IntegrationError(
                "speckv needs an assistant that shares the target's vocabulary; Hugging "
                "Face's universal assisted generation (tokenizer= and assistant_tokenizer=) "
                "is not supported. Drop those arguments, or use a same-tokenizer assistant.")
        if self.target.config.is_encoder_decoder or getattr(assistant_model.config,
                                                              "is_encoder_decoder", False):
            raise IntegrationError("speckv's generator drafts for decoder-only models; an "
                                   "encoder-decoder pair needs Hugging Face's own assisted "
                                   "generation.")
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool((mask == 1).all()):
            raise IntegrationError("The attention mask has padding; speckv's drafting assumes "
                                   "one unpadded sequence (batch size 1, as assisted "
                                   "generation). Pass the prompt without padding.")
        if input_ids.shape[-1] == 0:
            raise IntegrationError("speckv needs input_ids (a prompt of at least one token), "
                                   "not inputs_embeds alone.")
        if isinstance(self.policy, Learned) and self.costs is None:
            self.costs = pair_costs(self.target, assistant_model,
                                    compression=self.compression, **self.measure_kwargs)
        head = self.target.get_output_embeddings()
        vocab = (int(head.weight.shape[0]) if head is not None and hasattr(head, "weight")
                 else int(self.target.config.get_text_config().vocab_size))
        generator = SpeckvCandidateGenerator(
            assistant_model, self.policy, step_costs_of(self.costs),
            generation_config=generation_config, logits_processor=logits_processor,
            compression=self.compression, vocab_size=vocab, max_gamma=self.max_gamma,
            trace=self.trace)
        self.close()
        if generator.states is not None:  # this generate call's target states
            self.hook = final_norm(self.target).register_forward_hook(generator.record_states)
        return generator

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


_HOOK: Final = "_get_candidate_generator"
_LOCK = threading.Lock()
_LOCAL = threading.local()
_INSTALLS: dict[int, int] = {}  # id(model) -> open speckv_assisted blocks, all threads


def _active(model: torch.nn.Module) -> _Session | None:
    stack = getattr(_LOCAL, "sessions", {}).get(id(model))
    return stack[-1] if stack else None


def _install(model: torch.nn.Module) -> None:
    with _LOCK:
        if _INSTALLS.get(id(model), 0) == 0:
            original = getattr(type(model), _HOOK, None)
            if original is None:
                raise IntegrationError(
                    f"{type(model).__name__} has no {_HOOK}: this transformers version's "
                    "assisted generation differs from the one speckv integrates with (5.x).")

            def dispatch(**kwargs: Any) -> CandidateGenerator:
                session = _active(model)
                if session is None:  # another thread's generate, outside any speckv block
                    return original(model, **kwargs)
                return session.build(**kwargs)

            object.__setattr__(model, _HOOK, dispatch)
        _INSTALLS[id(model)] = _INSTALLS.get(id(model), 0) + 1


def _uninstall(model: torch.nn.Module) -> None:
    with _LOCK:
        _INSTALLS[id(model)] -= 1
        if _INSTALLS[id(model)] == 0:
            del _INSTALLS[id(model)]
            model.__dict__.pop(_HOOK, None)


@contextlib.contextmanager
def speckv_assisted(target: Any, controller: ControllerLike, costs: CostsLike = None, *,
                    compression: str | None = None, max_gamma: int = GAMMA_MAX,
                    trace: list[SpeckvStep] | None = None,
                    measure_kwargs: dict[str, Any] | None = None) -> Iterator[Policy]:
    """Within the block, ``target.generate(..., assistant_model=A)`` drafts with speckv.

    ``controller``: an exported ``.onnx`` path, a loaded :class:`speckv.runtime.Controller`
    or any :class:`speckv.policies.Policy` (:func:`as_policy`). ``costs``: a
    :class:`~speckv.decode.costs.CostModel` or cost file; ``None`` measures the pair on first
    use (:func:`pair_costs`, cached on disk; ``measure_kwargs`` go to
    :func:`~speckv.decode.costs.measure_costs`). ``compression``: the target's level for the
    features (default: :func:`detect_compression`). ``max_gamma``: the most tokens a step
    drafts. ``trace``: a list that receives a :class:`SpeckvStep` per step. Yields the policy.

    Only this thread's ``generate`` calls on this target instance see it; other threads and
    other models keep Hugging Face's own candidate generators.
    """
    model = _module(target)
    if not 1 <= max_gamma <= GAMMA_MAX:
        raise IntegrationError(f"max_gamma must lie in 1..{GAMMA_MAX}, got {max_gamma}.")
    policy = as_policy(controller)
    session = _Session(model, policy, _load_costs(costs),
                       compression or detect_compression(target), max_gamma, trace,
                       dict(measure_kwargs or {}))
    _install(model)
    sessions = _LOCAL.__dict__.setdefault("sessions", {})
    sessions.setdefault(id(model), []).append(session)
    try:
        yield policy
    finally:
        session.close()
        stack = sessions[id(model)]
        stack.remove(session)
        if not stack:
            del sessions[id(model)]
        _uninstall(model)


def generate_with_speckv(target: Any, assistant: Any, controller: ControllerLike,
                         costs: CostsLike = None, input_ids: Any = None, *,
                         compression: str | None = None, max_gamma: int = GAMMA_MAX,
                         trace: list[SpeckvStep] | None = None,
                         measure_kwargs: dict[str, Any] | None = None,
                         **generate_kwargs: Any) -> Any:
    """``target.generate(input_ids, assistant_model=assistant, **generate_kwargs)`` with γ
    chosen per step by ``controller``; returns what ``generate`` returns.

    ``target``/``assistant``: Hugging Face causal LMs sharing a vocabulary, or speckv
    ``LoadedModel`` s (``speckv.llm.load``). ``input_ids``: ``[1, n]`` tensor or a list of
    ids. Every other keyword is ``generate``'s (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``streamer``, ``stopping_criteria``, ``return_dict_in_generate``, …). See
    :func:`speckv_assisted` for the rest. The speculation itself follows Hugging Face's
    assisted generation: greedy output is the target's, sampled output has its distribution.
    """
    if input_ids is None:
        input_ids = generate_kwargs.pop("inputs", None)
    if input_ids is None:
        raise IntegrationError("Pass input_ids: the prompt's token ids, a [1, n] tensor.")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise IntegrationError(f"Assisted generation decodes one sequence at a time; got a "
                               f"batch of {input_ids.shape[0]}. Call once per prompt.")
    model, helper = _module(target), _module(assistant)
    with speckv_assisted(target, controller, costs, compression=compression,
                         max_gamma=max_gamma, trace=trace, measure_kwargs=measure_kwargs):
        return model.generate(input_ids, assistant_model=helper, **generate_kwargs)
