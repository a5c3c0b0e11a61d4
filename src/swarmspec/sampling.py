"""Sampling parameters and the logits -> probabilities transform shared by target and drafters.

Speculative sampling is lossless with respect to the *processed* target distribution, so the same
temperature / top-k / top-p transform must be applied to target and drafter logits alike: both go
through `logits_to_probs` with one `SamplingConfig`.

Shape letters: k = tokens, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmspec.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingConfig:
    # 0 means greedy (argmax); > 0 divides the logits before the softmax.
    temperature: float = 0.0
    # Keep only the k most probable tokens; 0 keeps all.
    top_k: int = 0
    # Keep the smallest set of most probable tokens whose mass reaches top_p; 1.0 keeps all.
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature != float("inf")):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(
    logits: torch.Tensor,  # [..., V]
    config: SamplingConfig,
) -> torch.Tensor:  # [..., V] float32, rows sum to 1
    """Temperature, then top-k, then top-p (the order `transformers` applies them), then softmax.

    Only for sampling: greedy decoding compares argmaxes and never builds distributions.
    """
    if config.greedy:
        raise ValueError("logits_to_probs needs temperature > 0; greedy decoding uses argmax")
    scores = logits.to(torch.float32) / config.temperature
    if config.top_k > 0 and config.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Mass strictly before each token: a token is kept while the mass before it is < top_p,
        # so the most probable token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= config.top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def sample(
    probs: torch.Tensor,  # [..., V]
    generator: torch.Generator | None,
) -> torch.Tensor:  # [...] int64
    """Draw one token per row. Uses the injected generator only: no hidden global RNG state."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def choose_tokens(
    logits: torch.Tensor,  # [..., V]
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # tokens [...], probs [..., V] or None when greedy
    """The token(s) a model emits under `config`, and the distribution they were drawn from."""
    if config.greedy:
        return logits.argmax(dim=-1), None
    probs = logits_to_probs(logits, config)
    return sample(probs, generator), probs
