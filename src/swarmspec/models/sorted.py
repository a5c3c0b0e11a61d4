"""A sorted draft (S2D): one decoder's first layers as nested sub-models, each ending in an exit.

Exit j runs the first `depths[j]` layers, then a small part of its own (a low-rank adapter on the
hidden state, h + up(down(h)), and an RMS norm) and the model's shared LM head. The norms start as
copies of the model's final norm and the adapters at zero, so an untrained exit is the truncated model
and the deepest one the model itself. Only these parts are trained (`swarmspec train-sorted`); the
shared layers and head never change.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from swarmspec.errors import InvalidRequestError, SwarmspecError
from swarmspec.models.registry import cache_root, checkpoint_checksum


class SortedExits(torch.nn.Module):
    """The exits' own parameters, per exit depth: an adapter of rank `rank` (0: none) and a norm."""

    def __init__(self, model: PreTrainedModel, depths: Sequence[int], rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        layers = decoder_layers(model)
        if not depths or depths[-1] > len(layers):
            name = model.config.name_or_path or "the model"
            raise InvalidRequestError(f"{name} has {len(layers)} layers: exits {list(depths)} do not fit")
        if rank < 0:
            raise InvalidRequestError(f"the exits' adapter rank must be >= 0, got {rank}")
        self.depths = tuple(depths)
        self.rank = rank
        # An exit after every layer is the draft model itself: never trained, always the full head.
        self.shallow = sum(1 for depth in depths if depth < len(layers))
        self.norms = torch.nn.ModuleList(copy.deepcopy(model.model.norm) for _ in depths)
        hidden = model.config.hidden_size
        adapters = depths if rank else ()
        with torch.random.fork_rng():  # the adapters' initial weights depend on `seed` alone
            torch.manual_seed(seed)
            self.downs = torch.nn.ModuleList(torch.nn.Linear(hidden, rank, bias=False) for _ in adapters)
        self.ups = torch.nn.ModuleList(torch.nn.Linear(rank, hidden, bias=False) for _ in adapters)
        for up in self.ups:
            torch.nn.init.zeros_(up.weight)
        self.requires_grad_(False)  # trained explicitly; drafting never needs gradients
        self.trained_on: dict[str, Any] = {}  # what `swarmspec train-sorted` distilled them from
        # Token ids the targets said in training, most frequent first: a draft head may keep a prefix.
        self.head_order = torch.empty(0, dtype=torch.int64)
        self.head_rows: torch.Tensor | None = None  # the draft head's tokens (None: the full head)
        self.head_weight: torch.Tensor | None = None  # [K, H]: the LM head's rows of those tokens

    def logits(self, model: PreTrainedModel, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states after `depths[exit_index]` layers -> [..., V] float32 logits."""
        return model.lm_head(self._normed(exit_index, hidden)).float()

    def draft_logits(self, model: PreTrainedModel, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """[H] -> [V] logits for drafting: a shallow exit's through the draft head if one is set
        (`restrict_head`; the other tokens get -inf: never drafted, probability 0), else the full LM head."""
        if self.head_rows is None or self.head_weight is None or exit_index >= self.shallow:
            return self.logits(model, exit_index, hidden)
        logits = torch.full((model.lm_head.weight.shape[0],), float("-inf"))
        logits[self.head_rows] = (self.head_weight @ self._normed(exit_index, hidden)).float()
        return logits

    def restrict_head(self, model: PreTrainedModel, tokens: int) -> None:
        """Shallow exits draft over the `tokens` tokens the targets said most often in training (0: the
        full head). The LM head is a shallow exit's widest matmul; the target still verifies every token."""
        if tokens == 0:
            self.head_rows = self.head_weight = None
            return
        if len(self.head_order) < tokens:
            raise InvalidRequestError(
                f"a draft head of {tokens} tokens needs exits trained by `swarmspec train-sorted` on answers "
                f"with that many distinct tokens; these know {len(self.head_order)}"
            )
        self.head_rows = self.head_order[:tokens]
        self.head_weight = model.lm_head.weight.detach()[self.head_rows].clone()

    def trainable(self) -> list[torch.nn.Parameter]:
        """The shallow exits' own parameters (an exit after every layer stays the model itself)."""
        parts = [self.norms[: self.shallow], self.downs[: self.shallow], self.ups[: self.shallow]]
        return [parameter for part in parts for parameter in part.parameters()]

    def _normed(self, exit_index: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.rank:
            hidden = hidden + self.ups[exit_index](self.downs[exit_index](hidden))
        return self.norms[exit_index](hidden)

    def save(self, path: Path, trained_on: dict[str, Any]) -> None:
        state = {"depths": self.depths, "rank": self.rank, "state": self.state_dict()}
        save_atomically({**state, "trained_on": trained_on, "head_order": self.head_order}, path)

    @classmethod
    def load(cls, model: PreTrainedModel, path: Path) -> SortedExits:
        saved = read_exits_file(path)
        try:
            exits = cls(model, saved["depths"], saved["rank"])
            exits.load_state_dict(saved["state"])
            exits.trained_on, exits.head_order = saved["trained_on"], saved["head_order"]
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
            raise unreadable_exits(path, err) from None
        return exits

    def subset(self, model: PreTrainedModel, depths: Sequence[int]) -> SortedExits:
        """These exits at some of their depths (trained parameters and tuned thresholds kept)."""
        chosen = SortedExits(model, depths, self.rank)
        for new, depth in enumerate(depths):
            old = self.depths.index(depth)
            for parts in ("norms", "downs", "ups"):
                ours, theirs = getattr(chosen, parts), getattr(self, parts)
                if len(theirs):
                    ours[new].load_state_dict(theirs[old].state_dict())
        chosen.trained_on, chosen.head_order = self.trained_on, self.head_order
        return chosen

    def tuned_thresholds(self, target: str) -> tuple[float, ...] | None:
        """The thresholds `swarmspec train-sorted --tune-thresholds` chose for a target model (its name,
        without a backend prefix) at every exit but the deepest, if it tuned them all."""
        table = self.trained_on.get("thresholds", {}).get(target, {})
        if any(str(depth) not in table for depth in self.depths[:-1]):
            return None
        return tuple(table[str(depth)] for depth in self.depths[:-1])


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """torch.save, never leaving a half-written file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def exits_dir(checkpoint: str) -> Path:
    """Where `swarmspec train-sorted` stores a checkpoint's trained exits: keyed by its checksum (the
    source GGUF's, for a registered or converted model; else its path's)."""
    checksum = checkpoint_checksum(Path(checkpoint)) or hashlib.sha256(checkpoint.encode()).hexdigest()
    return cache_root() / "sorted" / f"{Path(checkpoint).name or 'model'}-{checksum[:12]}"


def trained_exits_path(model: PreTrainedModel, depths: Sequence[int], rank: int) -> Path:
    """Where `swarmspec train-sorted` stores a model's exits trained at these depths with adapters of
    this rank."""
    return exits_dir(str(model.config.name_or_path)) / f"exits-{'-'.join(map(str, depths))}-rank{rank}.pt"


def stored_exits(checkpoint: str, depths: Sequence[int]) -> list[tuple[Path, int]]:
    """The stored trained exits of a checkpoint that include all these depths, with their adapters' rank,
    highest rank first (adapters draft better; llama.cpp runs rank 0 only)."""
    found = []
    for path in sorted(exits_dir(checkpoint).glob("exits-*.pt")):
        parts = path.stem.removeprefix("exits-").split("-")
        stored = {int(part) for part in parts if part.isdigit()}
        ranks = [int(part[4:]) for part in parts if part.startswith("rank") and part[4:].isdigit()]
        if set(depths) <= stored:
            # Files written before the rank was part of the name hold it inside.
            rank = ranks[-1] if ranks else int(read_exits_file(path)["rank"])
            found.append((path, rank))
    return sorted(found, key=lambda item: -item[1])


def read_exits_file(path: Path) -> dict[str, Any]:
    """What `SortedExits.save` stored, or a clear error for a file that is not that."""
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not {"depths", "rank", "state"} <= saved.keys():
            raise ValueError("it lacks the exits' depths, rank or weights")
    except (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise unreadable_exits(path, err) from None
    return saved


def unreadable_exits(path: Path, err: BaseException) -> SwarmspecError:
    reason = (str(err).splitlines() or [type(err).__name__])[0]  # torch's unpickling errors run on
    return SwarmspecError(f"cannot load trained sorted exits from {path}: {reason}; delete it and retrain")


def sorted_exits(model: PreTrainedModel, depths: Sequence[int]) -> SortedExits:
    """The model's exits at these depths, trained if `swarmspec train-sorted` stored exits at all of them
    (alone or among others: trained at 6, 12, 18 and 24 layers gives a trained exit 12 alone; with
    adapters of the highest rank trained), else untrained."""
    found = stored_exits(str(model.config.name_or_path), depths)
    return SortedExits.load(model, found[0][0]).subset(model, depths) if found else SortedExits(model, depths)


def trained_exit_norm(checkpoint: str, depth: int) -> torch.Tensor | None:
    """The norm weight of the checkpoint's exit after `depth` layers, if exits without adapters (rank
    0) were trained there: an exit that llama.cpp's graph holds (models.gguf_exit)."""
    norms_only = [path for path, rank in stored_exits(checkpoint, (depth,)) if rank == 0]
    if not norms_only:
        return None
    saved = read_exits_file(norms_only[0])
    return saved["state"][f"norms.{list(saved['depths']).index(depth)}.weight"]


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
