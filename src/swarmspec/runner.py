"""Model runners: one interface over a causal LM and its KV cache.

The decode loop and the drafters only ever talk to a `ModelRunner`: feed k new tokens and get their
logits, or drop cached tokens past an accepted prefix. Model code knows nothing about speculation.

Shape letters: k = new tokens, n = logits rows asked for, V = vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache, PreTrainedModel

from swarmspec.tree import position_ids


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


class HFRunner(ModelRunner):
    """A `transformers` causal LM run eagerly, exactly as loaded, with a `DynamicCache`."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.max_length = model.config.max_position_embeddings
        self.cache = DynamicCache(config=model.config)

    @property
    def cached_len(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, num_logits: int, tree_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        cached_len, k = self.cached_len, input_ids.shape[0]
        if cached_len + k > self.max_length:
            raise ValueError(f"sequence would exceed the model's {self.max_length} positions")
        tree_inputs = {}
        if tree_mask is not None:
            root_position = cached_len + k - tree_mask.shape[1]
            allowed = torch.cat([torch.ones(k, root_position, dtype=torch.bool), tree_mask], dim=1)
            dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            positions = position_ids(tree_mask, root_position)
            tree_inputs = {"attention_mask": mask[None, None], "position_ids": positions[None]}
        out = self.model(
            input_ids=input_ids.unsqueeze(0),
            past_key_values=self.cache,
            use_cache=True,
            # The LM head is the largest matmul for one row; skip it for rows nobody reads (prefill).
            logits_to_keep=num_logits,
            **tree_inputs,
        )
        return out.logits[0].float()

    @torch.inference_mode()  # the cache holds inference tensors
    def compact(self, keep_len: int, keep_positions: list[int]) -> None:
        # Move the kept entries down into the slots right after the prefix, then drop the tail.
        end = keep_len + len(keep_positions)
        if keep_positions != list(range(keep_len, end)):  # a chain's accepted prefix is already in place
            self._move_entries(keep_len, end, keep_positions)
        self.rollback(end)

    def _move_entries(self, keep_len: int, end: int, keep_positions: list[int]) -> None:
        for layer in self.cache.layers:
            layer.keys[..., keep_len:end, :] = layer.keys[..., keep_positions, :]
            layer.values[..., keep_len:end, :] = layer.values[..., keep_positions, :]

    def rollback(self, keep_len: int) -> None:
        drop = self.cached_len - keep_len
        if drop < 0:
            raise ValueError(f"cannot roll back to {keep_len} tokens: only {self.cached_len} are cached")
        self.cache.crop(-drop)  # transformers 5: a negative count removes that many tokens

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
