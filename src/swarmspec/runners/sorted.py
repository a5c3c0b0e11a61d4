"""Runs a sorted draft (models.sorted) exit by exit, computing deeper layers' KV only when needed.

The layers between two exit depths form a segment. A token that exits at segment j has keys and values
in segments 0..j only; its hidden state leaving segment j waits in segment j + 1's *frontier*. When a
later token needs a deeper exit, each segment first runs its frontier (the tokens it has not seen, in
position order) together with the new token, so deeper layers always attend over every earlier token:
the lazily completed cache equals what running every token to full depth would have built.

Invariant: segment s holds `cached[s]` tokens and its frontier the next ones, up to what segment s - 1
has seen (segment 0: every token given). Shape letters: n = tokens, H = hidden size, V = vocabulary.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from swarmspec.models.loading import PackedLinear
from swarmspec.models.sorted import SortedExits, decoder_layers
from swarmspec.runners.hf import additive_mask


def weights_in(module: torch.nn.Module) -> int:
    """A module's weights: its parameters, and the weights and biases of its oneDNN-packed linears (kept
    as plain tensors, not parameters)."""
    packed = sum(
        m.packed_weight.numel() + (0 if m.bias is None else m.bias.numel())
        for m in module.modules()
        if isinstance(m, PackedLinear)
    )
    return packed + sum(p.numel() for p in module.parameters())


class SortedRunner:
    """One sequence's cache over a sorted draft: feed tokens, ask for the logits at any exit."""

    def __init__(self, model: PreTrainedModel, exits: SortedExits) -> None:
        self.model = model.eval()
        self.exits = exits
        self.layers = decoder_layers(model)
        bounds = (0, *exits.depths)
        self.segments = [range(bounds[j], bounds[j + 1]) for j in range(len(exits.depths))]
        self.max_length = model.config.max_position_embeddings
        self.reset()

    def weights_read(self) -> tuple[list[int], list[int]]:
        """Weights one drafted token reads in each segment's layers, and in each exit's head (norm,
        adapter, LM head or draft head). A single-token forward is memory-bound on a CPU, so its time
        follows these counts (the 0.5B: 6 layers 89M against a full head's 136M, 20 against 31 ms)."""
        segments = [sum(weights_in(self.layers[layer]) for layer in s) for s in self.segments]
        head_rows, hidden = self.model.lm_head.weight.shape
        draft_rows = head_rows if self.exits.head_rows is None else len(self.exits.head_rows)
        heads = []
        for j in range(len(self.segments)):
            shallow = j < self.exits.shallow
            adapter = 2 * self.exits.rank * hidden if shallow else 0
            heads.append(hidden + adapter + (draft_rows if shallow else head_rows) * hidden)
        return segments, heads

    @property
    def cached_len(self) -> int:
        """Tokens given so far (run or waiting to be run)."""
        return self.cached[0] + len(self.pending_ids)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.cached = [0] * len(self.segments)
        self.pending_ids: list[int] = []  # segment 0's frontier: tokens not run at all
        hidden = self.model.config.hidden_size
        self.frontiers = [torch.empty(0, hidden) for _ in self.segments]  # [0] unused: see pending_ids

    def extend(self, token_ids: list[int]) -> None:
        """Append tokens; nothing runs until an exit's logits are asked for."""
        if self.cached_len + len(token_ids) > self.max_length:
            raise ValueError(f"sequence would exceed the model's {self.max_length} positions")
        self.pending_ids.extend(token_ids)

    @torch.inference_mode()
    def exit_logits(self, exit_index: int) -> torch.Tensor:  # [V] float32, after the last token
        """Run every segment up to `exit_index` over what it has not seen; the exit's logits."""
        if self.cached[exit_index] == self.cached_len:
            raise ValueError("the last token has already been run to this exit: extend first")
        ids = torch.tensor(self.pending_ids, dtype=torch.int64)
        hidden = self.model.model.embed_tokens(ids)  # [n, H]: segment 0's unseen tokens
        self.pending_ids = []
        for s in range(exit_index + 1):
            if s > 0:  # segment s has not seen its frontier (earlier positions) nor what s - 1 just ran
                hidden = torch.cat([self.frontiers[s], hidden])
            if hidden.shape[0]:
                hidden = self._run_segment(s, hidden)
        if exit_index + 1 < len(self.segments):  # the deeper segments have not seen these tokens yet
            self.frontiers[exit_index + 1] = torch.cat([self.frontiers[exit_index + 1], hidden])
        return self.exits.draft_logits(self.model, exit_index, hidden[-1])

    def _run_segment(self, s: int, hidden: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        start, n = self.cached[s], hidden.shape[0]
        positions = torch.arange(start, start + n)[None]
        # Token i (at start + i) sees every cached token and the new ones up to itself.
        allowed = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        mask = additive_mask(allowed, self.model)
        states = hidden[None]
        rotary = self.model.model.rotary_emb(states, positions)
        for layer in self.segments[s]:
            states = self.layers[layer](
                states,
                attention_mask=mask[None, None],
                position_embeddings=rotary,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        self.cached[s] += n
        self.frontiers[s] = self.frontiers[s][:0]
        return states[0]

    def rollback(self, keep_len: int) -> None:
        """Keep the first `keep_len` tokens given; drop the rest from every segment and frontier."""
        if keep_len > self.cached_len:
            raise ValueError(f"cannot roll back to {keep_len} tokens: only {self.cached_len} are given")
        del self.pending_ids[max(0, keep_len - self.cached[0]) :]
        for s, layers in enumerate(self.segments):
            drop = self.cached[s] - keep_len
            if drop > 0:
                for layer in layers:
                    self.cache.layers[layer].crop(-drop)
                self.cached[s] = keep_len
            self.frontiers[s] = self.frontiers[s][: max(0, keep_len - self.cached[s])]
