"""A sorted draft as a drafter (S2D): each token comes from the shallowest exit confident enough."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swarmspec.drafters.base import Draft, Drafter, draft_chain
from swarmspec.drafters.model import reusable_prefix
from swarmspec.runners.sorted import SortedRunner
from swarmspec.sampling import SamplingConfig


def plan_exits(
    pass_rates: Sequence[float],
    head_cost: Sequence[float],
    segment_cost: Sequence[float],
    try_all: bool = False,
) -> tuple[list[bool], float]:
    """Which exits a token should try, from the shallowest, and what a token then costs on average.

    Trying exit j costs its head whether or not the token passes there; passing saves what the token
    would spend beyond it (the next segment's layers and whatever it would try after, chosen the same
    way). `pass_rates[j]`: P(a token that tries exit j passes its threshold). The deepest exit always
    answers. `try_all`: every exit is tried (the cost of drafting without pruning)."""
    worth = [True] * len(pass_rates)
    after = head_cost[-1]  # expected cost of a token that has reached the deepest exit's decision
    for j in range(len(pass_rates) - 2, -1, -1):
        onward = segment_cost[j + 1] + after  # what a token leaving exit j unanswered still costs
        worth[j] = try_all or pass_rates[j] * onward > head_cost[j]
        after = head_cost[j] + (1 - pass_rates[j]) * onward if worth[j] else onward
    return worth, segment_cost[0] + after


class SortedDrafter(Drafter):
    """Drafts a chain; per token it tries the exits from the shallowest and keeps the first whose top
    probability reaches that exit's threshold (the deepest exit always answers). Only the exits tried
    run, and a deeper exit completes the skipped layers' cache on the way (runners.sorted).

    With `prune_exits`, an exit whose tokens pass too rarely to pay for its head is not tried
    (`plan_exits`, from each exit's running pass rate and the weights its head and the layers
    after it read); it is still tried once every `probe_every` tokens that skip it, so that its pass rate
    stays current."""

    def __init__(
        self,
        runner: SortedRunner,
        thresholds: Sequence[float],
        prune_exits: bool = True,
        probe_every: int = 16,
        decay: float = 0.98,
    ) -> None:
        if len(thresholds) != len(runner.exits.depths) - 1:
            raise ValueError(f"one threshold per exit but the deepest, got {list(thresholds)}")
        self.runner = runner
        self.thresholds = (*thresholds, 0.0)
        self.cached_ids: list[int] = []
        self.exit_counts = [0] * len(self.thresholds)  # drafted tokens per exit, for reports
        self.prune_exits, self.probe_every, self.decay = prune_exits, probe_every, decay
        self.segment_cost, self.head_cost = runner.weights_read()
        # Decayed counts of tokens that tried each exit and passed, starting from one pass in two tries.
        self.tried = [2.0] * len(self.thresholds)
        self.passed = [1.0] * len(self.thresholds)
        self.skipped = [0] * len(self.thresholds)  # tokens that skipped each exit since it was last tried

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
        # Exit j's worth depends on its own and deeper exits' rates only, which trying the shallower
        # exits of this token does not change: one plan per token.
        worth = plan_exits(self._pass_rates(), self.head_cost, self.segment_cost, not self.prune_exits)[0]
        for exit_index, threshold in enumerate(self.thresholds):
            if not self._tries(exit_index, worth[exit_index]):
                continue
            logits = self.runner.exit_logits(exit_index)
            passed = threshold == 0 or float(torch.softmax(logits, -1).max()) >= threshold
            self.tried[exit_index] = self.decay * self.tried[exit_index] + 1
            self.passed[exit_index] = self.decay * self.passed[exit_index] + passed
            if passed:
                self.exit_counts[exit_index] += 1
                return logits
        raise AssertionError("the deepest exit's threshold is 0")

    def cost_share(self) -> float:
        """A drafted token's expected weights read (`plan_exits`, from the running pass rates) over the
        whole draft model's, whose forward the cost profile measured."""
        _, expected = plan_exits(self._pass_rates(), self.head_cost, self.segment_cost, not self.prune_exits)
        return expected / (sum(self.segment_cost) + self.head_cost[-1])

    def _pass_rates(self) -> list[float]:
        return [passed / tried for passed, tried in zip(self.passed, self.tried, strict=True)]

    def _tries(self, exit_index: int, worth: bool) -> bool:
        """Whether the token tries this exit: where it is worth it, else as a probe now and then."""
        if worth:
            self.skipped[exit_index] = 0
            return True
        self.skipped[exit_index] += 1
        if self.skipped[exit_index] >= self.probe_every:  # a probe: is it worth trying again?
            self.skipped[exit_index] = 0
            return True
        return False

    def _feed(self, token: int) -> torch.Tensor:  # [V] after `token`
        self._extend([token])
        return self._confident_exit_logits()

    def _extend(self, token_ids: list[int]) -> None:
        self.runner.extend(token_ids)
        self.cached_ids.extend(token_ids)
