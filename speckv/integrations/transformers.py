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
and Hugging Face verifies them. A γ of 0 (``speckv.policies.PLAIN``) is honoured: nothing
more is drafted and the target decodes one token alone. A controller that also decides before
the draft runs (the runtime's ``speculate_for(history, compression, costs)``, contract v2) is
asked first, and when it declines the draft does not run at all; its next forward catches up
on every token it skipped and scores their agreement (at most ``max_skip_run`` plain steps in a
row, then a probe).

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
from speckv.errors import SpeckvError
from speckv.machine import COST_KEYS, fingerprint, mismatch
from speckv.paths import cache_dir
from speckv.policies import PLAIN, Learned, Policy, StepContext
from speckv.runtime.features import GAMMA_MAX, GAMMAS, History, step_features

try:  # the runtime's contract v2: catch-up-aware step costs, a decision before drafting
    from speckv.runtime.costs import StepCosts
except ImportError:  # contract v1: γ >= 1 only, decided after the draft's first forward
    StepCosts = None

log = logging.getLogger(__name__)

#: bump when the cost cache's file layout or key changes (older files are then re-measured).
COST_CACHE_FORMAT: Final = 1
#: where :func:`pair_costs` keeps measured costs, under :func:`speckv.paths.cache_dir`.
COST_CACHE_DIR: Final = "hf-costs"
#: plain steps in a row after which drafting resumes anyway (a probe that lets the draft catch
#: up), for a controller that decides before drafting and does not say (``max_skip_run``).
MAX_SKIP_RUN: Final = 16

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


def candidate_costs(costs: CostModel, gammas: tuple[int, ...] = GAMMAS) -> np.ndarray:
    """Seconds of a step drafting each of ``gammas`` (float32), from measured costs.

    γ ≥ 1 by :func:`speckv.runtime.costs.step_costs` (the one formula); a γ of 0, should a
    controller list it among its candidates, is a plain target step: ``cost_verify_s[0]``.
    """
    per_gamma = dict(zip(GAMMAS, costs.step_costs().tolist(), strict=True))
    per_gamma[0] = float(costs.cost_verify_s[0])
    missing = [g for g in gammas if g not in per_gamma]
    if missing:
        raise IntegrationError(f"No measured cost for γ {missing}: speckv measures γ = 0.."
                               f"{GAMMA_MAX}. Use a controller with candidates in that range.")
    return np.asarray([per_gamma[g] for g in gammas], np.float32)


def _policy_costs(policy: Policy, costs: CostModel | None, compression: str,
                  ) -> tuple[Callable[[int], np.ndarray], Callable[[History], bool] | None]:
    """What a policy's decisions are priced with, and its decision before drafting.

    Returns ``step_costs(unseen)``: the costs vector of a γ decision whose catch-up forward
    covered ``unseen`` tokens (NaN when nothing was measured; the same for every ``unseen``
    under contract v1); and ``speculate(history)``: the chooser's decision before the draft
    runs (``speculate_for(history, compression, costs)``, contract v2), or None.
    """
    chooser = getattr(policy, "chooser", None)
    gammas = tuple(int(g) for g in getattr(chooser, "gammas", GAMMAS))
    if costs is None:
        nan = np.full(len(gammas), np.nan, np.float32)
        return (lambda unseen: nan), None
    fixed = candidate_costs(costs, gammas)
    priced = (StepCosts(costs.cost_draft_s, costs.cost_verify_s,
                        getattr(costs, "cost_catchup_s", None))
              if StepCosts is not None else None)
    if priced is not None and gammas == GAMMAS:
        def step_costs(unseen: int) -> np.ndarray:
            return priced.drafting(unseen)
    else:
        def step_costs(unseen: int) -> np.ndarray:
            return fixed
    speculate_for = getattr(chooser, "speculate_for", None)
    if not callable(speculate_for):
        return step_costs, None
    pre_costs = priced if priced is not None else costs

    def speculate(history: History) -> bool:
        return bool(speculate_for(history, compression, pre_costs))

    return step_costs, speculate


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
               measure: Callable[..., CostModel] = measure_costs,
               **measure_kwargs: Any) -> CostModel:
    """The step costs of this target/assistant pair on this machine, measured once.

    Measured with :func:`speckv.decode.costs.measure_costs` (median forward times at a
    realistic context) and kept as JSON under ``speckv.paths.cache_dir()/hf-costs/``, named by
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
                "compression": compression,
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
        except (OSError, json.JSONDecodeError, KeyError, CostError) as exc:
            problems = [f"unreadable ({exc})"]
        log.info("Cost cache %s does not fit this pair or machine (%s): measuring again.", path,
                 "; ".join(problems))
    started = time.perf_counter()
    costs = measure(_module(assistant), _module(target), compression=compression,
                    **measure_kwargs)
    costs.target_model = identity["target"]["name"]
    costs.draft_model = identity["assistant"]["name"]
    costs.extra = {**costs.extra, "measured_by": "speckv.integrations.transformers.pair_costs",
                   "measure_s": round(time.perf_counter() - started, 3)}
    record = {"format": COST_CACHE_FORMAT, "key": key, "identity": identity, "machine": machine,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "costs": costs.to_json()}
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
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
    """Drafting for Hugging Face's assisted loop with γ chosen per step by a speckv policy.

    State between steps: the assistant's KV cache and the ids it holds (``seen``); the
    agreement :class:`~speckv.runtime.features.History`; the draft's greedy token at each
    position it scored this step; answer positions whose agreement waits for the assistant's
    next catch-up forward (``pending``: the bonus token after a fully accepted step, and every
    token of a step decided plain before the draft ran). Hugging Face builds one per
    ``generate`` call (see :func:`speckv_assisted`).

    ``step_costs(unseen)``: the costs a γ decision gets after a catch-up over ``unseen``
    tokens; ``speculate(history)``: an optional decision before the draft runs (False: a
    plain target step, the draft does not run); after ``max_skip_run`` such steps in a row the
    next one drafts anyway, so the history cannot go stale for long.
    """

    def __init__(self, assistant: torch.nn.Module, policy: Policy,
                 step_costs: Callable[[int], np.ndarray], *, generation_config: Any,
                 logits_processor: Any, compression: str, vocab_size: int,
                 max_gamma: int = GAMMA_MAX,
                 speculate: Callable[[History], bool] | None = None,
                 max_skip_run: int = MAX_SKIP_RUN,
                 trace: list[SpeckvStep] | None = None) -> None:
        self.assistant = assistant
        self.policy = policy
        self.step_costs = step_costs
        self.speculate = speculate
        self.max_skip_run = int(max_skip_run)
        self.skipped = 0  # plain steps in a row decided before drafting
        self.do_sample = bool(generation_config.do_sample)
        self.max_length = int(generation_config.max_length)
        self.logits_processor = logits_processor if logits_processor else None
        self.compression = compression
        self.vocab_size = int(vocab_size)
        self.max_gamma = int(max_gamma)
        self.trace = trace
        self.cache = new_cache(assistant)
        self.seen = torch.empty(0, dtype=torch.long)  # the ids the assistant's cache holds
        self.history = History()
        #: (index in ids, target's probability); a v2 History is told too (its pre-draft
        #: features count the unsettled tokens)
        self.pending: list[tuple[int, float]] = []
        self._defers = callable(getattr(self.history, "defer", None))
        self.greedy: list[int] = []  # the draft's argmax at ids[start], ids[start + 1], ...
        self.start = 0
        self.n_prompt: int | None = None
        self.step: SpeckvStep | None = None
        self._keep_logits = bool(getattr(assistant, "_supports_logits_to_keep", lambda: False)())
        policy.reset()

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
        """Crop the assistant's cache to the prefix it shares with ``ids``, feed the rest, and
        settle pending agreements from the rows that score them. Returns the last row's
        logits (the first proposal's distribution) and the number of tokens fed."""
        n_ids = ids.shape[0]
        n = min(self.seen.shape[0], n_ids - 1)
        if self.pending:  # a row that scores a pending position must be recomputed
            n = min(n, self.pending[0][0] - 1)
        same = self.seen[:n] == ids[:n].cpu()
        keep_len = n if bool(same.all()) else int((~same).nonzero()[0, 0])
        cached = self.cache.get_seq_length()
        if cached > keep_len:
            self.cache.crop(keep_len - cached)
        rows = max([1] + [n_ids - p + 1 for p, _ in self.pending])
        logits = self._forward(ids[keep_len:], rows)
        self.seen = ids.cpu().clone()
        # row r predicts ids[n_ids - rows + r + 1]
        agreed = [int(logits[p - n_ids + rows - 1].argmax()) == int(ids[p])
                  for p, _ in self.pending]
        if self._defers:
            self.history.settle_deferred(agreed)
        else:
            for ok, (_, top1) in zip(agreed, self.pending, strict=True):
                self.history.settle(ok, top1)
        self.pending.clear()
        return logits[-1], n_ids - keep_len

    # ------------------------------------------------------------------------- the API
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any,
                       ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        started = time.perf_counter()
        ids = input_ids[0]
        n_ids = ids.shape[0]
        if self.n_prompt is None:
            self.n_prompt = n_ids
        self.start, self.greedy = n_ids, []
        position = n_ids - self.n_prompt
        max_gamma = min(self.max_gamma, self.max_length - n_ids - 1)
        if max_gamma <= 0:  # one token left: a plain target step, no decision (as speckv's)
            self.step = SpeckvStep(position, None)
            return input_ids, None
        if (self.speculate is not None and self.skipped < self.max_skip_run
                and not self.speculate(self.history)):
            self.skipped += 1  # decided before drafting: the draft does not run at all
            self.step = SpeckvStep(position, PLAIN, seconds=time.perf_counter() - started)
            return input_ids, None
        self.skipped = 0
        first, unseen = self._catch_up(ids)
        features = step_features(first.cpu().numpy(), self.history, self.compression)
        ctx = StepContext(features=features, compression=self.compression, position=position,
                          max_gamma=max_gamma, costs=self.step_costs(unseen))
        gamma = max(PLAIN, min(int(self.policy.choose(ctx)), max_gamma))
        self.step = SpeckvStep(position, gamma, features=features)
        self.greedy.append(int(first.argmax()))
        if gamma == PLAIN:  # no speculation: the target decodes one token alone
            self.step.seconds = time.perf_counter() - started
            return input_ids, None
        tokens, rows = self._draft(input_ids, first, gamma)
        self.step.drafted = len(tokens)
        self.step.seconds = time.perf_counter() - started
        drafted = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, drafted], -1), torch.stack(rows)[None].to(input_ids.device)

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
            self.seen = torch.cat([self.seen, torch.tensor([token])])
            self.greedy.append(int(raw.argmax()))
            entropy, top1 = _stats(raw)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor,
                                  num_matches: int) -> None:
        """Hugging Face's report after verification: settle each emitted token's agreement
        (the draft's greedy token at that position, given the true prefix, equals it) and the
        target's probability of it, in position order; a token the draft never scored (the
        bonus token after a fully accepted step) waits for the next catch-up forward."""
        emitted = input_ids[0, self.start :]
        n = emitted.shape[0]
        probs = torch.softmax(scores[0, :n].float(), -1)
        top1 = probs.gather(1, emitted[:, None].to(probs.device))[:, 0].tolist()
        for i, token in enumerate(emitted.tolist()):
            if i < len(self.greedy):
                self.history.settle(self.greedy[i] == token, top1[i])
            else:
                self.pending.append((self.start + i, top1[i]))
                if self._defers:
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
        if self.target.config.is_encoder_decoder or assistant_model.config.is_encoder_decoder:
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
        step_costs, speculate = _policy_costs(self.policy, self.costs, self.compression)
        max_skip_run = getattr(getattr(self.policy, "chooser", None), "max_skip_run",
                               MAX_SKIP_RUN)
        return SpeckvCandidateGenerator(
            assistant_model, self.policy, step_costs, generation_config=generation_config,
            logits_processor=logits_processor, compression=self.compression,
            vocab_size=vocab, max_gamma=self.max_gamma, speculate=speculate,
            max_skip_run=max_skip_run, trace=self.trace)


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
