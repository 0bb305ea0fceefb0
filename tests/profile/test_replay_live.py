"""Trace replay and the live decoder agree exactly under greedy decoding (tiny fp32 models).

This is the property the whole offline pipeline rests on: a policy scored by replaying trace
records takes the same steps, drafts and accepts the same tokens, and sees the same
decision-time features as the same policy run live; also a policy that declines to speculate
at some steps (before the draft runs, or after its first forward), whose pre-draft features
come from a history the draft has not caught up on.
"""

from __future__ import annotations

import numpy as np
import pytest
from locations import FIXTURES
from tiny_models import DECODE_PROMPTS

from speckv.decode.costs import CostModel
from speckv.decode.decoder import SpeculativeDecoder
from speckv.evaluate.replay import prepare, replay
from speckv.policies import (
    PLAIN,
    BestStatic,
    ConfidenceStop,
    FixedGamma,
    FixedTree,
    Heuristic,
    JoinLookup,
    Learned,
    LearnedLookup,
    LookupContext,
    LookupRule,
    PreContext,
    StepContext,
    from_spec,
    probe_due,
)
from speckv.profile.profiler import trace_prompt, trace_rows
from speckv.runtime.costs import drafting_costs, tree_step_costs
from speckv.runtime.features import pre_from_step_features
from speckv.runtime.proposal import TREES, tree_code, tree_index

IDENT = {"run_id": "r", "draft_model": "d", "target_model": "t", "compression": "fp16",
         "compute_dtype": "float32", "task": "chat", "prompt_id": "p"}
#: the two kinds of draft: a causal LM (a noisy copy of the target) and a feature-conditioned
#: draft (speckv.llm.feature_draft), whose drafted tokens read its own states
PAIRS = {"lm": "tiny_pair", "feature": "tiny_feature_pair"}
COSTS = {"cost_draft_s": 0.01, "cost_verify_s": [0.03 + 0.002 * g for g in range(9)],
         "cost_tree_draft_s": [0.01 * t.draft_forwards + 0.002 for t in TREES],
         "cost_tree_verify_s": [0.03 + 0.001 * t.size for t in TREES]}


def _cost_model() -> CostModel:
    return CostModel(COSTS["cost_draft_s"], COSTS["cost_verify_s"], "fp16", "float32",
                     cost_tree_draft_s=COSTS["cost_tree_draft_s"],
                     cost_tree_verify_s=COSTS["cost_tree_verify_s"])
PROMPTS = DECODE_PROMPTS


class SkipPattern:
    """Declines to speculate (before the draft) at every third position; else fixed γ."""

    name = "skip-pattern"
    token_stats = frozenset()

    def __init__(self, gamma: int = 3) -> None:
        self.gamma = gamma

    def reset(self) -> None:
        pass

    def speculate(self, ctx: PreContext) -> bool:
        return ctx.position % 3 != 1

    def choose(self, ctx: StepContext) -> int:
        return self.gamma

    def keep_drafting(self, k, top1, entropy) -> bool:
        return True

    def observe(self, drafted, accepted) -> None:
        pass


class StaleEmaSkip(SkipPattern):
    """Speculates while the settled agreement EMA is high, probing after 3 plain steps: its
    decisions read the pre-draft history, which stops growing while it declines."""

    name = "stale-ema-skip"

    def speculate(self, ctx: PreContext) -> bool:
        return probe_due(ctx.skipped, 3) or bool(ctx.features[1] >= 0.55)


class PlainAfterDraft(SkipPattern):
    """Drafts once, then takes a plain step when the proposal looks unsure (choose -> 0)."""

    name = "plain-after-draft"

    def speculate(self, ctx: PreContext) -> bool:
        return True

    def choose(self, ctx: StepContext) -> int:
        return PLAIN if ctx.features[1] < 0.5 else 2


class Mixed(SkipPattern):
    """Trees, chains and plain steps by position, decided before and after the draft."""

    name = "mixed"

    def speculate(self, ctx: PreContext) -> bool:
        return ctx.position % 5 != 2

    def choose(self, ctx: StepContext) -> int:
        return [tree_code(1), 2, PLAIN, tree_code(3), tree_code(0), 5][ctx.position % 6]


class CheapestTree(SkipPattern):
    """Chooses by the tree costs it is handed: the tree with the best (depth + 1) / cost
    (what replay hands it must equal what the decoder hands it)."""

    name = "cheapest-tree"

    def speculate(self, ctx: PreContext) -> bool:
        return True

    def choose(self, ctx: StepContext) -> int:
        value = [(t.depth + 1) / c for t, c in zip(TREES, ctx.tree_costs, strict=True)]
        return tree_code(int(np.argmax(value)))


class Recording:
    """Wraps a policy; records what each decision saw."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name
        self.token_stats = getattr(inner, "token_stats", frozenset({"top1", "entropy"}))
        for name in ("lookup", "join_lookup"):  # a policy that uses the context lookup
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))
        self.pre: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.step: list[tuple[int, np.ndarray, np.ndarray]] = []

    def reset(self) -> None:
        self.inner.reset()

    def speculate(self, ctx: PreContext) -> bool:
        self.pre.append((ctx.position, np.array(ctx.features), np.array(ctx.costs)))
        inner = getattr(self.inner, "speculate", None)
        return True if inner is None else inner(ctx)

    def choose(self, ctx: StepContext) -> int:
        costs = np.concatenate([ctx.costs, ctx.tree_costs])  # chains and trees, both priced
        self.step.append((ctx.position, np.array(ctx.features), costs))
        return self.inner.choose(ctx)

    def keep_drafting(self, k, top1, entropy) -> bool:
        return self.inner.keep_drafting(k, top1, entropy)

    def observe(self, drafted, accepted) -> None:
        self.inner.observe(drafted, accepted)


def _replay_steps(rows, policy, reads_target=False):
    """Per-step (position, drafted, accepted) of a replay written out by hand (independent of
    :func:`speckv.evaluate.replay.replay`), tracking the tokens the draft has not scored: a
    bonus token after a full acceptance, or, for a feature-conditioned draft, every emitted
    token but the first."""
    from speckv.records import feature_matrix

    feats = feature_matrix(rows)
    accept = rows["accept_len"].to_numpy()
    tree_accept = np.stack(rows["tree_accept_len"]).astype(int)
    lookup = rows[["lookup_accept", "lookup_length", "lookup_match", "lookup_occurrences",
                   "lookup_agreeing"]].to_numpy(int)
    top1 = np.stack(rows["draft_top1_k"])
    ent = np.stack(rows["draft_entropy_k"])
    n, budget = len(rows), int(rows["max_new_tokens"].iat[0])
    verify = np.asarray(COSTS["cost_verify_s"])
    p = unsettled = skipped = 0
    out = []
    policy.reset()
    while p < n:
        left = budget - p - 1
        if left == 0:
            out.append((p, 0, 0))
            break
        costs = drafting_costs(COSTS["cost_draft_s"], verify, None, unsettled + 1)
        speculate = getattr(policy, "speculate", None)
        pre = pre_from_step_features(feats[p], feats[p - unsettled], unsettled)[0]
        a, length, match, occurrences, agreeing = lookup[p]
        trees = tree_step_costs(COSTS["cost_draft_s"], COSTS["cost_tree_draft_s"],
                                COSTS["cost_tree_verify_s"], None, unsettled + 1)
        pre_ctx = PreContext(pre, "fp16", p, min(8, left), costs, float(verify[0]),
                             unsettled + 1, skipped, tree_costs=trees)
        if hasattr(policy, "lookup") and length and policy.lookup(LookupContext(
                pre_ctx, length, match, occurrences, agreeing, float(verify[length]))):
            assert length <= min(8, left) and a <= min(length, n - p)
            out.append((p, "lookup", a))
            made = min(a + 1, n - p)
            p, unsettled, skipped = p + made, unsettled + made, skipped + 1
            continue
        if speculate is not None and not speculate(pre_ctx):
            out.append((p, 0, 0))
            p, unsettled, skipped = p + 1, unsettled + 1, skipped + 1
            continue
        skipped = unsettled = 0
        g = policy.choose(StepContext(feats[p], "fp16", p, min(8, left), costs, tree_step_costs(
            COSTS["cost_draft_s"], COSTS["cost_tree_draft_s"], COSTS["cost_tree_verify_s"])))
        if g == PLAIN:
            out.append((p, 0, 0))
            p += 1
            continue
        if tree_index(g) is not None:  # a tree: every emitted token but the first waits
            shape = TREES[tree_index(g)]
            depth = min(shape.depth, left)
            a = int(tree_accept[p, tree_index(g)])
            assert a <= min(depth, n - p)
            if hasattr(policy, "join_lookup") and length and policy.join_lookup(
                    length, match, occurrences, agreeing):  # the longer of the two walks
                a, depth = max(a, int(lookup[p, 0])), max(depth, length)
            policy.observe(depth, a)
            out.append((p, "tree", a))
            made = min(a + 1, n - p)
            unsettled = made - 1
            p += made
            continue
        g = min(g, 8, left)
        d = next((k for k in range(1, g) if not policy.keep_drafting(k, top1[p, k - 1],
                                                                    ent[p, k - 1])), g)
        a = min(int(accept[p]), d, n - p)  # an accepted EOS ends the answer
        policy.observe(d, a)
        out.append((p, d, a))
        made = min(a + 1, n - p)
        unsettled = made - 1 if reads_target else int(a == d and a < n - p)
        p += made
    return out


def _controller_policy():
    from speckv.policies import load_onnx_chooser

    return Learned(load_onnx_chooser(FIXTURES / "controller_tiny.onnx"))


POLICIES = {
    "fixed:1": lambda: FixedGamma(1), "fixed:3": lambda: FixedGamma(3),
    "fixed:8": lambda: FixedGamma(8), "heuristic": Heuristic,
    "confidence": lambda: ConfidenceStop(0.4),
    "best_static:plain": lambda: BestStatic({"fp16": PLAIN}),
    "best_static:2": lambda: BestStatic({"fp16": 2}),
    "skip-pattern": SkipPattern, "stale-ema-skip": StaleEmaSkip,
    "plain-after-draft": PlainAfterDraft, "learned-onnx": _controller_policy,
    "tree:4": lambda: FixedTree(4), "tree:16": lambda: FixedTree(16),
    "tree:64": lambda: FixedTree(64), "mixed": Mixed, "cheapest-tree": CheapestTree,
    "lookup:1": lambda: LookupRule(1), "lookup:2+fixed:3": lambda: from_spec("lookup:2+fixed:3"),
    "lookup:1+tree:8": lambda: from_spec("lookup:1+tree:8"),
    "lookup:1+skip-pattern": lambda: LookupRule(1, SkipPattern()),
    "join:1+tree:4": lambda: from_spec("join:1+tree:4"),
    "join:2+lookup:3+mixed": lambda: JoinLookup(2, LookupRule(3, Mixed())),
    "lookup:auto+learned-onnx": lambda: LearnedLookup(_controller_policy()),
}


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_replay_reproduces_live_greedy_decoding(request, kind, policy_name, prompt):
    make_policy = POLICIES[policy_name]
    draft, target = request.getfixturevalue(PAIRS[kind])
    tr = trace_prompt(draft, target, prompt, max_new_tokens=30, eos=2, pad=0)
    rows = trace_rows(tr, {**IDENT, "draft_kind": kind}, COSTS)
    costs = _cost_model()
    live_policy = Recording(make_policy())
    live = SpeculativeDecoder(draft, target, live_policy, costs, compression="fp16",
                              eos_token_ids=[2]).generate(prompt, max_new_tokens=30)
    assert live.token_ids == tr.answer.tolist(), "greedy speculative output must be lossless"

    expected = _replay_steps(rows, make_policy(), reads_target=kind == "feature")
    got = [(s["position"], "lookup" if s["source"] == "lookup" else "tree" if s["tree_size"]
            else s["drafted"] or 0, s["accept_len"]) for s in live.steps]
    assert got == expected
    drafted = [s["drafted"] or 0 for s in live.steps]

    # the replay engine of `speckv evaluate` agrees on the totals and on what it decided from
    replayed = Recording(make_policy())
    totals = replay(prepare(rows), replayed)
    assert int(totals.steps[0]) == len(live.steps)
    assert int(totals.accepted[0]) == sum(a for _, _, a in got)
    assert int(totals.drafted[0]) == sum(drafted)  # a tree's nodes count as drafted
    assert int(totals.chosen[0, 0]) == sum(1 for s in live.steps if not s["drafted"]
                                           and s["position"] < 29)
    for name in ("pre", "step"):  # same decisions, at the same positions, on the same inputs
        seen_live, seen_replay = getattr(live_policy, name), getattr(replayed, name)
        assert [p for p, _, _ in seen_live] == [p for p, _, _ in seen_replay], name
        for (p, f_live, c_live), (_, f_replay, c_replay) in zip(seen_live, seen_replay,
                                                               strict=True):
            np.testing.assert_allclose(f_live, f_replay, atol=1e-4, err_msg=f"{name} at {p}")
            np.testing.assert_allclose(c_live, c_replay, rtol=1e-6, err_msg=f"{name} at {p}")

    # live decision-time features equal the trace's at every visited position
    for step in live.steps:
        if step["source"] != "draft":  # plain and lookup steps: the draft did not run
            continue
        row = rows.iloc[step["position"]]
        for col in ("draft_entropy", "draft_top1", "draft_margin", "target_top1_prev",
                    "agree_ema", "agree_run"):
            assert step[col] == pytest.approx(float(row[col]), abs=1e-4), (col, step["position"])


@pytest.mark.parametrize("kind", list(PAIRS))
def test_the_skipping_policies_skip_and_probe(request, kind):
    """The parametrised test above means something only if plain steps happen, in runs."""
    draft, target = request.getfixturevalue(PAIRS[kind])
    for name in ("skip-pattern", "stale-ema-skip", "plain-after-draft", "learned-onnx",
                 "best_static:plain", "mixed"):
        costs = _cost_model()
        if name == "learned-onnx":  # a dearer draft: the fixture controller then declines
            costs = CostModel(3 * COSTS["cost_draft_s"], COSTS["cost_verify_s"], "fp16",
                              "float32")
        plain = drafted = 0
        for prompt in PROMPTS:
            steps = SpeculativeDecoder(draft, target, POLICIES[name](), costs,
                                       eos_token_ids=[2]).generate(prompt, 30).steps
            plain += sum(1 for s in steps[:-1] if not s["drafted"])
            drafted += sum(1 for s in steps if s["drafted"])
        assert plain > 0, name
        assert drafted > 0 or name == "best_static:plain", name


@pytest.mark.parametrize("kind", list(PAIRS))
def test_the_learned_source_choice_takes_the_lookup_and_the_draft(request, kind):
    """The lookup:auto case above means something only if the controller chooses both
    sources on these prompts, and declines the lookup somewhere it proposes."""
    draft, target = request.getfixturevalue(PAIRS[kind])
    sources, declined = [], 0
    for prompt in PROMPTS:
        policy = Recording(POLICIES["lookup:auto+learned-onnx"]())
        asked: list[bool] = []

        def lookup(ctx, inner=policy.lookup, asked=asked) -> bool:
            asked.append(inner(ctx))
            return asked[-1]

        policy.lookup = lookup
        steps = SpeculativeDecoder(draft, target, policy, _cost_model(),
                                   eos_token_ids=[2]).generate(prompt, 30).steps
        sources += [s["source"] for s in steps]
        declined += asked.count(False)
    assert "lookup" in sources and "draft" in sources
    assert declined > 0


def test_the_feature_draft_accepts_chains_of_its_own_states(tiny_feature_pair):
    """The feature-conditioned pair exercises what sets it apart: steps that accept two or
    more drafted tokens (the second read the draft's own state), and steps that do not."""
    draft, target = tiny_feature_pair
    accepted = []
    for prompt in PROMPTS:
        tr = trace_prompt(draft, target, prompt, max_new_tokens=30, eos=2, pad=0)
        accepted += tr.accept_len.tolist()
    assert sum(a >= 2 for a in accepted) >= 10
    assert sum(a == 0 for a in accepted) >= 5
