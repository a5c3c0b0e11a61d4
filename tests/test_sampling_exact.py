"""Speculative sampling draws exactly from the target's distribution, end to end through the decode loop.

A tiny-vocabulary model pair (trigram tables, see `TrigramLM`) makes the exact distribution of the
generated tokens computable, and fast enough to sample thousands of generations. A chi-squared test
with a fixed seed must accept the correct verifier and reject deliberately broken ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

from swarmspec.decode import decode
from swarmspec.drafters.base import Drafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.drafters.sorted import SortedDrafter
from swarmspec.metrics import DecodeStats
from swarmspec.models.sorted import SortedExits
from swarmspec.policy import FixedDepth
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.hf import HFRunner
from swarmspec.runners.sorted import SortedRunner
from swarmspec.sampling import SamplingConfig, logits_to_probs
from swarmspec.speculate import ChainSpeculation
from swarmspec.tree import TokenTree
from swarmspec.verify import Verdict, Verifier, make_verifier, verify_speculative_sampling

from tiny_models import TrigramLM, tiny_qwen2

PROMPT = [1, 2]
# The distribution checked: the first 3 generated tokens. Token 1 comes from the prefill; one more token
# is generated so that the next step may draft 2 tokens (it drafts at most remaining - 1).
NEW_TOKENS = 3
SAMPLES = 8_000
VOCAB = 5
SAMPLING_CONFIGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.3, top_k=4, top_p=0.95)]


def exact_distribution(
    next_logits: Callable[[list[int]], torch.Tensor], sampling: SamplingConfig
) -> torch.Tensor:  # [V**NEW_TOKENS]
    """P(t1, t2, t3) under the target alone, by enumerating every continuation."""
    probs = []
    for continuation in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        p, sequence = 1.0, list(PROMPT)
        for token in continuation:
            p *= float(logits_to_probs(next_logits(sequence), sampling)[token])
            sequence.append(token)
        probs.append(p)
    return torch.tensor(probs, dtype=torch.float64)


def trigram_target() -> TrigramLM:
    return TrigramLM(seed=1, vocab_size=VOCAB)


def sampled_counts(
    verifier: Verifier,
    sampling: SamplingConfig,
    gamma: int,
    target: ModelRunner | None = None,
    drafter: Drafter | None = None,
    samples: int = SAMPLES,
) -> torch.Tensor:
    """Counts of (t1, t2, t3) over `samples` generations; by default of the trigram pair."""
    target = target or trigram_target()
    drafter = drafter or ModelDrafter(TrigramLM(seed=2, vocab_size=VOCAB))
    generator = torch.Generator().manual_seed(1234)
    vocab = target.vocab_size
    counts = torch.zeros(vocab**NEW_TOKENS, dtype=torch.float64)
    for _ in range(samples):
        tokens = decode(
            target, ChainSpeculation(drafter), verifier, PROMPT,
            max_new_tokens=NEW_TOKENS + 1, policy=FixedDepth(gamma, 1), sampling=sampling,
            stop_token_ids=frozenset(), generator=generator, stats=DecodeStats(),
        )  # fmt: skip
        t1, t2, t3, _ = (t for chunk in tokens for t in chunk)
        counts[(t1 * vocab + t2) * vocab + t3] += 1
    return counts


def p_value(counts: torch.Tensor, exact: torch.Tensor) -> float:
    expected = exact / exact.sum() * counts.sum()  # float32 probabilities sum to 1 only up to rounding
    impossible = exact == 0
    if counts[impossible].sum() > 0:  # a sequence the target can never produce: not its distribution
        return 0.0
    # Chi-squared needs enough expected mass per cell: lump the small cells into one.
    keep = expected >= 5
    lumped = ~keep & ~impossible
    observed = torch.cat([counts[keep], counts[lumped].sum().view(1)])
    expected = torch.cat([expected[keep], expected[lumped].sum().view(1)])
    if expected[-1] == 0:  # nothing was lumped
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def broken(rule: str, sampling: SamplingConfig) -> Verifier:
    """Deliberately wrong acceptance rules, each a classic bug."""

    def verify(tree: TokenTree, target_logits: torch.Tensor, generator: torch.Generator | None) -> Verdict:
        if len(tree) == 1:
            return make_verifier(sampling)(tree, target_logits, generator)
        target_probs = logits_to_probs(target_logits, sampling)
        assert tree.draft_probs is not None
        draft_tokens, draft_probs, k = tree.tokens[1:], tree.draft_probs[1:], len(tree) - 1
        if rule == "target_instead_of_residual":
            verdict = verify_speculative_sampling(draft_tokens, draft_probs, target_probs, generator)
            if verdict.accepted_len < k:
                resampled = torch.multinomial(target_probs[verdict.accepted_len], 1, generator=generator)
                verdict = Verdict.of_chain(verdict.accepted_len, int(resampled))
            return verdict
        # "swapped_roles": target and draft distributions swapped (the p/q mix-up), bonus token kept right.
        swapped = torch.cat([draft_probs, target_probs[k:]])
        return verify_speculative_sampling(draft_tokens, target_probs[:k], swapped, generator)

    return verify


@pytest.mark.parametrize("sampling", SAMPLING_CONFIGS, ids=["t1.0", "t1.3-topk4-topp0.95"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_speculative_sampling_matches_target_distribution(sampling: SamplingConfig, gamma: int) -> None:
    counts = sampled_counts(make_verifier(sampling), sampling, gamma)
    assert p_value(counts, exact_distribution(trigram_target().next_logits, sampling)) > 1e-3


@pytest.mark.parametrize("rule", ["target_instead_of_residual", "swapped_roles"])
def test_broken_acceptance_rule_fails_the_same_test(rule: str) -> None:
    sampling = SAMPLING_CONFIGS[0]
    counts = sampled_counts(broken(rule, sampling), sampling, gamma=2)
    assert p_value(counts, exact_distribution(trigram_target().next_logits, sampling)) < 1e-6


@pytest.mark.parametrize(
    ("broken_rule", "head_tokens"), [(None, 0), (None, 3), ("target_instead_of_residual", 0)]
)
def test_sorted_drafting_samples_the_target_distribution(broken_rule: str | None, head_tokens: int) -> None:
    """Drafts from a sorted draft's adaptive exits (tiny Qwen2s over 5 tokens), with the full head or a
    draft head that never proposes 2 of the 5 tokens; a broken verifier fails."""
    sampling = SAMPLING_CONFIGS[0]
    target_model, draft_model = tiny_qwen2(1, vocab_size=VOCAB), tiny_qwen2(2, vocab_size=VOCAB, layers=3)
    exits = SortedExits(draft_model, (1, 2, 3))
    exits.head_order = torch.tensor([4, 0, 2, 1, 3])
    exits.restrict_head(draft_model, head_tokens)
    drafter = SortedDrafter(SortedRunner(draft_model, exits), (0.5, 0.5))
    verifier = broken(broken_rule, sampling) if broken_rule else make_verifier(sampling)
    counts = sampled_counts(verifier, sampling, 2, HFRunner(target_model), drafter, samples=3_000)
    assert sum(drafter.exit_counts[:2]) > 0  # shallow exits drafted (and, with the full head, the deepest)
    assert drafter.exit_counts[2] > 0 or head_tokens

    def next_logits(sequence: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return target_model(torch.tensor([sequence], device=target_model.device)).logits[0, -1].cpu()

    p = p_value(counts, exact_distribution(next_logits, sampling))
    assert p > 1e-3 if broken_rule is None else p < 1e-6
