"""A sorted draft as a drafter (S2D): each token comes from the shallowest exit confident enough."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swarmspec.drafters.base import Draft, Drafter, draft_chain
from swarmspec.drafters.model import reusable_prefix
from swarmspec.runners.sorted import SortedRunner
from swarmspec.sampling import SamplingConfig


class SortedDrafter(Drafter):
    """Drafts a chain; per token it tries the exits from the shallowest and keeps the first whose top
    probability reaches that exit's threshold (the deepest exit always answers). Only the exits tried
    run, and a deeper exit completes the skipped layers' cache on the way (runners.sorted)."""

    def __init__(self, runner: SortedRunner, thresholds: Sequence[float]) -> None:
        if len(thresholds) != len(runner.exits.depths) - 1:
            raise ValueError(f"one threshold per exit but the deepest, got {list(thresholds)}")
        self.runner = runner
        self.thresholds = (*thresholds, 0.0)
        self.cached_ids: list[int] = []
        self.exit_counts = [0] * len(self.thresholds)  # drafted tokens per exit, for reports

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        if max_tokens <= 0:
            return Draft.empty()
        shared = reusable_prefix(self.cached_ids, context)
        self.runner.rollback(shared)
        del self.cached_ids[shared:]
        self._extend(context[shared:])
        return draft_chain(self._confident_exit_logits(), self._feed, max_tokens, sampling, generator)

    @property
    def exit_tally(self) -> tuple[int, int]:
        """Tokens drafted so far and the layers they ran (each its exit's depth)."""
        depths = self.runner.exits.depths
        return sum(self.exit_counts), sum(n * d for n, d in zip(self.exit_counts, depths, strict=True))

    def _confident_exit_logits(self) -> torch.Tensor:  # [V] after the last token
        for exit_index, threshold in enumerate(self.thresholds):
            logits = self.runner.exit_logits(exit_index)
            if threshold == 0 or float(torch.softmax(logits, -1).max()) >= threshold:
                self.exit_counts[exit_index] += 1
                return logits
        raise AssertionError("the deepest exit's threshold is 0")

    def _feed(self, token: int) -> torch.Tensor:  # [V] after `token`
        self._extend([token])
        return self._confident_exit_logits()

    def _extend(self, token_ids: list[int]) -> None:
        self.runner.extend(token_ids)
        self.cached_ids.extend(token_ids)
