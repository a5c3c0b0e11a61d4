"""A sorted draft (S2D): one decoder's first layers as nested sub-models, each ending in an exit.

Exit j runs the first `depths[j]` layers, then its own RMS norm and the model's shared LM head. The
norms start as copies of the model's final norm, so the deepest exit (all layers) is the model itself,
and are the exits' trainable part: training them does not touch the shared layers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from swarmspec.errors import InvalidRequestError


class SortedExits(torch.nn.Module):
    """The exits' own parameters: a norm per exit depth (the LM head is the model's, shared)."""

    def __init__(self, model: PreTrainedModel, depths: Sequence[int]) -> None:
        super().__init__()
        layers = decoder_layers(model)
        if not depths or depths[-1] > len(layers):
            name = model.config.name_or_path or "the model"
            raise InvalidRequestError(f"{name} has {len(layers)} layers: exits {list(depths)} do not fit")
        self.depths = tuple(depths)
        self.norms = torch.nn.ModuleList(copy.deepcopy(model.model.norm) for _ in depths)

    def logits(self, model: PreTrainedModel, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states after `depths[exit_index]` layers -> [..., V] float32 logits."""
        return model.lm_head(self.norms[exit_index](hidden)).float()


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder's layers, for a `transformers` causal LM laid out as Llama/Qwen2 are."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "norm") or not hasattr(model, "lm_head"):
        raise InvalidRequestError(
            f"a sorted draft needs a decoder laid out as model.layers / model.norm / lm_head; "
            f"{type(model).__name__} is not"
        )
    if getattr(inner, "has_sliding_layers", False):
        raise InvalidRequestError("a sorted draft does not support sliding-window attention layers")
    return layers
