"""Speculation: turning drafters' proposals into the token tree the target verifies in one forward.

- `ChainSpeculation`: one drafter's chain (classic speculative decoding).
- `MergedTree`: several drafters' chains merged into one trie by shared prefixes (SpecInfer's
  merge-based tree); in sampling mode every proposal stays its own branch, since multi-step
  speculative sampling needs each node to be a draw from one drafter's distribution.

Every speculation is told the verdict of its tree afterwards, so adaptive ones can learn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.sampling import SamplingConfig
from swarmspec.tree import TokenTree


class Speculation(ABC):
    """Builds the tree of candidates after the committed context; its root is the newest token."""

    @abstractmethod
    def speculate(
        self,
        context: list[int],
        max_depth: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        """A tree no deeper than `max_depth` below the root (`context[-1]`)."""


class ChainSpeculation(Speculation):
    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter

    def speculate(self, context, max_depth, sampling, generator) -> TokenTree:
        draft = self.drafter.propose(context, max_depth, sampling, generator)
        return TokenTree.chain(context[-1], draft.tokens, draft.probs)


class MergedTree(Speculation):
    """Every drafter proposes a chain; the chains become one trie."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        if not drafters:
            raise ValueError("a merged tree needs at least one drafter")
        self.drafters = list(drafters)

    def speculate(self, context, max_depth, sampling, generator) -> TokenTree:
        drafts = [d.propose(context, max_depth, sampling, generator) for d in self.drafters]
        return merge_drafts(context[-1], drafts, dedupe=sampling.greedy)


def merge_drafts(root: int, drafts: Sequence[Draft], dedupe: bool) -> TokenTree:
    """One tree from several chains. With `dedupe`, chains share nodes along common prefixes (a trie);
    without, each chain is a separate branch under the root, keeping its own distributions."""
    tokens, parents, probs = [root], [-1], []
    children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for draft in drafts:
        node = 0
        for i, token in enumerate(draft.tokens.tolist()):
            key = (node, token)
            if dedupe and key in children:
                node = children[key]
                continue
            tokens.append(token)
            parents.append(node)
            if draft.probs is not None:
                probs.append(draft.probs[i])
            node = children[key] = len(tokens) - 1
    draft_probs = None
    if probs:
        if len(probs) != len(tokens) - 1:
            raise ValueError("in sampling mode every drafter must return the distribution of its tokens")
        draft_probs = torch.cat([torch.zeros_like(probs[0])[None], torch.stack(probs)])
    return TokenTree(torch.tensor(tokens, dtype=torch.int64), tuple(parents), draft_probs)
