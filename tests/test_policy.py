"""The self-tuning policy: its choices on synthetic cost curves and acceptance rates, checked by hand, and
decoding through it: output identical to plain decoding, a useless drafter turned (almost) off."""

from __future__ import annotations

import pytest
import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.policy import (
    AcceptancePrior,
    AcceptanceStats,
    CostModelPolicy,
    StepCosts,
    chain_rate,
    pipelining_pays,
)
from swarmspec.runners.hf import HFRunner
from swarmspec.speculate import ChainSpeculation, MergedTree
from swarmspec.tree import TokenTree

from tiny_models import run_decode, tiny_qwen2

# A GPU-like curve: verifying up to 32 tokens costs what one does. A CPU-like one: each row ~0.77 more.
FLAT = {1: 20.0, 32: 20.0}
STEEP = {1: 30.0, 2: 53.0, 32: 743.0}


def policy_with(verify_ms: dict[int, float], draft_ms: float, rate: float) -> CostModelPolicy:
    prior = AcceptancePrior()
    # The drafter after a rejection and after a full accept.
    prior.stats = AcceptanceStats.after_chains([rate, rate])
    return CostModelPolicy(StepCosts(verify_ms, (draft_ms,)), max_depth=16, prior=prior)


def test_costs_interpolate_and_extrapolate() -> None:
    costs = StepCosts({1: 30.0, 2: 53.0, 4: 99.0}, ())
    assert costs.verify(1) == 30.0 and costs.verify(3) == 76.0 and costs.verify(6) == 145.0


def test_costs_measured_decreasing_are_fitted_non_decreasing() -> None:
    # Measured on a busy machine: two rows "cheaper" than one, two sequences "cheaper" than one.
    costs = StepCosts({1: 30.0, 2: 20.0, 4: 99.0}, (), {2: {1: 20.0, 2: 70.0}})
    # Rows: 30 and 20 pool to 25. Batch size at k = 1: 25 and 20 pool to 22.5.
    assert costs.verify_ms == {1: 22.5, 2: 25.0, 4: 99.0}
    assert costs.batch_verify_ms == {2: {1: 22.5, 2: 70.0}}
    # Where the curve did not decrease, nothing moves.
    assert StepCosts({1: 30.0, 2: 53.0}, ()).verify_ms == {1: 30.0, 2: 53.0}


def test_acceptance_estimates_follow_the_observed_rates() -> None:
    stats = AcceptanceStats.after_chains([0.9, 0.2])
    assert stats.rate(0, 3) == pytest.approx(0.9, abs=0.05)
    assert stats.rate(1, 3) == pytest.approx(0.2, abs=0.05)
    assert stats.rate(0, 30) == pytest.approx(0.9, abs=0.05)  # never verified: the drafter's overall rate


def test_flat_cost_curve_drafts_deep_and_steep_one_short() -> None:
    # By hand, acceptance 0.8 and a 1 ms drafter: on the flat curve (1 + 0.8 + ... + 0.8^g) / (g + 20)
    # peaks at g = 8 (0.155/ms against 0.05 for plain decoding).
    assert 6 <= policy_with(FLAT, 1.0, 0.8).draft_depths(16)[0] <= 10
    # Steep: one token at 0.95 gives 1.95 / (3 + 53) = 0.0348 > 1/30, two 2.85 / 82 = 0.0348, three
    # 3.71 / 108 = 0.0344: short drafts.
    assert 1 <= policy_with(STEEP, 3.0, 0.95).draft_depths(16)[0] <= 2
    # At 0.8 on the steep curve even one token loses (1.8 / 56 < 1/30): no drafting.
    assert policy_with(STEEP, 3.0, 0.8).draft_depths(16)[0] == 0


def test_drafter_that_cannot_pay_is_never_run_not_even_to_probe() -> None:
    # The 0.5B drafter on llama.cpp: 18.5 ms a token, so one accepted token (2 / 71.5) loses to 1 / 30.
    policy = policy_with(STEEP, 18.5, 1.0)
    assert all(policy.draft_depths(16) == [0] for _ in range(200))


def test_a_drafter_costing_a_share_of_its_profile_is_priced_at_that_share() -> None:
    # A sorted draft whose tokens stop at shallow exits: a tenth of the profiled 18.5 ms, so one token
    # at 0.95 pays (1.95 / (1.85 + 53) = 0.0356 > 1/30), which at the whole 18.5 ms it never does.
    prior = AcceptancePrior()
    prior.stats = AcceptanceStats.after_chains([0.95, 0.95])
    shared = CostModelPolicy(StepCosts(STEEP, (18.5,)), max_depth=16, prior=prior, cost_shares=[lambda: 0.1])
    assert shared.draft_depths(16)[0] >= 1
    assert policy_with(STEEP, 18.5, 0.95).draft_depths(16) == [0]


def test_select_keeps_the_prefix_worth_verifying() -> None:
    policy = policy_with(STEEP, 0.0, 0.85)
    chain = TokenTree.chain(5, torch.arange(16))
    # By hand: (1 + 0.85) / 53 = 0.0349 beats 1/30 = 0.0333 and (1 + 0.85 + 0.72) / 76 = 0.0338.
    assert len(policy.select(chain)) == 2
    policy = policy_with(FLAT, 0.0, 0.9)
    assert len(policy.select(chain)) == 17  # verifying is free: all of it


def test_select_depends_on_structure_and_proposers_only() -> None:
    policy = policy_with(STEEP, 0.0, 0.97)
    # Node 1 (0.97) pays; its two children split P(accepted) and neither does (2.455 / 76 < 1.97 / 53).
    parents = (-1, 0, 1, 2, 1, 4)
    kept = [
        policy.select(TokenTree(torch.tensor(tokens), parents, None, (-1, 0, 0, 0, 0, 0)))
        for tokens in ([0, 1, 2, 3, 4, 5], [0, 9, 8, 7, 6, 5])
    ]
    assert kept[0].parents == kept[1].parents == (-1, 0)


def test_unverified_nodes_below_the_accepted_path_are_counted_greedy_only() -> None:
    """A free drafter's nodes left unverified right below the last accepted node count as accepted iff
    they are the target's own next token (what verifying them would have shown); nodes deeper, trees
    from sampling and trees not from this step's `select` count nothing."""
    policy = policy_with(STEEP, 0.0, 0.5)  # 0.5 < the second row's cost: nothing is verified
    source = policy._source(0)

    def counts(depth: int) -> tuple[float, float]:
        return policy.stats.accepted[source].get(depth, 0.0), policy.stats.offered[source].get(depth, 0.0)

    chain = TokenTree.chain(5, torch.tensor([7, 8, 9]))
    before = counts(1)
    kept = policy.select(chain)
    assert len(kept) == 1
    policy.observe(kept, [], 7)  # the target's token is the draft's first: it would have been accepted
    assert counts(1) == pytest.approx((0.95 * before[0] + 1, 0.95 * before[1] + 1))
    assert policy._streak[0] == 1 and policy._source(0) != source  # a copy in progress, seen for free
    policy = policy_with(STEEP, 0.0, 0.5)
    source = policy._source(0)
    before = counts(1), counts(2)
    policy.observe(policy.select(chain), [], 6)  # it would have been rejected
    assert counts(1) == pytest.approx((0.95 * before[0][0], 0.95 * before[0][1] + 1))
    assert counts(2) == pytest.approx((0.95 * before[1][0], 0.95 * before[1][1]))  # deeper: unknown
    sampled = TokenTree(chain.tokens, chain.parents, torch.full((4, 10), 0.1))
    for tree, observed in ((sampled, policy.select(sampled)), (chain, TokenTree.chain(5, torch.tensor([])))):
        if tree is chain:
            policy.select(chain)
        before = counts(1)
        policy.observe(observed, [], 7)
        assert counts(1) == before  # sampling, or a tree this step's select did not make


@pytest.mark.parametrize("seed", range(3))
def test_a_free_drafter_turning_right_is_verified_at_once_without_probes(seed: int) -> None:
    """Greedy: a model-free drafter wrong for the first 40 tokens and then right (a summary reaching a
    quoted passage) is never probed while wrong, and is verified within a few steps of turning right."""
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    plain, _ = run_decode(target, None, prompt, 120)
    right = ModelDrafter(HFRunner(target))
    wrong = OffByOne(right, 96)

    class TurnsRight(Drafter):
        def propose(self, context, max_tokens, sampling, generator) -> Draft:
            late = len(context) >= len(prompt) + 40
            return (right if late else wrong).propose(context, max_tokens, sampling, generator)

    policy = CostModelPolicy(StepCosts(STEEP, (0.0,)), max_depth=16)
    output, stats = run_decode(target, TurnsRight(), prompt, 120, policy=policy)
    assert output == plain
    assert stats.drafted_tokens - stats.accepted_tokens <= 3  # only the optimistic prior's first tries
    assert stats.accepted_tokens >= 60  # most of the last 80 tokens came from verified drafts


class OffByOne(Drafter):
    """Always wrong: the target's own greedy tokens, each shifted by one."""

    def __init__(self, inner: Drafter, vocab_size: int) -> None:
        self.inner, self.vocab_size = inner, vocab_size

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        draft = self.inner.propose(context, max_tokens, sampling, generator)
        return Draft((draft.tokens + 1) % self.vocab_size)


@pytest.mark.parametrize("draft_ms", [0.0, 3.0], ids=["model-free", "draft-model"])
@pytest.mark.parametrize("seed", range(3))
def test_always_wrong_drafter_falls_back_to_plain_decoding(seed: int, draft_ms: float) -> None:
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    plain, _ = run_decode(target, None, prompt, 120)
    wrong = OffByOne(ModelDrafter(HFRunner(target)), 96)
    policy = CostModelPolicy(StepCosts(STEEP, (draft_ms,)), max_depth=16)
    output, stats = run_decode(target, wrong, prompt, 120, policy=policy)
    assert output == plain
    assert stats.accepted_tokens == 0
    # Probes after 4, 8, 16, 32 and 64 idle steps at most: 5 of ~120 forwards verify one token.
    assert stats.drafted_tokens <= 5


@pytest.mark.parametrize("seed", range(3))
def test_agreeing_free_drafter_is_learned_and_drafts_long(seed: int) -> None:
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    plain, _ = run_decode(target, None, prompt, 120)
    agreeing = ModelDrafter(HFRunner(target))
    policy = CostModelPolicy(StepCosts({1: 30.0, 2: 40.0, 32: 340.0}, (0.0,)), max_depth=16)
    output, stats = run_decode(target, agreeing, prompt, 120, policy=policy)
    assert output == plain
    assert stats.mean_accepted_tokens > 4


@pytest.mark.parametrize("seed", range(6))
def test_self_tuned_trees_of_mixed_drafters_equal_plain_decoding(seed: int) -> None:
    target = tiny_qwen2(seed)
    prompt = torch.randint(96, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
    plain, _ = run_decode(target, None, prompt, 60)
    drafters = [ModelDrafter(HFRunner(tiny_qwen2(seed + 50))), ModelDrafter(HFRunner(target))]
    for speculation in (MergedTree(drafters), ChainSpeculation(drafters[1])):
        costs = StepCosts({1: 30.0, 2: 45.0, 32: 500.0}, (1.0,) * len(speculation.drafters))
        output, _ = run_decode(target, speculation, prompt, 60, policy=CostModelPolicy(costs, 8))
        assert output == plain


def test_chain_rates_taking_turns_and_overlapped_by_hand() -> None:
    steep = StepCosts({1: 10.0, 2: 20.0, 8: 80.0}, (5.0,))
    # Depth 0: 1/10; depth 1: 1.5 / (5 + 20) taking turns, 1.5 / max(20, 5) overlapped; depth 2: less.
    assert chain_rate(steep, 0.5, 2, overlapped=False) == pytest.approx(0.1)
    assert chain_rate(steep, 0.5, 2, overlapped=True) == pytest.approx(0.1)
    flat = StepCosts({1: 10.0, 8: 10.0}, (5.0,))
    # Depth 2 at rate 0.8 commits 1 + 0.8 + 0.64 = 2.44: in 10 + 10 ms taking turns, max(10, 10) overlapped.
    assert chain_rate(flat, 0.8, 4, overlapped=False) == pytest.approx(2.44 / 20)
    assert chain_rate(flat, 0.8, 4, overlapped=True) == pytest.approx(2.44 / 10)


def test_pipelining_pays_on_a_flat_curve_not_on_a_steep_one_nor_for_a_useless_drafter() -> None:
    turns = StepCosts({1: 10.0, 2: 20.0, 8: 80.0}, (5.0,))  # every core: each row costs a forward
    # Each model on its own core: the target half as fast again, the drafter a bit slower.
    steep_apart = StepCosts({1: 15.0, 2: 30.0, 8: 120.0}, (6.0,))
    flat_apart = StepCosts({1: 15.0, 8: 15.0}, (6.0,))
    assert not pipelining_pays(turns, steep_apart, 0.8, 8)  # 1/15 (plain, one core) < 1/10 (plain)
    assert pipelining_pays(turns, flat_apart, 0.8, 8)  # 2.95 / max(15, 18) = 0.16 > 0.1
    assert not pipelining_pays(turns, flat_apart, 0.1, 8)  # 1.1 / 15 < 1/10
