"""Model-free drafters, merged trees from several drafters, and decoding with them: greedy output equals
plain decoding, and sampling through a tree of two different drafters keeps the target's distribution."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

import swarmspec.verify
from swarmspec.decode import decode
from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.lookup import PromptLookupDrafter, SuffixDrafter, SuffixIndex
from swarmspec.drafters.model import ModelDrafter
from swarmspec.metrics import DecodeStats
from swarmspec.policy import CostModelPolicy, FixedDepth, SpeculationPolicy, StepCosts
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig, logits_to_probs
from swarmspec.speculate import (
    ChainSpeculation,
    ExpansionTree,
    MergedTree,
    Speculation,
    VoteSpeculation,
    grow_tree,
    merge_drafts,
    weighted_vote,
)
from swarmspec.tree import FixedWidths, NodeBudget, TokenTree, TreeShape
from swarmspec.verify import make_verifier

from test_sampling_exact import p_value
from tiny_models import TrigramLM, run_decode, tiny_qwen2

GREEDY = SamplingConfig()


def test_prompt_lookup_copies_what_followed_the_latest_match() -> None:
    drafter = PromptLookupDrafter(vocab_size=50, max_ngram=3)
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 6, 7]
    # Last 3 tokens (3, 6, 7) never occurred before; last 2 (6, 7) did, latest at 7..8 -> follows 2, 3.
    assert drafter.propose(context, 4, GREEDY, None).tokens.tolist() == [2, 3, 6, 7]
    assert drafter.propose(context, 1, GREEDY, None).tokens.tolist() == [2]
    assert len(drafter.propose([1, 2, 3], 4, GREEDY, None)) == 0  # no earlier occurrence
    assert len(drafter.propose(context, 0, GREEDY, None)) == 0


def brute_force_follow(context: list[int], max_ngram: int, max_tokens: int, occurrence: str) -> list[int]:
    """Prompt lookup by brute force: what followed the latest (or earliest) earlier occurrence of the
    longest suffix that occurred before."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        starts = range(len(context) - 1 - n, -1, -1) if occurrence == "latest" else range(len(context) - n)
        for start in starts:
            if context[start : start + n] == context[-n:]:
                return context[start + n : start + n + max_tokens]
    return []


@pytest.mark.parametrize("occurrence", ["latest", "earliest"])
def test_prompt_lookup_index_equals_brute_force_as_contexts_grow_and_restart(occurrence: str) -> None:
    generator = torch.Generator().manual_seed(0)
    drafter = PromptLookupDrafter(vocab_size=6, max_ngram=3, occurrence=occurrence)  # type: ignore[arg-type]
    for _ in range(5):  # a new sequence each time: the index starts over
        context = torch.randint(6, (3,), generator=generator).tolist()
        for _ in range(60):
            context += torch.randint(
                6, (int(torch.randint(1, 4, (1,), generator=generator)),), generator=generator
            ).tolist()
            expected = brute_force_follow(context, 3, 5, occurrence)
            assert drafter.propose(context, 5, GREEDY, None).tokens.tolist() == expected


def test_prompt_lookup_earliest_follows_the_first_occurrence() -> None:
    drafter = PromptLookupDrafter(vocab_size=50, max_ngram=3, occurrence="earliest")
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 6, 7]
    # (6, 7) occurred at 1..2 (then 8, 9) and at 7..8 (then 2, 3): the earliest wins.
    assert drafter.propose(context, 4, GREEDY, None).tokens.tolist() == [8, 9, 1, 5]
    with pytest.raises(ValueError, match="occurrence must be"):
        PromptLookupDrafter(vocab_size=50, occurrence="middle")  # type: ignore[arg-type]


def test_model_free_drafts_are_point_masses_when_sampling() -> None:
    draft = PromptLookupDrafter(vocab_size=10).propose([1, 2, 3, 1, 2], 2, SamplingConfig(1.0), None)
    assert draft.tokens.tolist() == [3, 1]
    assert draft.probs is not None and torch.equal(draft.probs, torch.eye(10)[[3, 1]])


def test_suffix_drafter_reuses_earlier_sequences() -> None:
    index = SuffixIndex(max_ngram=3, min_ngram=2)
    drafter = SuffixDrafter(vocab_size=50, index=index)
    first = [1, 2, 3, 4, 5, 6, 7]
    drafter.begin(first)
    assert len(drafter.propose(first, 3, GREEDY, None)) == 0  # nothing seen yet
    drafter.observe([8])  # the sequence grows: indexed only when it ends
    assert len(drafter.propose([9, 9, 3, 4], 3, GREEDY, None)) == 0
    drafter.end()
    # Any drafter sharing the index: a new sequence ending in (3, 4) finds the first one.
    other = SuffixDrafter(vocab_size=50, index=index)
    other.begin([9, 9, 3, 4])
    assert other.propose([9, 9, 3, 4], 3, GREEDY, None).tokens.tolist() == [5, 6, 7]
    assert list(index.sequences.values()) == [[*first, 8]]


def test_suffix_index_is_bounded() -> None:
    index = SuffixIndex(max_ngram=2, min_ngram=2, max_tokens=10)
    index.add([1, 2, 3, 4, 5, 6])
    index.add([7, 8, 9, 10, 11, 12])  # 12 tokens > 10: the first sequence is forgotten
    assert list(index.sequences.values()) == [[7, 8, 9, 10, 11, 12]]
    assert index.follow([1, 2], 2) == [] and index.follow([8, 9], 2) == [10, 11]


def test_merge_dedupes_shared_prefixes_when_greedy() -> None:
    drafts = [Draft.of([1, 2, 3]), Draft.of([1, 2, 4]), Draft.of([5])]
    tree = merge_drafts(0, drafts, dedupe=True)
    assert tree.tokens.tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.parents == (-1, 0, 1, 2, 2, 0)
    assert tree.proposers == (-1, 0, 0, 0, 1, 2)  # a shared node is credited to its first proposer
    separate = merge_drafts(0, drafts, dedupe=False)
    assert separate.tokens.tolist() == [0, 1, 2, 3, 1, 2, 4, 5]
    assert separate.parents == (-1, 0, 1, 2, 0, 4, 5, 0)
    assert separate.proposers == (-1, 0, 0, 0, 1, 1, 1, 2)


def test_merge_keeps_each_nodes_distribution() -> None:
    q1, q2 = torch.softmax(torch.randn(2, 6), -1), torch.softmax(torch.randn(1, 6), -1)
    tree = merge_drafts(0, [Draft.of([1, 2], q1), Draft.of([1], q2)], dedupe=False)
    assert tree.draft_probs is not None
    assert torch.equal(tree.draft_probs[1:], torch.cat([q1, q2]))
    with pytest.raises(ValueError, match="every drafter must return the distribution"):
        merge_drafts(0, [Draft.of([1], q2), Draft.of([3])], dedupe=False)


@pytest.mark.parametrize(("seed", "gamma"), list(itertools.product(range(4), [1, 3, 6])))
def test_merged_tree_greedy_equals_autoregressive(seed: int, gamma: int) -> None:
    target = tiny_qwen2(seed)
    generator = torch.Generator().manual_seed(seed)
    # A repetitive prompt gives prompt lookup something to find.
    prompt = torch.randint(96, (6,), generator=generator).tolist() * 3
    drafters = [
        ModelDrafter(HFRunner(tiny_qwen2(seed + 50, layers=1))),
        ModelDrafter(HFRunner(target)),  # agrees with the target: long accepted paths
        PromptLookupDrafter(vocab_size=96),
    ]
    reference, _ = run_decode(target, None, prompt, 40)
    output, stats = run_decode(target, MergedTree(drafters), prompt, 40, gamma=gamma)
    assert output == reference
    assert stats.accepted_tokens > 0 and stats.target_forwards < 40
    assert sum(stats.accepted_by_drafter.values()) == stats.accepted_tokens
    assert stats.accepted_by_drafter[1] > stats.accepted_by_drafter.get(0, 0)  # the agreeing drafter


VOCAB = 4
PROMPT = [0, 1]
SAMPLES = 4000
SAMPLINGS = {
    "t1.0": SamplingConfig(temperature=1.0),
    "t1.3-topk3-topp0.9": SamplingConfig(temperature=1.3, top_k=3, top_p=0.9),
}


def trigram_drafters(*seeds: int) -> list[Drafter]:
    return [ModelDrafter(TrigramLM(seed=s, vocab_size=VOCAB)) for s in seeds]


def two_drafter_tree() -> Speculation:
    """Chains of two different drafters, each its own branch."""
    return MergedTree(trigram_drafters(2, 3))


def expansion_tree() -> Speculation:
    """Two sampled children per node from one drafter, plus a second drafter's chain."""
    return ExpansionTree(trigram_drafters(2, 3), FixedWidths((2, 2)), grower=0)


def budget_tree() -> Speculation:
    """A node-budget tree from one drafter (uneven child counts), plus a second drafter's chain."""
    # Grown from the first model among the drafters (index 1), prompt lookup merged in too.
    return ExpansionTree(
        [PromptLookupDrafter(VOCAB), *trigram_drafters(2, 3)], NodeBudget(budget=4, branch=3), grower=1
    )


def vote() -> Speculation:
    """The heaviest of two drafters' chains (weights from earlier steps only)."""
    return VoteSpeculation(trigram_drafters(2, 3))


SPECULATIONS = {"merged": two_drafter_tree, "expansion": expansion_tree, "budget": budget_tree, "vote": vote}


class Rewritten(Speculation):
    """Deliberately broken controls: every tree is rewritten before the target verifies it."""

    def __init__(self, inner: Speculation, rewrite: Callable[[TokenTree], TokenTree]) -> None:
        self.inner, self.rewrite, self.drafters = inner, rewrite, inner.drafters

    def begin(self, prompt_ids: list[int]) -> None:
        self.inner.begin(prompt_ids)

    def observe(self, tree: TokenTree, path: list[int], committed: list[int]) -> None:
        self.inner.observe(tree, path, committed)

    def end(self) -> None:
        self.inner.end()

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        return self.rewrite(self.inner.speculate(context, depths, sampling, generator))


def parent_rows(tree: TokenTree) -> TokenTree:
    """Bug: a node below depth 1 carries its parent's draft distribution instead of its own."""
    if tree.draft_probs is None:  # nothing drafted
        return tree
    probs = tree.draft_probs.clone()
    for node, parent in enumerate(tree.parents):
        if parent > 0:
            probs[node] = tree.draft_probs[parent]
    return replace(tree, draft_probs=probs)


def dedupe_drawn(tree: TokenTree) -> TokenTree:
    """Bug: sampled siblings drawing the same token are merged, so child counts depend on the draws."""
    if tree.draft_probs is None:  # nothing drafted
        return tree
    kept, new_index, seen = [], {0: 0}, set()
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        key = (parent, int(tree.tokens[node]))
        if parent in new_index and key not in seen:
            seen.add(key)
            new_index[node] = len(kept) + 1
            kept.append(node)
    nodes = [0, *kept]
    assert tree.proposers is not None
    return TokenTree(
        tree.tokens[nodes],
        (-1, *[new_index[tree.parents[n]] for n in kept]),
        tree.draft_probs[nodes],
        tuple(tree.proposers[n] for n in nodes),
    )


def tree_sampling_counts(
    seed: int, speculation: Speculation, sampling: SamplingConfig, policy: SpeculationPolicy | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first 3 tokens decoded with a tree speculation (every drafter 2 deep, all verified,
    unless a `policy` chooses), and their exact probabilities under the target."""
    target = TrigramLM(seed=1, vocab_size=VOCAB)
    policy = policy or FixedDepth(2, len(speculation.drafters))
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    for _ in range(SAMPLES):
        chunks = decode(
            target, speculation, make_verifier(sampling), PROMPT,
            max_new_tokens=4, policy=policy, sampling=sampling,
            stop_token_ids=frozenset(), generator=generator, stats=DecodeStats(),
        )  # fmt: skip
        t1, t2, t3, _ = (t for chunk in chunks for t in chunk)
        counts[(t1 * VOCAB + t2) * VOCAB + t3] += 1
    exact = torch.zeros(VOCAB**3, dtype=torch.float64)
    for t1, t2, t3 in itertools.product(range(VOCAB), repeat=3):
        p, sequence = 1.0, list(PROMPT)
        for token in (t1, t2, t3):
            p *= float(logits_to_probs(target.next_logits(sequence), sampling)[token])
            sequence.append(token)
        exact[(t1 * VOCAB + t2) * VOCAB + t3] = p
    return counts, exact


def tree_p_value(
    seed: int,
    speculation: Speculation,
    sampling: SamplingConfig = SAMPLINGS["t1.0"],
    policy: SpeculationPolicy | None = None,
) -> float:
    counts, exact = tree_sampling_counts(seed, speculation, sampling, policy)
    return p_value(counts, exact)


class TokenPickyPolicy(CostModelPolicy):
    """Bug: verifies only the nodes whose drawn token is even (a choice that depends on the draws)."""

    def select(self, tree: TokenTree) -> TokenTree:
        keep = [0]
        for node in range(1, len(tree)):
            if tree.parents[node] in keep and int(tree.tokens[node]) % 2 == 0:
                keep.append(node)
        return tree.keep(keep)


# A CPU-like cost curve (each verified node costs 0.6 forwards), and one where the second row is dear
# and the next ones cheap: there the best node count can depend on nodes ranked below a node.
COST_CURVES = {"linear": {1: 10.0, 2: 16.0, 8: 52.0}, "concave": {1: 10.0, 2: 20.0, 8: 24.0}}


def auto_policy(drafters: int, picky: bool = False, curve: str = "linear") -> CostModelPolicy:
    """The self-tuning policy: with these drafters' acceptance it verifies some nodes and drops others,
    step by step."""
    costs = StepCosts(COST_CURVES[curve], (0.0,) * drafters)
    return (TokenPickyPolicy if picky else CostModelPolicy)(costs, max_depth=2)


@pytest.mark.parametrize("curve", COST_CURVES)
@pytest.mark.parametrize("tree", SPECULATIONS)
def test_tree_sampling_through_the_self_tuning_policy_is_exact(tree: str, curve: str) -> None:
    speculation = SPECULATIONS[tree]()
    policy = auto_policy(len(speculation.drafters), curve=curve)
    assert tree_p_value(0, speculation, policy=policy) > 1e-3


@pytest.mark.parametrize("tree", ["merged", "budget"])
def test_policy_that_picks_nodes_by_their_drawn_tokens_fails(tree: str) -> None:
    speculation = SPECULATIONS[tree]()
    assert tree_p_value(0, speculation, policy=auto_policy(len(speculation.drafters), picky=True)) < 1e-6


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("tree", SPECULATIONS)
def test_tree_sampling_reproduces_the_target_distribution(tree: str, sampling: str) -> None:
    assert tree_p_value(0, SPECULATIONS[tree](), SAMPLINGS[sampling]) > 1e-3


@pytest.mark.parametrize("tree", SPECULATIONS)
def test_tree_with_broken_residual_update_fails(tree: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarmspec.verify, "residual_after_rejection", lambda p, q: p)
    assert tree_p_value(0, SPECULATIONS[tree]()) < 1e-6


@pytest.mark.parametrize("tree", ["expansion", "budget"])
def test_tree_with_parents_draft_rows_fails(tree: str) -> None:
    assert tree_p_value(0, Rewritten(SPECULATIONS[tree](), parent_rows)) < 1e-6


@pytest.mark.parametrize("tree", ["expansion", "budget"])  # siblings drawn from one distribution
def test_tree_whose_child_counts_depend_on_the_draws_fails(tree: str) -> None:
    assert tree_p_value(0, Rewritten(SPECULATIONS[tree](), dedupe_drawn)) < 1e-6


def test_weighted_vote_follows_the_heaviest_branch() -> None:
    chains = [[1, 2, 3], [1, 2, 4], [5, 6], [1, 7]]
    assert weighted_vote(chains, [1.0, 1.0, 1.0, 1.0]) == [1, 2, 3]  # 3 votes for 1; then 2 beats 7
    assert weighted_vote(chains, [0.1, 0.1, 1.0, 0.1]) == [5, 6]  # one heavy drafter outvotes three
    assert weighted_vote(chains, [1.0, 2.0, 0.0, 0.0]) == [1, 2, 4]
    assert weighted_vote([[], []], [1.0, 1.0]) == []


@pytest.mark.parametrize("seed", range(4))
def test_vote_greedy_equals_autoregressive_and_learns_weights(seed: int) -> None:
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    vote = VoteSpeculation(
        [ModelDrafter(HFRunner(tiny_qwen2(seed + 50, layers=1))), ModelDrafter(HFRunner(target))]
    )
    reference, _ = run_decode(target, None, prompt, 40)
    output, stats = run_decode(target, vote, prompt, 40, gamma=4)
    assert output == reference
    assert vote.weights[1] > vote.weights[0]  # the drafter that agrees with the target gains the say
    assert stats.accepted_tokens > 0
    # Every accepted token is credited to a drafter that proposed it, most to the agreeing one.
    assert sum(stats.accepted_by_drafter.values()) == stats.accepted_tokens
    assert stats.accepted_by_drafter[1] > stats.accepted_by_drafter.get(0, 0)


def test_vote_samples_the_heaviest_drafters_own_chain() -> None:
    q = torch.softmax(torch.randn(2, 4, 6), -1)

    class Fixed(Drafter):
        def __init__(self, probs: torch.Tensor) -> None:
            self.probs = probs

        def propose(self, context, max_tokens, sampling, generator) -> Draft:
            return Draft(self.probs.argmax(-1)[:max_tokens], self.probs[:max_tokens])

    vote = VoteSpeculation([Fixed(q[0]), Fixed(q[1])])
    vote.weights = [0.2, 0.7]
    tree = vote.speculate([0, 1], [3] * len(vote.drafters), SamplingConfig(temperature=1.0), None)
    assert tree.is_chain and tree.draft_probs is not None
    assert torch.equal(tree.draft_probs[1:], q[1, :3])
    assert tree.proposers == (-1, 1, 1, 1)


def test_expansion_tree_shape_and_greedy_children() -> None:
    draft_model = tiny_qwen2(7)
    drafter = ModelDrafter(HFRunner(draft_model))
    context = torch.randint(96, (10,), generator=torch.Generator().manual_seed(7)).tolist()
    tree = grow_tree(drafter, context, FixedWidths((3, 2)), 4, GREEDY, None)
    assert tree.parents == (-1, 0, 0, 0, 1, 1, 2, 2, 3, 3)
    top3 = HFRunner(draft_model).forward(torch.tensor(context), num_logits=1)[0].topk(3).indices
    assert tree.tokens[1:4].tolist() == top3.tolist()
    for node in (1, 2, 3):  # each child's top 2 under its own branch
        branch = torch.tensor([*context, int(tree.tokens[node])])
        top2 = HFRunner(draft_model).forward(branch, num_logits=1)[0].topk(2).indices
        assert tree.tokens[tree.children(node)].tolist() == top2.tolist()


GROWN_SHAPES = [
    *(FixedWidths(w) for w in [(3, 2, 1, 1), (2, 2), (1, 1, 1), (4,)]),
    *(NodeBudget(b) for b in [1, 3, 8, 12]),
]


@pytest.mark.parametrize(("seed", "shape"), list(itertools.product(range(3), GROWN_SHAPES)), ids=str)
def test_grown_tree_greedy_equals_autoregressive(seed: int, shape: TreeShape) -> None:
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (6,), generator=torch.Generator().manual_seed(seed)).tolist() * 2
    drafter = ModelDrafter(HFRunner(tiny_qwen2(seed + 50, layers=1)))
    speculation = ExpansionTree([PromptLookupDrafter(vocab_size=96), drafter], shape, grower=1)
    reference, _ = run_decode(target, None, prompt, 40)
    output, _ = run_decode(target, speculation, prompt, 40, gamma=4)
    assert output == reference


def test_expansion_tree_with_the_target_as_drafter_accepts_full_depth() -> None:
    target = tiny_qwen2(2)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    speculation = ExpansionTree([ModelDrafter(HFRunner(target))], FixedWidths((2, 2, 2)), grower=0)
    output, stats = run_decode(target, speculation, prompt, 41, gamma=3)
    assert output == run_decode(target, None, prompt, 41)[0]
    assert stats.target_forwards == 1 + 40 // 4  # prefill, then 3 accepted + 1 per forward


def test_node_budget_takes_the_most_confident_children_and_keeps_depth() -> None:
    budget = NodeBudget(budget=6, branch=3)
    assert budget.levels(4) == 4 and NodeBudget(budget=2).levels(4) == 2
    root = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # Depth 0 of 4: 6 nodes, 3 deeper levels need one each -> up to 3 children, the root's top 3.
    assert budget.child_counts(0, 4, 0, [1.0], root) == [3]
    # Depth 1: slot values 0.5*[0.9, 0.1], 0.3*[0.6, 0.4], 0.15*[0.5, 0.5]; 6 - 3 - 2 = 1 child left.
    dists = torch.tensor([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.5, 0.5, 0, 0]])
    assert budget.child_counts(1, 4, 3, [0.5, 0.3, 0.15], dists) == [1, 0, 0]
    # With more budget the next most valuable slots (0.18, 0.12, ...) go to the second node.
    wide = NodeBudget(budget=20, branch=3)
    assert wide.child_counts(1, 4, 3, [0.5, 0.3, 0.15], dists) == [1, 2, 0]
    assert budget.child_counts(3, 4, 6, [0.2], root) == [0]  # the budget is spent


def test_node_budget_grows_deep_when_confident_and_wide_when_unsure() -> None:
    tight = NodeBudget(budget=4, branch=3)
    # Sure: the best child 0.97 and its estimated descendants 0.94, 0.91, 0.89 outbid the siblings.
    assert tight.child_counts(0, 4, 0, [1.0], torch.tensor([[0.97, 0.01, 0.01, 0.01]])) == [1]
    # Unsure: siblings 0.3 and 0.2 outbid the estimated descendants 0.16, 0.064, ...
    assert tight.child_counts(0, 4, 0, [1.0], torch.tensor([[0.4, 0.3, 0.2, 0.1]])) == [3]
    context = torch.randint(96, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    for scale, expect_chain in [(50.0, True), (0.01, False)]:  # a sharp and a near-uniform drafter
        drafter = ModelDrafter(HFRunner(tiny_qwen2(5)))
        drafter.runner.model.lm_head.weight.data *= scale
        tree = grow_tree(drafter, context, tight, 4, GREEDY, None)
        assert len(tree) - 1 == 4 and tree.is_chain == expect_chain
        assert max(tree_depths(tree)) == (4 if expect_chain else 2)


@pytest.mark.parametrize(("seed", "budget"), list(itertools.product(range(3), [1, 3, 8, 12])))
def test_budget_tree_stays_within_budget_and_depth(seed: int, budget: int) -> None:
    context = torch.randint(96, (13,), generator=torch.Generator().manual_seed(seed)).tolist()
    drafter = ModelDrafter(HFRunner(tiny_qwen2(seed + 50, layers=1)))
    tree = grow_tree(drafter, context, NodeBudget(budget), 4, GREEDY, None)
    assert 1 <= len(tree) - 1 <= budget
    assert max(tree_depths(tree)) <= 4


def test_budget_tree_of_a_confident_drafter_is_a_long_chain() -> None:
    target = tiny_qwen2(4)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(4)).tolist()
    # The target drafting for itself, made confident: every level's best child dwarfs the rest.
    sharp = ModelDrafter(HFRunner(tiny_qwen2(4)))
    sharp.runner.model.lm_head.weight.data *= 50
    tree = grow_tree(sharp, prompt, NodeBudget(budget=5, branch=3), 4, GREEDY, None)
    assert max(tree_depths(tree)) == 4
    output, stats = run_decode(target, ExpansionTree([sharp], NodeBudget(5), grower=0), prompt, 41, gamma=4)
    assert output == run_decode(target, None, prompt, 41)[0]
    assert stats.target_forwards == 1 + 40 // 5  # prefill, then 4 accepted + 1 per forward


def tree_depths(tree: TokenTree) -> list[int]:
    depths = [0] * len(tree)
    for node in range(1, len(tree)):
        depths[node] = depths[tree.parents[node]] + 1
    return depths


def test_drafter_keeps_the_accepted_paths_cache_entries() -> None:
    """After a tree, the drafter compacts its cache to the accepted path instead of re-running it: its
    next tree equals a fresh drafter's, and only the target's own next token is fed."""
    context = torch.randint(96, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    drafter = ModelDrafter(HFRunner(tiny_qwen2(3)))
    tree = grow_tree(drafter, context, FixedWidths((2, 2, 2)), 3, GREEDY, None)
    second = tree.children(0)[1]
    grandchild = tree.children(second)[0]  # depth 2: run by the drafter, so cached
    accepted = [int(tree.tokens[second]), int(tree.tokens[grandchild])]
    fed: list[int] = []
    forward = drafter.runner.forward

    def counting_forward(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        fed.append(len(input_ids))
        return forward(input_ids, **kwargs)

    drafter.runner.forward = counting_forward  # type: ignore[method-assign]
    drafter.observe([*accepted, 7])  # what the target committed: two tree nodes, then its own token
    next_context = [*context, *accepted, 7]
    shape = FixedWidths((2, 2))
    kept = grow_tree(drafter, next_context, shape, 2, GREEDY, None)
    assert fed[0] == 1  # the catch-up forward reads only the token after the accepted path
    fresh = grow_tree(ModelDrafter(HFRunner(tiny_qwen2(3))), next_context, shape, 2, GREEDY, None)
    assert kept.tokens.tolist() == fresh.tokens.tolist() and kept.parents == fresh.parents


def test_accepted_tokens_by_drafter_name() -> None:
    stats = DecodeStats()
    stats.record_step(drafted=5, committed=4, accepted_by=[0, 0, 2])
    stats.record_step(drafted=4, committed=2, accepted_by=[1])
    assert stats.accepted_by_drafter == {0: 2, 2: 1, 1: 1}
    # A name given twice counts both drafters' tokens; every name is listed.
    assert stats.accepted_by(["m", "suffix", "m", "unused"]) == {"m": 3, "suffix": 1, "unused": 0}


class CrashingDrafter(Drafter):
    """Proposes like `inner` until its `crash_at`-th proposal, which raises."""

    def __init__(self, inner: Drafter, crash_at: int) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("drafter bug")
        return self.inner.propose(context, max_tokens, sampling, generator)


@pytest.mark.parametrize("method", ["chain", "merged", "vote"])
def test_a_crashing_drafter_is_dropped_and_the_output_is_unchanged(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = tiny_qwen2(3)
    prompt = [5, 9, 14, 5, 9, 20, 33, 5, 9]
    plain, _ = run_decode(target, None, prompt, 40)
    crashing = CrashingDrafter(ModelDrafter(HFRunner(target)), crash_at=3)
    other = PromptLookupDrafter(96)
    speculation = {
        "chain": lambda: ChainSpeculation(crashing),
        "merged": lambda: MergedTree([crashing, other]),
        "vote": lambda: VoteSpeculation([crashing, other]),
    }[method]()
    output, stats = run_decode(target, speculation, prompt, 40)
    assert output == plain
    assert crashing.calls == 3  # never asked again in this generation
    assert stats.accepted_tokens > 0  # it drafted well before it crashed
    assert "drafter 0 (CrashingDrafter) failed; going on without it" in caplog.text


def test_sampled_vote_takes_the_heaviest_drafter_that_drafted() -> None:
    vote = VoteSpeculation(trigram_drafters(2, 3), prior=None)
    vote.weights = [1.0, 0.2]
    tree = vote.speculate([0, 1], [0, 2], SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
    assert tree.proposers == (-1, 1, 1)  # drafter 0 was given depth 0: drafter 1's chain
    empty = vote.speculate([0, 1], [0, 0], SamplingConfig(temperature=1.0), None)
    assert len(empty) == 1
