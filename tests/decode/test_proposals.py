"""A step's candidates (speckv.runtime.proposal): token trees (speckv.decode.tree) grown,
verified and rolled back, and the context lookup's continuations (speckv.runtime.lookup).

Greedy output with every tree must equal plain greedy decoding exactly on tiny float64 models
(see test_decode.py's ``reference_greedy``) and pass the tree-aware greedy invariant; the
caches must hold exactly the emitted prefix after every tree step; sampled trees must keep
the target's joint distribution (χ²); a tree grown for many roots at once must equal the tree
grown for each alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from goodness import chi2_pvalue
from tiny_models import reference_greedy, tiny_feature_draft, tiny_llama

from speckv.decode.costs import lm_forward, new_cache
from speckv.decode.decoder import DecodeError, SpeculativeDecoder
from speckv.decode.invariant import greedy_invariant
from speckv.decode.tree import Root, Slots, TreeDraft, grow
from speckv.policies import FixedGamma, FixedTree, PolicyError, from_spec
from speckv.runtime.proposal import (
    N_OPTIONS,
    TREE_SIZES,
    TREES,
    Proposal,
    TreeShape,
    option_name,
    tree_code,
    tree_index,
)

PROMPT = [1, 5, 17, 33, 8, 90]


# ------------------------------------------------------------------------------ proposals
def test_a_chain_is_the_tree_of_width_one():
    chain = Proposal.chain([7, 8, 9])
    assert chain.is_chain and chain.depths.tolist() == [1, 2, 3]
    assert chain.mask().tolist() == np.tril(np.ones((4, 4), bool)).tolist()
    target = {-1: 7, 0: 8, 1: 5}  # accepts 7, 8, then the target wants 5
    assert chain.walk(target.get) == [0, 1]


def test_walk_follows_the_targets_token_down_the_tree():
    #        root
    #       /    \
    #     4(0)   6(1)
    #    /   \      \
    #  2(2)  3(3)   9(4)
    tree = Proposal(np.array([4, 6, 2, 3, 9]), np.array([-1, -1, 0, 0, 1]))
    assert not tree.is_chain and tree.depths.tolist() == [1, 1, 2, 2, 2]
    nxt = {-1: 6, 1: 9, 4: 1}
    assert tree.walk(nxt.get) == [1, 4]
    assert tree.walk({-1: 4, 0: 3, 3: 8}.get) == [0, 3]
    assert tree.walk({-1: 5}.get) == []
    assert tree.walk(lambda node: None) == []  # past a trace's answer
    mask = tree.mask()
    assert mask[4].tolist() == [True, True, False, False, True, False]  # node 3: root, 0, self
    assert tree.path_to(4) == [1, 4] and tree.children(0) == [2, 3]


def test_top_keeps_the_best_nodes_and_their_parents():
    tree = Proposal(np.array([4, 6, 2, 3, 9]), np.array([-1, -1, 0, 0, 1]),
                    scores=np.array([-0.1, -0.5, -0.6, -0.9, -1.0]))
    small = tree.top(3, depth=2)
    assert small.tokens.tolist() == [4, 6, 2] and small.parents.tolist() == [-1, -1, 0]
    assert tree.top(5, depth=1).tokens.tolist() == [4, 6]
    with pytest.raises(ValueError, match="parent"):
        tree.subset(np.array([2]))


def test_option_codes_name_plain_chains_and_trees():
    assert option_name(0) == "plain" and option_name(3) == "fixed:3"
    assert [option_name(tree_code(i)) for i in range(len(TREES))] == [
        f"tree:{n}" for n in TREE_SIZES]
    assert tree_index(8) is None and tree_index(N_OPTIONS - 2) == len(TREES) - 1
    assert option_name(N_OPTIONS - 1) == "lookup" and tree_index(N_OPTIONS - 1) is None
    assert isinstance(from_spec("tree:16"), FixedTree)
    with pytest.raises(ValueError, match="no tree of 5 nodes"):
        from_spec("tree:5")


# --------------------------------------------------------------------------------- growth
def _roots_from(draft, seq, positions):
    """Roots at every answer position of ``seq`` (a teacher-forced cache over all of it)."""
    cache = new_cache(draft)
    logits = lm_forward(draft, seq, cache, keep=len(seq))
    return cache, [Root(logits[p - 1], 0, p, p) for p in positions]


def test_a_joined_branch_shares_the_trees_nodes_and_accepts_the_longer_walk():
    #        root                root
    #       /    \     +7,2,5   /    \
    #     7(0)   6(1)   ==>   7(0)   6(1)
    #    /                    /   \
    #  3(2)                 3(2)  2(3)
    #                               \
    #                               5(4)
    tree = Proposal(np.array([7, 6, 3]), np.array([-1, -1, 0]), scores=np.zeros(3))
    joined, added = tree.with_branch([7, 2, 5])
    assert added == 2 and joined.source == "draft+lookup"
    assert joined.tokens.tolist() == [7, 6, 3, 2, 5]
    assert joined.parents.tolist() == [-1, -1, 0, 0, 3]
    assert tree.with_branch([7, 3])[1] == 0  # wholly inside: nothing added
    branch = Proposal.chain([7, 2, 5], "lookup")
    rng = np.random.default_rng(0)
    for _ in range(200):  # any target continuation: the longer of the two walks
        follow = rng.integers(2, 8, 4).tolist()
        def nxt(node, prop, follow=follow):
            depth = 0 if node < 0 else int(prop.depths[node])
            return follow[depth] if depth < len(follow) else None
        got = len(joined.walk(lambda n: nxt(n, joined)))
        assert got == max(len(tree.walk(lambda n: nxt(n, tree))),
                          len(branch.walk(lambda n: nxt(n, branch))))


@pytest.mark.parametrize("draft_name", ["noisy", "random"])
def test_trees_grown_together_equal_trees_grown_alone(drafts, draft_name):
    draft = drafts[draft_name]
    seq = [*PROMPT, 3, 44, 12, 9, 70, 2, 31]
    positions = list(range(len(PROMPT), len(seq) + 1))
    cache, roots = _roots_from(draft, seq, positions)
    together = grow(TreeDraft(draft, cache, roots), roots, depth=4, branch=3)
    for p, tree in zip(positions, together, strict=True):
        alone_cache = new_cache(draft)
        logits = lm_forward(draft, seq[:p], alone_cache)
        root = Root(logits[-1], 0, p, p)
        draft_alone = TreeDraft(draft, alone_cache, [root])
        alone = grow(draft_alone, [root], depth=4, branch=3)[0]
        draft_alone.reset()
        assert alone_cache.get_seq_length() == p  # reset drops every node
        assert alone.proposal.tokens.tolist() == tree.proposal.tokens.tolist()
        assert alone.proposal.parents.tolist() == tree.proposal.parents.tolist()
        np.testing.assert_allclose(alone.proposal.scores, tree.proposal.scores, atol=1e-9)


def test_a_tree_holds_each_nodes_best_children_by_cumulative_probability(drafts):
    draft = drafts["noisy"]
    cache, (root,) = _roots_from(draft, PROMPT, [len(PROMPT)])
    grown = grow(TreeDraft(draft, cache, [root]), [root], depth=3, branch=2)[0].proposal
    scores = grown.scores
    assert (np.diff(scores) <= 1e-12).all()  # best first
    logp = torch.log_softmax(root.logits.double(), -1)
    level1 = [j for j in range(len(grown)) if grown.parents[j] < 0]
    assert grown.tokens[level1].tolist() == logp.topk(2).indices.tolist()
    for j in range(len(grown)):  # a child's score is its parent's plus its own log-probability
        if grown.parents[j] >= 0:
            assert scores[j] <= scores[grown.parents[j]]
    # level 2 expands both level-1 nodes; level 3 only the 2 best of level 2's 4 nodes
    assert len(grown) == 2 + 4 + 4
    assert (grown.top(5, 3).depths <= 3).all() and len(grown.top(5, 3)) == 5


# ------------------------------------------------------------------------ live and exact
TREE_POLICIES = [f"tree:{n}" for n in TREE_SIZES[:3]]


@pytest.mark.parametrize("draft_name", ["copy", "noisy", "random"])
@pytest.mark.parametrize("spec", TREE_POLICIES)
def test_greedy_trees_are_lossless(target, drafts, draft_name, spec):
    decoder = SpeculativeDecoder(drafts[draft_name], target, from_spec(spec), eos_token_ids=[])
    result = decoder.generate(PROMPT, 30)
    assert result.token_ids == reference_greedy(target, PROMPT, 30)
    assert greedy_invariant(target, PROMPT, result) == []
    trees = [s for s in result.steps if s["tree_size"] is not None]
    assert trees and all(s["drafted"] <= s["tree_size"] for s in trees)
    if draft_name == "copy":  # a perfect draft: every tree accepts its whole depth
        assert max(s["accept_len"] for s in trees) == TREES[TREE_SIZES.index(
            int(spec.split(":")[1]))].depth


class Alternate:
    """Chains, trees and plain steps in turn: the caches must survive every hand-over."""

    name = "alternate"

    def __init__(self) -> None:
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def choose(self, ctx) -> int:
        self.step += 1
        return [tree_code(1), 3, 0, tree_code(0), 1, tree_code(2)][self.step % 6]

    def keep_drafting(self, k, top1, entropy) -> bool:
        return True

    def observe(self, drafted, accepted) -> None:
        pass


@pytest.mark.parametrize("draft_name", ["copy", "noisy"])
def test_caches_hold_exactly_the_emitted_prefix_after_every_tree_step(target, drafts,
                                                                      draft_name):
    checked = []

    def check(view) -> None:
        assert view.target_cache.get_seq_length() == len(view.tokens) - 1
        assert view.draft_cache.get_seq_length() == view.draft_seen <= len(view.tokens)
        checked.append(view.record.get("tree_size"))

    decoder = SpeculativeDecoder(drafts[draft_name], target, Alternate(), eos_token_ids=[])
    result = decoder.generate(PROMPT, 40, on_step=check)
    assert result.token_ids == reference_greedy(target, PROMPT, 40)
    assert greedy_invariant(target, PROMPT, result) == []
    assert {None, 4, 8, 16} <= set(checked)


def test_a_tree_near_the_budgets_end_is_no_deeper_than_the_tokens_left(target, drafts):
    decoder = SpeculativeDecoder(drafts["copy"], target, FixedTree(64), eos_token_ids=[])
    for n in (2, 3, 5):
        result = decoder.generate(PROMPT, n)
        assert len(result.token_ids) == n
        assert all(s["accept_cap"] <= n - s["position"] - 1 for s in result.steps
                   if s["tree_size"])


def test_eos_inside_an_accepted_tree_path_ends_the_answer(target, drafts):
    ref = reference_greedy(target, PROMPT, 30)
    eos = ref[5]
    decoder = SpeculativeDecoder(drafts["copy"], target, FixedTree(16), eos_token_ids=[eos])
    result = decoder.generate(PROMPT, 30)
    assert result.token_ids == ref[: ref.index(eos) + 1] and result.stop == "eos"
    assert greedy_invariant(target, PROMPT, result) == []


@pytest.mark.parametrize("draft_name", ["copy", "random"])
def test_a_tree_with_the_lookup_joined_is_lossless_and_takes_the_longer_walk(
        target, drafts, draft_name):
    """join:1+tree:4 verifies the draft's tree and the context's continuation in one forward:
    the output is the target's greedy output, and where the draft is useless (random) the
    joined branch makes the steps lookup decoding alone would, fewer than the tree's."""
    prompt = [1, 5, 17, 33, 8, 90, 5, 17, 33, 8]  # the target's answer repeats itself
    runs = {}
    for spec in ("tree:4", "join:1+tree:4", "lookup:1"):
        result = SpeculativeDecoder(drafts[draft_name], target, from_spec(spec),
                                    eos_token_ids=[]).generate(prompt, 40)
        assert result.token_ids == reference_greedy(target, prompt, 40), spec
        assert greedy_invariant(target, prompt, result) == [], spec
        runs[spec] = result.steps
    joined = [s for s in runs["join:1+tree:4"] if s["source"] == "draft+lookup"]
    assert joined and all(s["accept_len"] >= s["lookup_accept"] for s in joined)
    assert all(s["drafted"] == s["tree_size"] == 4 for s in joined)  # the draft's nodes
    if draft_name == "random":
        assert any(s["lookup_accept"] > 0 for s in joined)
        assert len(runs["join:1+tree:4"]) < len(runs["tree:4"])
        assert len(runs["join:1+tree:4"]) <= len(runs["lookup:1"])


def test_a_joined_lookup_is_refused_when_sampling(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, from_spec("join:1+tree:4"))
    with pytest.raises(DecodeError, match="greedily only"):
        decoder.generate(PROMPT, 5, temperature=0.8)
    with pytest.raises(PolicyError, match="join:M\\+SPEC"):
        from_spec("join:2")


def test_a_feature_conditioned_draft_drafts_trees_losslessly(target):
    draft = tiny_feature_draft(target)
    for spec in ("tree:8", "tree:32"):
        decoder = SpeculativeDecoder(draft, target, from_spec(spec), eos_token_ids=[])
        result = decoder.generate(PROMPT, 30)
        assert result.token_ids == reference_greedy(target, PROMPT, 30)
        assert greedy_invariant(target, PROMPT, result) == []


def test_the_invariant_catches_a_tree_token_that_is_not_the_argmax(target, drafts):
    decoder = SpeculativeDecoder(drafts["noisy"], target, FixedTree(16), eos_token_ids=[])
    result = decoder.generate(PROMPT, 20)
    step = next(i for i, f in enumerate(result.target_forwards) if f.parents and f.path)
    fwd = result.target_forwards[step]
    at = sum(f.emitted for f in result.target_forwards[:step])  # its first emitted position
    bad = list(result.token_ids)
    bad[at + 1] = (bad[at + 1] + 1) % 100
    result.token_ids = bad
    assert fwd.path and any(v.position == at + 1 for v in greedy_invariant(target, PROMPT,
                                                                           result))


# ------------------------------------------------------------------------------- sampling
def test_sampled_trees_keep_the_targets_joint_distribution_of_two_tokens():
    """(t1, t2) sampled many times through tree steps, against the target's exact joint."""
    vocab, prompt, n, temperature = 8, [5], 1500, 0.9
    target = tiny_llama(2, seed=0, vocab=vocab, hidden=16, init=0.2)
    draft = tiny_llama(1, seed=1, vocab=vocab, hidden=16, init=0.2)
    with torch.inference_mode():
        first = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1]
                              / temperature, -1)
        pairs = torch.tensor([[prompt[0], t] for t in range(vocab)])
        second = torch.softmax(target(input_ids=pairs).logits[:, -1] / temperature, -1)
    joint = (first[:, None] * second).numpy().ravel()
    decoder = SpeculativeDecoder(draft, target, FixedTree(8), eos_token_ids=[])
    counts = np.zeros(vocab * vocab)
    accepted = []
    for seed in range(n):
        result = decoder.generate(prompt, 3, temperature=temperature, seed=seed)
        t1, t2 = result.token_ids[:2]
        counts[t1 * vocab + t2] += 1
        accepted.append(result.steps[0]["accept_len"])
    assert {0, 1, 2} <= set(accepted), "every verification path should be exercised"
    assert chi2_pvalue(counts, joint) > 1e-3
    again = decoder.generate(prompt, 3, temperature=temperature, seed=3).token_ids
    assert again == decoder.generate(prompt, 3, temperature=temperature, seed=3).token_ids


def test_sampled_slots_are_distinct_draws_scored_by_rank():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -9.0])
    slots = Slots(1.0, torch.Generator().manual_seed(0))
    (tokens,), (logp,), (q,) = slots.fill(logits[None], 4)
    assert len(set(tokens)) == 4 and torch.allclose(q, torch.softmax(logits, -1))
    np.testing.assert_allclose(logp, torch.log_softmax(logits, -1).topk(4).values, rtol=1e-6)
    firsts = [Slots(1.0, torch.Generator().manual_seed(s)).fill(logits[None], 2)[0][0][0]
              for s in range(2000)]
    counts = np.bincount(firsts, minlength=6)
    assert chi2_pvalue(counts, q.numpy()) > 1e-3  # the first draw follows q


def test_tree_shapes_are_checked():
    with pytest.raises(ValueError):
        TreeShape(4, 5, 4)
    assert FixedGamma(2).choose(None) == 2


# ---------------------------------------------------------------------------------- costs
def test_tree_costs_are_measured_priced_and_round_trip(target, drafts, tmp_path):
    from speckv.decode.costs import CostError, CostModel, measure_costs, measure_tree_costs
    from speckv.runtime.costs import StepCosts, tree_step_costs

    costs = measure_tree_costs(measure_costs(drafts["noisy"], target, repeats=1, warmup=0),
                               drafts["noisy"], target, repeats=1, warmup=0)
    assert len(costs.cost_tree_draft_s) == len(costs.cost_tree_verify_s) == len(TREES)
    assert min(costs.cost_tree_draft_s + costs.cost_tree_verify_s) > 0
    again = CostModel.load(costs.save(tmp_path / "c.json"))
    assert again.cost_tree_verify_s == costs.cost_tree_verify_s
    step = StepCosts(costs.cost_draft_s, costs.cost_verify_s, None, costs.cost_tree_draft_s,
                     costs.cost_tree_verify_s)
    for unseen in (1, 3):  # a catch-up, its tree's growth, the tree's verify forward
        np.testing.assert_allclose(step.trees(unseen), tree_step_costs(
            costs.cost_draft_s, costs.cost_tree_draft_s, costs.cost_tree_verify_s, None, unseen))
        np.testing.assert_allclose(
            step.trees(unseen), costs.cost_draft_s + np.add(costs.cost_tree_draft_s,
                                                             costs.cost_tree_verify_s),
            rtol=1e-6)
    assert StepCosts(0.1, [1.0] * 9).trees() is None
    with pytest.raises(CostError, match="one per tree"):
        CostModel(0.1, [1.0] * 9, "fp16", "float32", cost_tree_draft_s=[1.0])


# --------------------------------------------------------------------------------- lookup
def test_context_lookup_proposes_what_followed_the_longest_earlier_match():
    from speckv.runtime.lookup import ContextLookup, lookup_trace

    index = ContextLookup(tokens=[5, 6, 7, 8, 9, 1, 6, 7])
    prop = index.propose()
    assert prop.tokens == (8, 9, 1, 6, 7) and prop.match == 2 and prop.occurrences == 1
    assert index.propose(limit=2).tokens == (8, 9)
    index.extend([3])  # ...7 3: "3" never occurred before
    assert index.propose().tokens == ()
    index = ContextLookup(tokens=[4, 2, 4, 3, 4])  # "4" twice before: the latest wins
    prop = index.propose()
    assert prop.tokens == (3, 4) and prop.match == 1 and prop.occurrences == 2
    assert prop.agreeing == 1  # one of the two occurrences was followed by 3
    trace = lookup_trace([5, 6, 7, 8], [5, 6, 9, 5, 6, 9], budget=10)
    # after 5 6 7 8: no match; after ...5: "5" -> 6 7 8 5, accepts 6 then wants 9
    assert trace["length"][0] == 0 and trace["accept"][1] == 1
    assert trace["accept"][4] == 2  # after ...9 5: "9 5" is new, "5" -> 6 9 5 accepts 6 9
    assert all(a <= min(8, 10 - i - 1, 6 - i) for i, a in enumerate(trace["accept"]))


def test_lookup_steps_are_lossless_and_leave_the_draft_behind(target, drafts):
    from speckv.policies import LookupRule

    prompt = [*PROMPT, *PROMPT, *PROMPT[:3]]  # repeats: the lookup has matches to offer
    seen = []

    def check(view) -> None:
        seen.append(view.record["source"])
        assert view.target_cache.get_seq_length() == len(view.tokens) - 1

    for policy in (LookupRule(1), LookupRule(2, FixedGamma(3)), LookupRule(1, FixedTree(8))):
        decoder = SpeculativeDecoder(drafts["noisy"], target, policy, eos_token_ids=[])
        result = decoder.generate(prompt, 40, on_step=check)
        assert result.token_ids == reference_greedy(target, prompt, 40), policy.name
        assert greedy_invariant(target, prompt, result) == []
    assert "lookup" in seen and "draft" in seen
    lookup = [s for s in result.steps if s["source"] == "lookup"]
    assert all(s["drafted"] == s["lookup_length"] >= s["accept_len"] for s in lookup)


def test_sampled_lookup_steps_keep_the_targets_joint_distribution():
    from speckv.policies import LookupRule

    vocab, prompt, n, temperature = 8, [5, 3, 5], 1500, 0.9
    target = tiny_llama(2, seed=0, vocab=vocab, hidden=16, init=0.2)
    with torch.inference_mode():
        first = torch.softmax(target(input_ids=torch.tensor([prompt])).logits[0, -1]
                              / temperature, -1)
        pairs = torch.tensor([[*prompt, t] for t in range(vocab)])
        second = torch.softmax(target(input_ids=pairs).logits[:, -1] / temperature, -1)
    joint = (first[:, None] * second).numpy().ravel()
    draft = tiny_llama(1, seed=1, vocab=vocab, hidden=16, init=0.2)
    decoder = SpeculativeDecoder(draft, target, LookupRule(1), eos_token_ids=[])
    counts = np.zeros(vocab * vocab)
    accepted = []
    for seed in range(n):  # "5" occurred before, followed by 3 5: the first step looks up
        result = decoder.generate(prompt, 3, temperature=temperature, seed=seed)
        assert result.steps[0]["source"] == "lookup"
        t1, t2 = result.token_ids[:2]
        counts[t1 * vocab + t2] += 1
        accepted.append(result.steps[0]["accept_len"])
    assert {0, 1} <= set(accepted)
    assert chi2_pvalue(counts, joint) > 1e-3
