"""The model runner interface: one causal LM and its KV cache, whatever runs it.

The decode loop and the drafters only ever talk to a `ModelRunner`: feed k new tokens and get their
logits, or drop cached tokens past an accepted prefix. Model code knows nothing about speculation.

Shape letters: k = new tokens, n = logits rows asked for, V = vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ModelRunner(ABC):
    """A causal LM with its KV cache for one sequence."""

    vocab_size: int
    max_length: int  # the longest sequence (prompt + output) the model supports

    @property
    @abstractmethod
    def cached_len(self) -> int:
        """Tokens whose keys and values are in the cache."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [k] tokens that follow the cached ones
        num_logits: int,
        tree_mask: torch.Tensor | None = None,  # [k, m] bool, m >= k: see below
    ) -> torch.Tensor:  # [n=num_logits, V] float32 logits of the last num_logits input positions
        """Run the k tokens on top of the cache and append them to it.

        Without a tree mask the tokens form a chain. With one, they are nodes of a token tree (see
        `tree.TokenTree`) whose first m - k nodes, starting with the root, are the last cached tokens:
        [i, j] says whether new token i sees tree node j (itself and its ancestors). Everything cached
        before the root is seen by all; a node's position is the root's plus its depth.
        """

    @abstractmethod
    def compact(self, keep_len: int, keep_positions: list[int]) -> None:
        """Keep the first `keep_len` cached tokens and then those at `keep_positions` (ascending, all
        >= keep_len), in that order; drop the rest. After a tree forward: keep the accepted path."""

    @abstractmethod
    def rollback(self, keep_len: int) -> None:
        """Keep only the first `keep_len` cached tokens (drop a rejected suffix)."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache, for a new sequence."""

    def end(self) -> None:  # noqa: B027 - a runner of its own has nothing to hand back
        """The sequence is finished or abandoned (a batched runner stops waiting for its forwards)."""
