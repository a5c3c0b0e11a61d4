"""Token trees: candidate continuations of the committed context, laid out for one target forward.

Node 0 is the root: the newest committed token, which the target has not run yet. Every other node is a
candidate token whose parent comes before it (topological order), so a flat list of nodes is already
the order the target reads them in. A chain of k drafted tokens is the tree with parents [-1, 0, ..., k-1].

The target reads all nodes in one forward: each attends to the cached context and to its own ancestors
(the tree attention mask), at position cached length + depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    tokens: torch.Tensor  # [n] int64; tokens[0] is the root
    parents: tuple[int, ...]  # [n]; parents[0] == -1, parents[i] < i
    # The distribution each node was sampled from, [n, V] (row 0 unused); None for greedy drafting.
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.parents or self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        if len(self.parents) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        if any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise ValueError(f"every parent must precede its child: {self.parents}")

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(cls, root: int, draft: torch.Tensor, draft_probs: torch.Tensor | None = None) -> TokenTree:
        """The root followed by a chain of drafted tokens (the draft's probs, [k, V], if sampled)."""
        tokens = torch.cat([torch.tensor([root], dtype=torch.int64), draft])
        if draft_probs is not None:
            draft_probs = torch.cat([torch.zeros_like(draft_probs[:1]), draft_probs])
        return cls(tokens, tuple(range(-1, len(draft))), draft_probs)

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it: a plain causal forward reads it."""
        return all(p == i - 1 for i, p in enumerate(self.parents))

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
