"""Verification math on synthetic tensors: table-driven greedy cases and exact/sampled distributions."""

from __future__ import annotations

import pytest
import torch

from swarmspec.sampling import SamplingConfig
from swarmspec.tree import TokenTree
from swarmspec.verify import Verdict, make_verifier, verify_greedy, verify_speculative_sampling

V = 10


def logits_with_argmax(argmaxes: list[int]) -> torch.Tensor:  # [k+1, V]
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


@pytest.mark.parametrize(
    ("draft", "target_argmax", "expected"),
    [
        ([5, 7, 9], [5, 7, 9, 4], Verdict.of_chain(3, 4)),  # full match: bonus token
        ([5, 7, 9], [5, 7, 2, 4], Verdict.of_chain(2, 2)),  # mismatch at the end
        ([5, 7, 9], [1, 7, 9, 4], Verdict.of_chain(0, 1)),  # early mismatch: later matches do not count
        ([], [3], Verdict.of_chain(0, 3)),  # empty draft: plain decoding
        ([6], [6, 6], Verdict.of_chain(1, 6)),
    ],
)
def test_greedy_verdicts(draft: list[int], target_argmax: list[int], expected: Verdict) -> None:
    assert (
        verify_greedy(torch.tensor(draft, dtype=torch.int64), logits_with_argmax(target_argmax)) == expected
    )


def random_probs(generator: torch.Generator, rows: int, vocab: int = 5) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=generator) * 1.5).softmax(-1)


def output_distribution(
    verify_fn, target_probs: torch.Tensor, draft_probs: torch.Tensor, samples: int, seed: int
) -> torch.Tensor:  # [V] empirical distribution of the first emitted token
    generator = torch.Generator().manual_seed(seed)
    k = draft_probs.shape[0]
    counts = torch.zeros(target_probs.shape[-1])
    for _ in range(samples):
        draft_tokens = torch.multinomial(draft_probs, 1, generator=generator).view(k)
        verdict = verify_fn(draft_tokens, draft_probs, target_probs, generator)
        first = int(draft_tokens[0]) if verdict.accepted_len > 0 else verdict.next_token
        counts[first] += 1
    return counts / samples


def verify_without_residual(draft_tokens, draft_probs, target_probs, generator) -> Verdict:
    """A deliberately broken rule: on rejection, resample from the target instead of the residual."""
    verdict = verify_speculative_sampling(draft_tokens, draft_probs, target_probs, generator)
    if verdict.accepted_len < draft_tokens.shape[0]:
        fresh = torch.multinomial(target_probs[verdict.accepted_len], 1, generator=generator)
        return Verdict.of_chain(verdict.accepted_len, int(fresh))
    return verdict


def test_speculative_sampling_reproduces_target_distribution() -> None:
    generator = torch.Generator().manual_seed(1)
    target_probs, draft_probs = random_probs(generator, 3), random_probs(generator, 2)
    empirical = output_distribution(verify_speculative_sampling, target_probs, draft_probs, 40_000, seed=2)
    # 40k samples: the standard error of each probability is < 0.0025.
    torch.testing.assert_close(empirical, target_probs[0], atol=0.01, rtol=0)


def test_broken_residual_is_detected() -> None:
    generator = torch.Generator().manual_seed(1)
    target_probs, draft_probs = random_probs(generator, 3), random_probs(generator, 2)
    empirical = output_distribution(verify_without_residual, target_probs, draft_probs, 40_000, seed=2)
    assert (empirical - target_probs[0]).abs().max() > 0.03


def test_identical_distributions_accept_everything() -> None:
    generator = torch.Generator().manual_seed(3)
    probs = random_probs(generator, 4)
    tokens = torch.multinomial(probs[:3], 1, generator=generator).view(3)
    assert verify_speculative_sampling(tokens, probs[:3], probs, generator).accepted_len == 3


def test_token_the_target_cannot_emit_is_always_rejected() -> None:
    target_probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    draft_probs = torch.tensor([[1.0, 0.0, 0.0]])
    verdict = verify_speculative_sampling(torch.tensor([0]), draft_probs, target_probs, torch.Generator())
    assert verdict == Verdict.of_chain(0, 1)


def test_sampling_verifier_needs_draft_probabilities() -> None:
    verify = make_verifier(SamplingConfig(temperature=1.0))
    with pytest.raises(ValueError, match="distribution each draft token"):
        verify(TokenTree.chain(0, torch.tensor([1, 2])), torch.zeros(3, V), torch.Generator())
