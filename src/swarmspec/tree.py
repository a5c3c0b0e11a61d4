"""Token trees: candidate continuations of the committed context, laid out for one target forward.

Node 0 is the root: the newest committed token, which the target has not run yet. Every other node is a
candidate token whose parent comes before it (topological order), so a flat list of nodes is already
the order the target reads them in. A chain of k drafted tokens is the tree with parents [-1, 0, ..., k-1].

The target reads all nodes in one forward: each attends to the cached context and to its own ancestors
(the tree attention mask), at position cached length + depth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    tokens: torch.Tensor  # [n] int64; tokens[0] is the root
    parents: tuple[int, ...]  # [n]; parents[0] == -1, parents[i] < i
    # The distribution each node was sampled from, [n, V] (row 0 unused); None for greedy drafting.
    draft_probs: torch.Tensor | None = None
    # [n] which drafter proposed each node, an index into the speculation's `drafters` (-1: the root);
    # where several drafters proposed the same node, the one merged first. None: not recorded.
    proposers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if len(self.parents) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise ValueError(f"every parent must precede its child: {self.parents}")
        if self.proposers is not None and len(self.proposers) != len(self.parents):
            raise ValueError(f"{len(self.parents)} nodes but {len(self.proposers)} proposers")

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(
        cls,
        root: int,
        draft: torch.Tensor,
        draft_probs: torch.Tensor | None = None,
        proposers: Sequence[int] | None = None,  # [k]; None: all by drafter 0
    ) -> TokenTree:
        """The root followed by a chain of drafted tokens (the draft's probs, [k, V], if sampled)."""
        tokens = torch.cat([torch.tensor([root], dtype=torch.int64), draft])
        if draft_probs is not None:
            draft_probs = torch.cat([torch.zeros_like(draft_probs[:1]), draft_probs])
        by = (-1, *(proposers if proposers is not None else [0] * len(draft)))
        return cls(tokens, tuple(range(-1, len(draft))), draft_probs, by)

    @property
    def depth(self) -> int:
        """Levels below the root (0: the root alone)."""
        depths = [0] * len(self)
        for node in range(1, len(self)):
            depths[node] = depths[self.parents[node]] + 1
        return max(depths)

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it: a plain causal forward reads it."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def keep(self, nodes: Sequence[int]) -> TokenTree:
        """The tree of the given nodes (ascending, the root and every kept node's parent among them)."""
        if list(nodes) == list(range(len(self))):
            return self
        new_index = {old: new for new, old in enumerate(nodes)}
        if nodes[0] != 0 or any(self.parents[n] not in new_index for n in nodes[1:]):
            raise ValueError(f"nodes {list(nodes)} do not form a tree under the root")
        index = torch.tensor(nodes, dtype=torch.int64)
        return TokenTree(
            self.tokens[index],
            (-1, *[new_index[self.parents[n]] for n in nodes[1:]]),
            None if self.draft_probs is None else self.draft_probs[index],
            None if self.proposers is None else tuple(self.proposers[n] for n in nodes),
        )

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def ancestor_mask(self) -> torch.Tensor:  # [n, n] bool: [i, j] = node j is node i or an ancestor
        mask = torch.eye(len(self), dtype=torch.bool)
        for i in range(1, len(self)):
            mask[i] |= mask[self.parents[i]]
        return mask


def position_ids(tree_mask: torch.Tensor, root_position: int) -> torch.Tensor:  # [k] int64
    """Positions of tree nodes from their ancestor-mask rows: the root's position plus the depth."""
    return root_position + tree_mask.sum(dim=-1) - 1  # ancestors, itself excluded


class TreeShape(ABC):
    """How a draft model grows a tree level by level (`speculate.grow_tree`): how many children
    each node of the newest level gets.

    The counts may depend only on what is known before the level is drawn (the nodes so far and their
    distributions), never on the children themselves: in sampling mode a node's children must then be
    independent draws from its distribution, which multi-step speculative sampling needs to be lossless.
    """

    @abstractmethod
    def levels(self, max_depth: int) -> int:
        """How deep the tree grows when speculation allows `max_depth`."""

    @abstractmethod
    def child_counts(
        self,
        depth: int,  # of the children to add: 0 is the root's children
        max_depth: int,  # levels the tree grows in all: `levels` of the speculation's depth
        drafted: int,  # nodes below the root so far
        path_confidences: list[float],  # [f] of the frontier nodes: product of drafter probs from the root
        dists: torch.Tensor,  # [f, V] the drafter's distribution after each frontier node
    ) -> list[int]:  # [f]
        """Children for each frontier node."""


@dataclass(frozen=True)
class FixedWidths(TreeShape):
    """SpecInfer's expansion-based tree: every node at depth d gets widths[d] children (e.g. 3,2,1,1)."""

    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"tree widths must be >= 1, got {list(self.widths)}")

    def levels(self, max_depth: int) -> int:
        return min(len(self.widths), max_depth)

    def child_counts(self, depth, max_depth, drafted, path_confidences, dists) -> list[int]:
        return [self.widths[depth]] * len(path_confidences)


@dataclass(frozen=True)
class NodeBudget(TreeShape):
    """A dynamic tree of at most `budget` drafted nodes, the most valuable first.

    A frontier node's j-th child is worth its path confidence times the j-th largest probability of its
    distribution. The deeper levels are not drawn yet; each is estimated by extending the level's best
    path once more with that path's own top probability. A level takes its children that rank among the
    `budget - drafted` most valuable of both (at most `branch` of them). A confident drafter's estimated
    chain thus outbids its siblings and the tree grows deep; an unsure drafter's siblings win and the
    tree grows wide near the root. Only the frontier's distributions are read, never the children drawn
    from them, which keeps sampled trees lossless.
    """

    budget: int
    branch: int = 3

    def __post_init__(self) -> None:
        if self.budget < 1 or self.branch < 1:
            raise ValueError(f"a node budget and branch must be >= 1, got {self.budget} and {self.branch}")

    def levels(self, max_depth: int) -> int:
        return min(self.budget, max_depth)

    def child_counts(self, depth, max_depth, drafted, path_confidences, dists) -> list[int]:
        counts = [0] * len(path_confidences)
        left = self.budget - drafted
        if left <= 0:
            return counts
        width = min(self.branch, dists.shape[-1])
        top = dists.topk(width, dim=-1).values  # [f, width], descending per row
        values = torch.tensor(path_confidences, dtype=top.dtype)[:, None] * top  # [f, width]
        best = int(values[:, 0].argmax())
        best_value, ratio = float(values[best, 0]), float(top[best, 0])
        deeper = [(best_value * ratio ** (d + 1), -1) for d in range(max_depth - depth - 1)]
        here = [(value, slot) for slot, value in enumerate(values.flatten().tolist())]
        # Ties go to this level (slot >= 0 sorts before -1): the best child always ranks first.
        ranked = sorted(here + deeper, reverse=True)[:left]
        for _, slot in [bid for bid in ranked if bid[1] >= 0][: self.branch]:
            counts[slot // width] += 1
        return counts
