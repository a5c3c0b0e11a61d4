"""The one interface every drafter implements, and the draft it hands to the verifier.

Shape letters: k = draft tokens, V = vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarmspec.sampling import SamplingConfig, choose_tokens


@dataclass(frozen=True)
class Draft:
    """A chain of proposed tokens, continuing the committed context."""

    tokens: torch.Tensor  # [k] int64
    # [k, V]: the distribution each token was *sampled* from, which speculative sampling needs to stay
    # lossless; None in greedy mode, where only the tokens matter.
    probs: torch.Tensor | None = None

    @classmethod
    def empty(cls) -> Draft:
        return cls(torch.empty(0, dtype=torch.int64))

    @classmethod
    def of(cls, tokens: list[int], probs: torch.Tensor | None = None) -> Draft:
        """Cheap constructor for tests and model-free drafters."""
        return cls(torch.tensor(tokens, dtype=torch.int64), probs)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class Drafter(ABC):
    """Proposes tokens that continue a context. Drafters never decide what is output; the target does.

    The decode loop tells every drafter what happened: `begin` when a sequence starts, `observe` with
    the tokens the target committed after each proposal, `end` when the sequence is finished or
    abandoned. Drafters learn from these calls only, never by comparing the contexts they are handed.
    """

    def begin(self, prompt_ids: list[int]) -> None:  # noqa: B027 - most drafters keep no sequence state
        """A new sequence starts with these tokens."""

    def observe(self, committed: list[int]) -> None:  # noqa: B027
        """The target committed these tokens since the last proposal (its accepted prefix, then its own)."""

    def end(self) -> None:  # noqa: B027
        """The sequence is finished or abandoned."""

    def cost_share(self) -> float:
        """What drafting a token costs now, as a share of this drafter's profiled per-token cost (a
        sorted draft whose tokens stop at shallow exits: less than its whole model's)."""
        return 1.0

    @abstractmethod
    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        """Up to `max_tokens` tokens continuing `context` (every committed token: prompt and output).

        In sampling mode each token must be drawn from the returned `probs` row, processed with the
        same `sampling` config as the target's.
        """


def draft_chain(
    logits: torch.Tensor,  # [V] after the last context token
    feed: Callable[[int], torch.Tensor],  # runs a drafted token, returns the [V] logits after it
    max_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> Draft:
    """A chain of `max_tokens` tokens, each chosen from the logits after the one before. The last token
    is not fed: its logits would only serve a longer draft."""
    tokens: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    for i in range(max_tokens):
        token, token_probs = choose_tokens(logits, sampling, generator)
        tokens.append(token)
        if token_probs is not None:
            probs.append(token_probs)
        if i + 1 < max_tokens:
            logits = feed(int(token))
    return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)
