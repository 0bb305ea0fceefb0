"""The cost model of a speculation step: measured draft and verify forward times.

A step that drafts ``g`` tokens costs ``g * cost_draft_s + cost_verify_s[g]`` seconds
(:func:`speckv.runtime.costs.step_costs`): ``g`` one-token draft forwards with a KV cache and one
target forward over ``g + 1`` tokens (the last emitted token plus the drafted ones). Both are
measured here with :func:`lm_forward`, the very call the decoder
(:mod:`speckv.decode.decoder`) makes, at a realistic context length, per compression level
and machine.

The numbers are machine facts, not tuned values: the learned controller takes them as an
input, the replay evaluator prices policies with them, and profiles store them per run. So a
cost model records what it was measured for (draft, target, compression, compute dtype,
threads and the machine's fingerprint, :mod:`speckv.machine`), and :meth:`CostModel.check`
refuses to price a run it was not measured for.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from speckv.decode.tree import additive_mask, verify_mask
from speckv.errors import SpeckvError
from speckv.llm.feature_draft import is_feature_draft
from speckv.machine import fingerprint as machine_fingerprint
from speckv.machine import mismatch as machine_mismatch
from speckv.runtime.costs import step_costs
from speckv.runtime.features import GAMMA_MAX
from speckv.runtime.proposal import TREES

if TYPE_CHECKING:
    from transformers import DynamicCache

    from speckv.llm.load import LoadedModel
    from speckv.runtime.proposal import Proposal

#: context length of the timing runs: the middle of a typical prompt plus answer.
CONTEXT_LEN: Final = 200
REPEATS: Final = 7
WARMUP: Final = 2


class CostError(SpeckvError, ValueError):
    """A cost file or cost model is unusable; the message says how to get a valid one."""


def lm_forward(model: torch.nn.Module, ids: list[int], cache: DynamicCache,
               keep: int = 1, tree: Proposal | None = None) -> torch.Tensor:
    """One causal-LM forward over ``ids`` appended to ``cache``; logits of the last ``keep``.

    This is the only forward call speculative decoding makes (draft catch-up and proposals,
    target verification, plain target steps), so the cost model times exactly it. Returns
    ``[keep, vocab]`` in the model's compute dtype; the cache grows by ``len(ids)``. With
    ``tree`` (``ids`` = ``[root, *tree.tokens]``, a tree that is not a chain) each position
    attends to the cache and its own ancestors, at position ``past + depth``
    (:func:`speckv.decode.tree.verify_mask`).
    """
    device = getattr(model, "device", None)  # on the model's device (cpu, cuda)
    kwargs = {}
    if tree is not None and not tree.is_chain:
        past = cache.get_seq_length()
        depths = torch.from_numpy(np.concatenate([[0], tree.depths]))
        kwargs = {"attention_mask": additive_mask(verify_mask(tree, past), model),
                  "position_ids": (past + depths)[None].to(device)}
    out = model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True,
                logits_to_keep=keep, **kwargs)
    return out.logits[0]


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty KV cache for ``model`` (croppable: every layer is full attention); a model
    with its own cache type (speckv's feature-conditioned draft) makes it."""
    from transformers import DynamicCache

    if is_feature_draft(model):
        return model.new_cache()
    return DynamicCache(config=model.config)


@dataclass
class CostModel:
    """Seconds per forward on this machine, for one draft/target pair at one compression.

    ``cost_verify_s[g]`` is one target forward over ``g + 1`` tokens (``g`` drafted tokens
    plus the last emitted one), ``g = 0..GAMMA_MAX``; ``cost_verify_s[0]`` is a plain
    autoregressive target step. ``cost_draft_s`` is one draft forward of one token.
    ``machine`` is :func:`speckv.machine.fingerprint` of the measuring machine (``None`` in
    files written before speckv recorded it: :meth:`check` refuses those).
    """

    cost_draft_s: float
    cost_verify_s: list[float]
    compression: str
    compute_dtype: str
    context_len: int = CONTEXT_LEN
    draft_model: str = ""
    target_model: str = ""
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] | None = None
    #: seconds of one draft forward over n = 1, 2, ... tokens (the catch-up after plain
    #: steps), measured by :func:`speckv.decode.decoder.measure_catchup`; None: not measured
    cost_catchup_s: list[float] | None = None
    #: per tree of speckv.runtime.proposal.TREES: seconds of its growth after the catch-up
    #: and of the target's forward over it (:func:`measure_tree_costs`); None: not measured
    cost_tree_draft_s: list[float] | None = None
    cost_tree_verify_s: list[float] | None = None

    def __post_init__(self) -> None:
        verify = [float(v) for v in self.cost_verify_s]
        if len(verify) != GAMMA_MAX + 1:
            raise CostError(f"cost_verify_s needs {GAMMA_MAX + 1} values (g = 0..{GAMMA_MAX}), "
                            f"got {len(verify)}. Re-measure with "
                            "speckv.decode.costs.measure_costs.")
        values = [float(self.cost_draft_s), *verify]
        if not all(np.isfinite(v) and v > 0 for v in values):
            raise CostError(f"costs must be positive seconds, got draft {self.cost_draft_s} and "
                            f"verify {verify}. Re-measure with speckv.decode.costs.measure_costs.")
        self.cost_draft_s = float(self.cost_draft_s)
        self.cost_verify_s = verify
        for name in ("cost_tree_draft_s", "cost_tree_verify_s"):
            values = getattr(self, name)
            if values is None:
                continue
            values = [float(v) for v in values]
            if len(values) != len(TREES) or not all(np.isfinite(v) and v > 0 for v in values):
                raise CostError(f"{name} needs {len(TREES)} positive seconds (one per tree of "
                                f"speckv.runtime.proposal.TREES), got {values}. Re-measure "
                                "with speckv.decode.costs.measure_tree_costs.")
            setattr(self, name, values)
        if self.machine is not None and not isinstance(self.machine, dict):
            raise CostError(f"machine must be a fingerprint object (speckv.machine.fingerprint),"
                            f" got {type(self.machine).__name__}. Re-measure with "
                            "speckv.decode.costs.measure_costs.")

    def mismatches(self, *, compression: str, target_model: str, draft_model: str | None,
                   threads: int, compute_dtype: str | None = None,
                   fingerprint: dict[str, Any] | None = None) -> list[str]:
        """What differs between what these costs were measured for and the run described;
        empty when they may price it. ``draft_model=None`` skips the draft (a run without
        one). ``fingerprint`` defaults to this machine's."""
        found = []

        def differ(name: str, there: Any, here: Any) -> None:
            if there != here:
                found.append(f"{name}: {there!r} there, {here!r} here")

        differ("compression", self.compression, compression)
        if not _same_model(self.target_model, target_model):
            differ("target", self.target_model, target_model)
        if draft_model is not None and not _same_model(self.draft_model, draft_model):
            differ("draft", self.draft_model, draft_model)
        if compute_dtype is not None:
            differ("compute dtype", self.compute_dtype, compute_dtype)
        differ("threads", self.threads, threads)
        if not self.machine:
            found.append("machine: no fingerprint there (measured before speckv recorded one)")
        else:  # threads are compared above, from the cost model's own field
            here = fingerprint or machine_fingerprint(threads)
            found += [f"machine {m}" for m in machine_mismatch(self.machine, here)
                      if not m.startswith("threads:")]
        return found

    def check(self, *, compression: str, target_model: str, draft_model: str | None,
              threads: int, compute_dtype: str | None = None,
              fingerprint: dict[str, Any] | None = None, source: str | Path | None = None,
              ) -> CostModel:
        """Refuse (:class:`CostError`) to price a run these costs were not measured for:
        another compression, target, draft, compute dtype, thread count or machine (see
        :meth:`mismatches`). Returns ``self``."""
        found = self.mismatches(compression=compression, target_model=target_model,
                                draft_model=draft_model, threads=threads,
                                compute_dtype=compute_dtype, fingerprint=fingerprint)
        if found:
            what = f"Cost file {source}" if source else "This cost model"
            raise CostError(
                f"{what} was not measured for this run ({'; '.join(found)}), so its step "
                "costs would misprice every γ. Re-measure for this run: drop --costs (speckv "
                "measures at start-up) and add --save-costs FILE to keep the result, or pass "
                "the cost file measured with this draft, target, compression, dtype, thread "
                "count and machine.")
        return self

    def step_costs(self) -> np.ndarray:
        """Seconds of a step drafting each candidate γ (``[GAMMA_MAX]``, float32)."""
        return step_costs(self.cost_draft_s, self.cost_verify_s)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` it, or nest it in run metadata)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> CostModel:
        """Rebuild from :meth:`to_json`'s dict (or its ``json.dumps`` string)."""
        if isinstance(data, str):
            data = json.loads(data)
        try:
            return cls(**data)
        except TypeError as exc:
            raise CostError(f"Not a speckv cost model ({exc}); write one with "
                            "`CostModel.save` or `speckv generate --save-costs`.") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise CostError(f"Cost file {path} does not exist; measure one with "
                            "`speckv generate --save-costs PATH` (or omit --costs to measure).")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as exc:
            raise CostError(f"Cost file {path} is not JSON ({exc.msg}).") from None


def _same_model(a: str, b: str) -> bool:
    """The same model name, or two spellings of one local path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def module_of(model: torch.nn.Module | LoadedModel | None) -> torch.nn.Module | None:
    """The ``nn.Module`` of a bare model or of a :class:`~speckv.llm.load.LoadedModel`."""
    return model if model is None or isinstance(model, torch.nn.Module) else model.model


def _seconds(fn: Callable[[], None]) -> float:
    """Wall seconds of ``fn`` (on a GPU, until its kernels have finished)."""
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


@torch.inference_mode()
def measure_costs(draft: torch.nn.Module | LoadedModel, target: torch.nn.Module | LoadedModel,
                  context_len: int = CONTEXT_LEN, repeats: int = REPEATS,
                  warmup: int = WARMUP, compression: str | None = None,
                  compute_dtype: str | None = None) -> CostModel:
    """Time the decoder's forward calls; the median of ``repeats`` after ``warmup`` runs.

    Both caches are filled with ``context_len`` tokens first. Each timed call is followed by
    a crop back to ``context_len`` (not timed), as the decoder's rollback would do. The
    candidate sizes are timed round-robin, so a burst of background load spreads over all of
    them instead of inflating one. ``draft``/``target`` are :class:`~speckv.llm.load.LoadedModel`
    (compression and dtype are read from them) or bare modules (pass ``compression``).
    """
    d_model, t_model = module_of(draft), module_of(target)
    compression = compression or getattr(target, "compression", None) or "fp16"
    compute_dtype = compute_dtype or getattr(target, "compute_dtype", None) or str(
        next(t_model.parameters()).dtype).removeprefix("torch.")
    vocab = min(int(d_model.config.vocab_size), int(t_model.config.vocab_size))
    rng = np.random.default_rng(0)
    context = rng.integers(3, vocab, size=context_len).tolist()
    probe = rng.integers(3, vocab, size=GAMMA_MAX + 1).tolist()

    d_cache, t_cache = new_cache(d_model), new_cache(t_model)
    lm_forward(d_model, context, d_cache)
    lm_forward(t_model, context, t_cache)

    def draft_call() -> None:
        lm_forward(d_model, probe[:1], d_cache)
        d_cache.crop(-1)

    def verify_call(g: int) -> None:
        lm_forward(t_model, probe[: g + 1], t_cache, keep=g + 1)
        t_cache.crop(-(g + 1))

    for _ in range(warmup):
        draft_call()
        for g in range(GAMMA_MAX + 1):
            verify_call(g)
    draft_times: list[float] = []
    verify_times: list[list[float]] = [[] for _ in range(GAMMA_MAX + 1)]
    for _ in range(repeats):
        for g in range(GAMMA_MAX + 1):
            draft_times.append(_seconds(draft_call))
            verify_times[g].append(_seconds(lambda g=g: verify_call(g)))
    return CostModel(
        cost_draft_s=statistics.median(draft_times),
        cost_verify_s=[statistics.median(v) for v in verify_times],
        compression=compression,
        compute_dtype=compute_dtype,
        context_len=context_len,
        draft_model=getattr(draft, "name", type(d_model).__name__),
        target_model=getattr(target, "name", type(t_model).__name__),
        threads=torch.get_num_threads(),
        machine=machine_fingerprint(torch.get_num_threads()),
    )


@torch.inference_mode()
def measure_tree_costs(costs: CostModel, draft: torch.nn.Module | LoadedModel,
                       target: torch.nn.Module | LoadedModel, repeats: int = REPEATS,
                       warmup: int = WARMUP) -> CostModel:
    """``costs`` with each tree's measured costs (a new object), timed as the decoder runs
    them after a ``costs.context_len``-token context: the growth of the tree from the draft's
    distribution after the context (:func:`speckv.decode.tree.grow`, its draft forwards and
    bookkeeping, then the draft's cache dropped back) and the target's forward over the grown
    tree with its mask, cropped back after each call. The trees are timed round-robin."""
    import dataclasses

    from speckv.decode.tree import Root, TreeDraft, grow

    d_model, t_model = module_of(draft), module_of(target)
    vocab = min(int(d_model.config.vocab_size), int(t_model.config.vocab_size))
    context = np.random.default_rng(2).integers(3, vocab, size=costs.context_len).tolist()
    d_cache, t_cache = new_cache(d_model), new_cache(t_model)
    root_logits = lm_forward(d_model, context, d_cache)[-1]
    lm_forward(t_model, context[:-1], t_cache)
    base = d_cache.get_seq_length()
    root = Root(root_logits, 0, base, base, getattr(d_cache, "own", None))
    grown = {}

    def grow_call(i: int) -> None:
        shape = TREES[i]
        tree_draft = TreeDraft(d_model, d_cache, [root])
        grown[i] = grow(tree_draft, [root], shape.depth, shape.branch)[0].top(shape).proposal
        tree_draft.reset()

    def verify_call(i: int) -> None:
        tree = grown[i]
        lm_forward(t_model, [context[-1], *tree.tokens.tolist()], t_cache, keep=len(tree) + 1,
                   tree=tree)
        t_cache.crop(-(len(tree) + 1))

    for _ in range(warmup):
        for i in range(len(TREES)):
            grow_call(i)
            verify_call(i)
    grow_times: list[list[float]] = [[] for _ in TREES]
    verify_times: list[list[float]] = [[] for _ in TREES]
    for _ in range(repeats):
        for i in range(len(TREES)):
            grow_times[i].append(_seconds(lambda i=i: grow_call(i)))
            verify_times[i].append(_seconds(lambda i=i: verify_call(i)))
    return dataclasses.replace(
        costs, cost_tree_draft_s=[statistics.median(t) for t in grow_times],
        cost_tree_verify_s=[statistics.median(t) for t in verify_times])
