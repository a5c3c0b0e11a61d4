"""The PyTorch runner: any `transformers` causal LM, run eagerly with a `DynamicCache` (CPU or GPU).

Wherever the model runs, a runner takes token ids and returns logits on the CPU: the speculation layer
(drafters, trees, verification, sampling with its CPU generators) never sees a device. On a GPU that
costs one copy of the rows asked for per forward (num_logits x V floats), which the forward's own
synchronization would pay for anyway.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from swarmspec.runners.base import ModelRunner
from swarmspec.tree import position_ids


class HFRunner(ModelRunner):
    """A `transformers` causal LM run eagerly, exactly as loaded, with a `DynamicCache`."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.device = model.device
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
        tree_inputs = {}
        last_position = cached_len + k - 1
        if tree_mask is not None:
            # Cache slots, counted here, hold every node; positions only go as deep as the tree.
            root_position = cached_len + k - tree_mask.shape[1]
            allowed = torch.cat([torch.ones(k, root_position, dtype=torch.bool), tree_mask], dim=1)
            positions = position_ids(tree_mask, root_position)
            last_position = int(positions.max())
            tree_inputs = {
                "attention_mask": additive_mask(allowed, self.model)[None, None],
                "position_ids": positions[None].to(self.device),
            }
        if last_position >= self.max_length:
            raise ValueError(f"sequence would exceed the model's {self.max_length} positions")
        out = self.model(
            input_ids=input_ids.unsqueeze(0).to(self.device),
            cache=self.cache,
            use_cache=True,
            # The LM head is the largest matmul for one row; skip it for rows nobody reads (prefill).
            logits_to_keep=num_logits,
            **tree_inputs,
        )
        return out.logits[0].float().cpu()

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


def additive_mask(allowed: torch.Tensor, model: PreTrainedModel) -> torch.Tensor:
    """A boolean "row i sees column j" mask as the additive float mask `model` takes, on its device:
    0 where allowed, the dtype's minimum elsewhere."""
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=model.device)
    return mask.masked_fill_(~allowed.to(model.device), torch.finfo(dtype).min)
