"""The logits -> probabilities transform agrees with transformers' own logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from swarmspec.errors import InvalidRequestError
from swarmspec.sampling import SamplingConfig, choose_tokens, logits_to_probs


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 20, 0.9), (2.0, 3, 0.5)],
)
def test_matches_transformers_warpers(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    reference = processors(torch.zeros(4, 1, dtype=torch.int64), logits.clone()).softmax(-1)
    ours = logits_to_probs(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(ours, reference)


def test_greedy_chooses_argmax_without_distribution() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    tokens, probs = choose_tokens(logits, SamplingConfig(), torch.Generator())
    assert tokens.tolist() == [1, 0] and probs is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingConfig(**kwargs)
