"""Speculation: turning drafters' proposals into the token tree the target verifies in one forward.

- `ChainSpeculation`: one drafter's chain (classic speculative decoding).
- `VoteSpeculation`: several drafters vote, weighted by their running acceptance (Minions).
- `ExpansionTree`: one draft model's top-k (or sampled) children per node, in a fixed shape or within a
  node budget (most confident first), other drafters merged in (`grow_tree`).
- `MergedTree`: several drafters' chains merged into one trie by shared prefixes (SpecInfer's
  merge-based tree); in sampling mode every proposal stays its own branch, since multi-step
  speculative sampling needs each node to be a draw from one drafter's distribution.

The decode loop tells a speculation (and through it every drafter) what happened: `begin` with the
prompt, `observe` after every target forward with the tree, the accepted path and the committed tokens,
`end` when the sequence is finished or abandoned. Adaptive speculations learn from these calls only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.sampling import SamplingConfig, logits_to_probs
from swarmspec.tree import TokenTree, TreeShape

logger = logging.getLogger("swarmspec")
T = TypeVar("T")


class Speculation(ABC):
    """Builds the tree of candidates after the committed context; its root is the newest token.

    `drafters` lists the drafters in a fixed order: a tree's `proposers` index into it. A drafter that
    raises is logged and left out for the rest of the generation: drafts never decide the output, so the
    generation goes on, identical, with the others (or none).
    """

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)
        self.failed: set[int] = set()  # drafters that raised during this generation

    def begin(self, prompt_ids: list[int]) -> None:
        self.failed = set()
        for i, drafter in enumerate(self.drafters):
            self._guarded(i, drafter.begin, None, prompt_ids)

    def observe(self, tree: TokenTree, path: list[int], committed: list[int]) -> None:
        """The target verified `tree`, accepted the nodes `path` and committed `committed` (the accepted
        tokens, cut at a stop token, then its own); after the prefill `tree` is the root alone."""
        for i, drafter in enumerate(self.drafters):
            self._guarded(i, drafter.observe, None, committed)

    def end(self) -> None:
        for i, drafter in enumerate(self.drafters):
            self._guarded(i, drafter.end, None)

    def _guarded(self, index: int, call: Callable[..., T], fallback: T, *args: Any) -> T:
        """`call(*args)` on behalf of drafter `index`; `fallback` if it failed now or before."""
        if index in self.failed:
            return fallback
        try:
            return call(*args)
        except Exception:
            self.failed.add(index)
            name = type(self.drafters[index]).__name__
            logger.warning("drafter %d (%s) failed; going on without it", index, name, exc_info=True)
            return fallback

    def propose_all(
        self,
        indices: Sequence[int],
        context: list[int],
        depths: Sequence[int],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> list[Draft]:
        """Drafters[i]'s chain for each i in `indices`, at most depths[i] long; a drafter given depth 0
        does not run."""
        return [
            self._guarded(i, self.drafters[i].propose, Draft.empty(), context, depths[i], sampling, generator)
            if depths[i] > 0
            else Draft.empty()
            for i in indices
        ]

    @abstractmethod
    def speculate(
        self,
        context: list[int],
        depths: Sequence[int],
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> TokenTree:
        """A tree below the root (`context[-1]`) in which drafter i proposes at most `depths[i]` tokens
        deep (0: it does not run)."""


class NoSpeculation(Speculation):
    """Plain autoregressive decoding through the same loop: the tree is the root alone."""

    def __init__(self) -> None:
        super().__init__([])

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        return TokenTree.chain(context[-1], torch.empty(0, dtype=torch.int64))


class ChainSpeculation(Speculation):
    def __init__(self, drafter: Drafter) -> None:
        super().__init__([drafter])

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        (draft,) = self.propose_all([0], context, depths, sampling, generator)
        return TokenTree.chain(context[-1], draft.tokens, draft.probs)


class MergedTree(Speculation):
    """Every drafter proposes a chain; the chains become one trie."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        if not drafters:
            raise ValueError("a merged tree needs at least one drafter")
        super().__init__(drafters)

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        drafts = self.propose_all(range(len(self.drafters)), context, depths, sampling, generator)
        return merge_drafts(context[-1], drafts, dedupe=sampling.greedy)


class ExpansionTree(Speculation):
    """A tree grown from the draft model `drafters[grower]` in the given shape (fixed widths per depth,
    e.g. 3,2,1,1, or a node budget), with the other drafters' chains merged in."""

    def __init__(self, drafters: Sequence[Drafter], shape: TreeShape, grower: int) -> None:
        grown_from = drafters[grower]
        if not isinstance(grown_from, ModelDrafter):
            raise ValueError(f"a tree is grown from a draft model, not {type(grown_from).__name__}")
        super().__init__(drafters)
        self.shape = shape
        self.grower_index = grower
        self.grower = grown_from
        self.others = [i for i in range(len(drafters)) if i != grower]

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        root_only = TokenTree.chain(context[-1], torch.empty(0, dtype=torch.int64))
        tree = self._guarded(
            self.grower_index,
            grow_tree,
            root_only,
            self.grower,
            context,
            self.shape,
            depths[self.grower_index],
            sampling,
            generator,
        )
        tree = replace(tree, proposers=(-1, *[self.grower_index] * (len(tree) - 1)))
        drafts = self.propose_all(self.others, context, depths, sampling, generator)
        return merge_into(tree, drafts, dedupe=sampling.greedy, proposers=self.others)


def grow_tree(
    drafter: ModelDrafter,
    context: list[int],
    shape: TreeShape,
    max_depth: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> TokenTree:
    """A token tree grown from a draft model level by level, `shape` saying how many children each node
    of the newest level gets.

    Greedy: a node's n children are the n most probable tokens of its distribution. Sampling: n
    independent draws from it (repeats stay separate children), each child keeping that distribution,
    as multi-step speculative sampling requires. One drafter forward per level reads all its nodes.
    """
    root_only = TokenTree.chain(context[-1], torch.empty(0, dtype=torch.int64))
    levels = shape.levels(max_depth)
    if levels == 0:  # nothing to draft (the generation's last token): skip the catch-up forward
        return root_only
    logits = drafter.tree_root_logits(context)[None]  # [1, V]: after the root
    tokens, parents = [context[-1]], [-1]
    probs: list[torch.Tensor] = [torch.zeros_like(logits[0])]
    path_confidences = [1.0]
    frontier = [0]
    tree = root_only
    for depth in range(levels):
        # Greedy drafting has no distribution; its confidence is the drafter's plain softmax.
        dists = logits.softmax(dim=-1) if sampling.greedy else logits_to_probs(logits, sampling)
        counts = shape.child_counts(
            depth, levels, len(tokens) - 1, [path_confidences[n] for n in frontier], dists
        )
        children = []
        for node, dist, count in zip(frontier, dists, counts, strict=True):
            if count == 0:
                continue
            if sampling.greedy:
                chosen = dist.topk(count).indices
            else:
                chosen = torch.multinomial(dist, count, replacement=True, generator=generator)
            for token in chosen.tolist():
                tokens.append(token)
                parents.append(node)
                if not sampling.greedy:
                    probs.append(dist)
                path_confidences.append(path_confidences[node] * dist[token].item())
                children.append(len(tokens) - 1)
        frontier = children
        tree = TokenTree(torch.tensor(tokens, dtype=torch.int64), tuple(parents))
        if not frontier or depth + 1 == levels:  # leaves need no logits
            break
        logits = drafter.tree_level_logits(tree, frontier)
    drafter.keep_tree(tree)
    return replace(tree, draft_probs=None if sampling.greedy else torch.stack(probs))


def merge_drafts(root: int, drafts: Sequence[Draft], dedupe: bool) -> TokenTree:
    """One tree from several chains under `root`, drafts[i] proposed by drafter i; see `merge_into`."""
    root_only = TokenTree.chain(root, torch.empty(0, dtype=torch.int64))
    return merge_into(root_only, drafts, dedupe, proposers=range(len(drafts)))


def merge_into(tree: TokenTree, drafts: Sequence[Draft], dedupe: bool, proposers: Sequence[int]) -> TokenTree:
    """Add chains below the root of `tree`, drafts[i] proposed by drafter proposers[i]. With `dedupe`,
    a chain shares existing nodes along common prefixes (a trie); without, each chain is a separate
    branch, keeping its own distributions."""
    assert tree.proposers is not None
    tokens, parents, by = tree.tokens.tolist(), list(tree.parents), list(tree.proposers)
    probs = [] if tree.draft_probs is None else list(tree.draft_probs[1:])
    children = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True)) if i > 0}
    for draft, proposer in zip(drafts, proposers, strict=True):
        node = 0
        for i, token in enumerate(draft.tokens.tolist()):
            key = (node, token)
            if dedupe and key in children:
                node = children[key]
                continue
            tokens.append(token)
            parents.append(node)
            by.append(proposer)
            if draft.probs is not None:
                probs.append(draft.probs[i])
            node = children[key] = len(tokens) - 1
    draft_probs = None
    if probs:
        if len(probs) != len(tokens) - 1:
            raise ValueError("in sampling mode every drafter must return the distribution of its tokens")
        draft_probs = torch.cat([torch.zeros_like(probs[0])[None], torch.stack(probs)])
    return TokenTree(torch.tensor(tokens, dtype=torch.int64), tuple(parents), draft_probs, tuple(by))


class VotePrior:
    """The vote's drafter weights as the engine's generations left them: each generation starts from
    them and hands its own back when it ends (the last to end wins)."""

    def __init__(self) -> None:
        self.weights: list[float] = []

    def weights_for(self, drafters: int) -> list[float]:
        return list(self.weights) if len(self.weights) == drafters else [1.0] * drafters


class VoteSpeculation(Speculation):
    """Collective speculation (Minions): every drafter proposes a chain and a per-position majority
    vote, weighted by each drafter's running acceptance rate, picks the one chain the target verifies.

    Weights follow weighted-majority learning: after each step a drafter's weight moves towards the
    share of its draft the target committed, so drafters that keep being rejected lose their say.
    Verification cost stays that of one chain however many drafters vote. (In greedy mode, hanging
    every losing candidate under it as a side branch would verify exactly the `MergedTree` of the same
    drafts: the voted chain is one path of their trie.)

    Sampling needs every verified token to be a draw from the distribution stored with it, which a
    token-by-token vote over several drafters' samples is not. There the vote is between drafters: the
    chain of the heaviest drafter that drafted (weights come from earlier steps only) is verified,
    losslessly.
    """

    def __init__(
        self, drafters: Sequence[Drafter], decay: float = 0.8, prior: VotePrior | None = None
    ) -> None:
        if not drafters:
            raise ValueError("a vote needs at least one drafter")
        super().__init__(drafters)
        self.decay = decay
        self.prior = prior or VotePrior()
        self.weights = self.prior.weights_for(len(drafters))
        self._last_drafts: list[Draft] = []

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.weights = self.prior.weights_for(len(self.drafters))

    def end(self) -> None:
        super().end()
        self.prior.weights = list(self.weights)

    def speculate(self, context, depths, sampling, generator) -> TokenTree:
        drafts = self.propose_all(range(len(self.drafters)), context, depths, sampling, generator)
        self._last_drafts = drafts
        if not sampling.greedy:
            # Among the drafters that drafted (not ones the policy left out or that failed: whether a
            # draft is empty never depends on this step's draws).
            drafted = [i for i, draft in enumerate(drafts) if len(draft)]
            if not drafted:
                return TokenTree.chain(context[-1], torch.empty(0, dtype=torch.int64))
            best = max(drafted, key=self.weights.__getitem__)
            draft = drafts[best]
            return TokenTree.chain(context[-1], draft.tokens, draft.probs, [best] * len(draft))
        chains = [d.tokens.tolist() for d in drafts]
        voted = weighted_vote(chains, self.weights)
        # Each voted token is credited to the first drafter whose chain leads to it.
        proposers = [
            next(i for i, c in enumerate(chains) if c[: k + 1] == voted[: k + 1]) for k in range(len(voted))
        ]
        return TokenTree.chain(context[-1], torch.tensor(voted, dtype=torch.int64), None, proposers)

    def observe(self, tree: TokenTree, path: list[int], committed: list[int]) -> None:
        """Move each drafter's weight towards the share of its last draft the target committed."""
        super().observe(tree, path, committed)
        for i, draft in enumerate(self._last_drafts):
            if len(draft) == 0:
                continue
            agreed = common_prefix_len(draft.tokens.tolist(), committed)
            self.weights[i] = self.decay * self.weights[i] + (1 - self.decay) * agreed / len(draft)
        self._last_drafts = []


def weighted_vote(chains: Sequence[list[int]], weights: Sequence[float]) -> list[int]:
    """Walk the trie of `chains` from the root, always into the child with the most weight behind it
    (ties: the earlier chain's token). Each chain's weight counts only while it agrees with the vote."""
    voted: list[int] = []
    alive = [i for i, chain in enumerate(chains) if chain]
    while True:
        depth = len(voted)
        support: dict[int, float] = {}
        for i in alive:
            if depth < len(chains[i]):
                token = chains[i][depth]
                support[token] = support.get(token, 0.0) + weights[i]
        if not support:
            return voted
        winner = max(support, key=support.__getitem__)  # dicts keep first-seen order on ties
        voted.append(winner)
        alive = [i for i in alive if depth < len(chains[i]) and chains[i][depth] == winner]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length
