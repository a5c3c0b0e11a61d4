"""Greedy speculative decoding is token-for-token identical to plain greedy decoding (tiny models)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.models.loading import pack_linears_onednn
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.tree import TokenTree
from swarmspec.verify import Verdict, verify_greedy

from tiny_models import TEST_DEVICE, run_decode, tiny_qwen2

VOCAB = 96


def prompt_for(seed: int, length: int) -> list[int]:
    return torch.randint(VOCAB, (length,), generator=torch.Generator().manual_seed(1000 + seed)).tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


class ScriptedDrafter(Drafter):
    """Proposes the true greedy continuation, corrupted at a scripted position of each draft.

    `wrong_at` yields, per call, the draft index to corrupt (or None for a fully correct draft), so
    every step's accepted length is known in advance.
    """

    def __init__(self, reference: list[int], prompt_len: int, wrong_at: Iterator[int | None]) -> None:
        self.reference, self.prompt_len, self.wrong_at = reference, prompt_len, wrong_at
        self.expected_accepted: list[int] = []
        self.drafted: list[int] = []

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        start = len(context) - self.prompt_len
        tokens = list(self.reference[start : start + max_tokens])
        wrong = next(self.wrong_at)
        if wrong is not None and wrong < len(tokens):
            tokens[wrong] = (tokens[wrong] + 1) % VOCAB
            self.expected_accepted.append(wrong)
        else:
            self.expected_accepted.append(len(tokens))
        self.drafted.append(len(tokens))
        return Draft.of(tokens)


@pytest.mark.parametrize("seed", range(6))
def test_autoregressive_matches_transformers_generate(seed: int) -> None:
    target = tiny_qwen2(seed)
    prompt = prompt_for(seed, 3 + seed * 5)
    assert run_decode(target, None, prompt, 40)[0] == hf_greedy(target, prompt, 40)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_random_drafter_matches_autoregressive(seed: int, gamma: int) -> None:
    target, other = tiny_qwen2(seed), tiny_qwen2(seed + 100)
    prompt = prompt_for(seed, 3 + seed * 5)
    reference, _ = run_decode(target, None, prompt, 40)
    output, stats = run_decode(target, ModelDrafter(HFRunner(other)), prompt, 40, gamma)
    assert output == reference
    assert stats.drafted_tokens > 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_agreeing_drafter_accepts_everything(seed: int, gamma: int) -> None:
    target = tiny_qwen2(seed)
    prompt = prompt_for(seed, 6)
    reference, _ = run_decode(target, None, prompt, 41)
    output, stats = run_decode(target, ModelDrafter(HFRunner(target)), prompt, 41, gamma)
    assert output == reference
    assert stats.acceptance_rate == 1.0
    # Every step commits gamma + 1 tokens, except the last, clipped to max_new_tokens.
    assert stats.target_forwards == 1 + -(-40 // (gamma + 1))


@pytest.mark.parametrize("script", [[0], [1], [2, None, 0], [None], [3, 1, None, 2, 0]])
def test_scripted_partial_acceptance(script: list[int | None]) -> None:
    target = tiny_qwen2(7)
    prompt = prompt_for(7, 5)
    reference, _ = run_decode(target, None, prompt, 50)
    drafter = ScriptedDrafter(reference, len(prompt), itertools.cycle(script))
    output, stats = run_decode(target, drafter, prompt, 50, gamma=4)
    assert output == reference
    assert stats.accepted_tokens == sum(drafter.expected_accepted)
    assert stats.drafted_tokens == sum(drafter.drafted)
    corrupted = sum(d > a for d, a in zip(drafter.drafted, drafter.expected_accepted, strict=True))
    assert (corrupted > 0) == any(w is not None for w in script)  # every script corrupts some draft


def greedy_accepting_one_extra(tree: TokenTree, target_logits: torch.Tensor, generator) -> Verdict:
    """A deliberately broken verifier: it keeps one draft token past the first mismatch."""
    verdict = verify_greedy(tree.tokens[1:], target_logits)
    if verdict.accepted_len < len(tree) - 1:
        verdict = Verdict.of_chain(verdict.accepted_len + 1, verdict.next_token)
    return verdict


def test_broken_verifier_is_caught() -> None:
    target, other = tiny_qwen2(0), tiny_qwen2(100)
    prompt = prompt_for(0, 8)
    reference, _ = run_decode(target, None, prompt, 40)
    output, _ = run_decode(
        target, ModelDrafter(HFRunner(other)), prompt, 40, verifier=greedy_accepting_one_extra
    )
    assert output != reference


def test_stops_at_stop_token_like_autoregressive() -> None:
    target = tiny_qwen2(3)
    prompt = prompt_for(3, 4)
    reference, _ = run_decode(target, None, prompt, 60)
    stop = reference[17]
    expected = reference[: reference.index(stop) + 1]
    output, stats = run_decode(
        target, ModelDrafter(HFRunner(target)), prompt, 60, gamma=5, stop_token_ids=frozenset([stop])
    )
    assert output == expected
    assert stats.new_tokens == len(expected)


def test_rollback_then_forward_equals_fresh_forward() -> None:
    model = tiny_qwen2(5)
    tokens = torch.tensor(prompt_for(5, 12))
    runner = HFRunner(model)
    runner.forward(tokens[:8], num_logits=1)
    runner.forward(torch.tensor([1, 2, 3]), num_logits=3)  # a rejected draft
    runner.rollback(8)
    continued = runner.forward(tokens[8:], num_logits=4)
    fresh = HFRunner(model).forward(tokens, num_logits=4)
    torch.testing.assert_close(continued, fresh)


def test_sampling_config_is_not_consulted_in_greedy_mode() -> None:
    # Guards the contract that greedy output depends on nothing but the models.
    target = tiny_qwen2(2)
    prompt = prompt_for(2, 5)
    a, _ = run_decode(target, None, prompt, 20, sampling=SamplingConfig(), seed=1)
    b, _ = run_decode(target, None, prompt, 20, sampling=SamplingConfig(), seed=2)
    assert a == b


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="oneDNN packs CPU weights")
@pytest.mark.parametrize("seed", range(3))
def test_onednn_packed_target_matches_plain_autoregressive(seed: int) -> None:
    plain = tiny_qwen2(seed)
    packed = tiny_qwen2(seed)
    pack_linears_onednn(packed)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    prompt = prompt_for(seed, 9)
    reference, _ = run_decode(plain, None, prompt, 40)
    output, _ = run_decode(packed, ModelDrafter(HFRunner(tiny_qwen2(seed + 100))), prompt, 40, gamma=3)
    assert output == reference
