"""Continuous batching on PyTorch: many sequences' target forwards run as one batched forward.

A `BatchedTarget` holds one `transformers` model and one batched KV cache; each running sequence owns a
`BatchSlot`, a `ModelRunner` like any other, so the decode loop does not know it is batched. A slot's
`forward` posts its rows and blocks; when every running sequence has posted (a step boundary), the
last to arrive runs them all in one forward and hands each its logits. New sequences join at such a
boundary (their prompt is prefilled alone, then their cache becomes a row of the batch; a long prompt
is prefilled a part per step, so that the running sequences go on meanwhile: chunked prefill), finished
ones leave (`end`), so the batch changes every step: continuous batching. A sequence that does not post
within `wait_s` (its drafter is slow) is not waited for: the others run without it, and it joins the
next step.

The cache. Row b of the batched cache holds sequence b's keys and values in slots 0..L-1 (L: the
physical length, the same for all rows). A sequence's cached tokens are the slots listed in its `slots`
(ascending, position i in slot slots[i]); every step appends R new slots to every row (R: the most
rows a sequence posted; shorter posts and absent sequences are padded with rows nobody reads), and
rollback and tree pruning only edit `slots`: no key or value moves. The attention mask lets a row see
exactly its sequence's slots plus its own tree, at positions counted in its own sequence. When
rejected drafts and padding have made L more than twice the longest sequence, the rows are compacted.

Exactness: each sequence's rows see exactly what they would see alone, at the same positions, but in a
batched matmul, which rounds differently from a single sequence's in the last bits (as the k-row
verification forward already does on PyTorch: docs/cpu-fast-path.md); greedy outputs are compared with
single-request decoding in the tests.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from swarmspec.errors import SwarmspecError
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.hf import additive_mask
from swarmspec.tree import position_ids

# A sequence that has not posted its rows this long after the first one did is not waited for.
WAIT_S = 1.0
# Compact the cache when its physical length exceeds twice the longest sequence plus this many slots.
COMPACT_SLACK = 64
# Prompt tokens a joining sequence prefills per step on PyTorch (chunked prefill).
PREFILL_CHUNK = 256


@dataclass
class Forward:
    """One sequence's forward for the next step, and its outcome."""

    input_ids: torch.Tensor  # [k]
    num_logits: int
    tree_mask: torch.Tensor | None  # [k, k] or None (a chain)
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class BatchedTarget(ABC):
    """The step barrier every backend shares: sequences post their forwards, the last to arrive runs
    them all (`run`), and sequences join and leave between steps. Backends hold the model and the
    batched cache (`_join`, `_step`, `_drop`, `_keep`, `cached_len`), always under the lock."""

    def __init__(self, vocab_size: int, max_length: int, wait_s: float = WAIT_S) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.wait_s = wait_s
        self.rows: list[BatchSlot] = []  # the sequences in the batch, in cache row order
        self.posts: dict[BatchSlot, Forward] = {}
        self.steps = 0  # batched forwards run so far
        # Batch size -> {k rows per sequence -> ms} measured on this batch (`profile.batch_forward_costs`).
        self.measured_ms: dict[int, dict[int, float]] = {}
        self._steps_run = 0  # steps led by `_forward` (whatever they ran), for the waiting posts
        self._lock = threading.Condition()

    def slot(self) -> BatchSlot:
        return BatchSlot(self)

    @property
    def size(self) -> int:
        """Sequences decoding now (cached or joining)."""
        with self._lock:
            return len(self.rows) + sum(1 for slot in self.posts if slot not in self.rows)

    def _forward(self, slot: BatchSlot, post: Forward) -> torch.Tensor:
        """Post `slot`'s rows and return their logits once a step has run them."""
        with self._lock:
            self.posts[slot] = post
            deadline, steps_seen = time.monotonic() + self.wait_s, self._steps_run
            while not post.done.is_set():
                if self._steps_run != steps_seen:  # a step ran but this prompt has parts left:
                    deadline, steps_seen = time.monotonic() + self.wait_s, self._steps_run  # wait anew
                waiting = [s for s in self.rows if s not in self.posts]
                if not waiting or time.monotonic() >= deadline:
                    self._run_step()  # the last to arrive (or the first tired of waiting) leads
                    continue
                self._lock.wait(timeout=max(deadline - time.monotonic(), 0.0))
        if post.error is not None:
            raise post.error
        assert post.logits is not None
        return post.logits

    def _run_step(self) -> None:
        """Run every posted forward (under the lock) and wake their threads."""
        posts, self.posts = self.posts, {}
        self._steps_run += 1
        try:
            self.run(posts)
        except Exception as err:  # every waiting sequence fails with it; the batch stays usable
            for post in posts.values():
                post.error = err
        finally:
            for slot, post in posts.items():
                if post.logits is None and post.error is None:  # a prompt partly prefilled
                    self.posts[slot] = post  # goes on in the next step
                else:
                    post.done.set()
            self._lock.notify_all()

    def run(self, posts: dict[BatchSlot, Forward]) -> None:
        """Run the given forwards now (no other thread may use the batch meanwhile): each slot not in
        the batch yet prefills its prompt alone and joins, or prefills a part of it if the backend takes
        long prompts a part per step (its logits stay None: run it again); the others' rows go through
        one forward."""
        for slot, post in posts.items():
            if slot not in self.rows:
                if post.tree_mask is not None:
                    raise ValueError("a sequence's first forward (its prompt) must be a chain")
                post.logits = self._join(slot, post)
                if post.logits is not None:
                    self.rows.append(slot)
        batched = {slot: post for slot, post in posts.items() if slot in self.rows and post.logits is None}
        if batched:
            self._step(batched)
            self.steps += 1

    def _leave(self, slot: BatchSlot) -> None:
        with self._lock:
            self.posts.pop(slot, None)
            if slot in self.rows:
                self._drop(slot)
                self.rows.remove(slot)
            else:  # a prompt partly prefilled when a step failed, or none
                self._abandon_join(slot)
            self._lock.notify_all()  # whoever waited for it to post stops waiting

    def _edit(self, slot: BatchSlot, keep_len: int, keep_positions: list[int]) -> None:
        with self._lock:
            kept, cached = keep_len + len(keep_positions), self.cached_len(slot)
            if kept > cached:
                raise ValueError(f"cannot keep {kept} tokens: only {cached} are cached")
            self._keep(slot, keep_len, keep_positions)

    @abstractmethod
    def cached_len(self, slot: BatchSlot) -> int:
        """The sequence's cached tokens (0 before it joins)."""

    @abstractmethod
    def _join(self, slot: BatchSlot, post: Forward) -> torch.Tensor | None:
        """Prefill a new sequence's prompt alone; its cache becomes the batch's last row. A backend may
        prefill a long prompt a part per call (between other sequences' steps): None until the last."""

    @abstractmethod
    def _step(self, posts: dict[BatchSlot, Forward]) -> None:
        """One forward over the posted rows of sequences in the batch (the others are padded)."""

    @abstractmethod
    def _abandon_join(self, slot: BatchSlot) -> None:
        """Forget the sequence's partly prefilled prompt, if it has one."""

    @abstractmethod
    def _drop(self, slot: BatchSlot) -> None:
        """Remove a sequence's cache from the batch."""

    @abstractmethod
    def _keep(self, slot: BatchSlot, keep_len: int, keep_positions: list[int]) -> None:
        """Keep the sequence's first keep_len cached tokens and then those at keep_positions."""


@dataclass
class _Prefill:
    """A sequence whose prompt is prefilled `prefill_chunk` tokens per step, in a cache of its own."""

    cache: DynamicCache
    prefilled: int = 0  # prompt tokens in its cache
    logits: list[torch.Tensor] = field(default_factory=list)  # the rows asked for, so far


class TorchBatchedTarget(BatchedTarget):
    """One PyTorch causal LM and its batched cache (see the module docstring). A joining prompt is
    prefilled `prefill_chunk` tokens per step, in a forward of its own between the batch's steps."""

    def __init__(
        self, model: PreTrainedModel, wait_s: float = WAIT_S, prefill_chunk: int = PREFILL_CHUNK
    ) -> None:
        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers):
            raise SwarmspecError("continuous batching does not support sliding-window attention layers")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        super().__init__(model.config.vocab_size, model.config.max_position_embeddings, wait_s)
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self.cache: DynamicCache | None = None  # row b: self.rows[b]'s keys and values
        self.slots: dict[BatchSlot, list[int]] = {}  # position i of a sequence: slot slots[i] of its row
        self.joining: dict[BatchSlot, _Prefill] = {}  # sequences whose prompt is partly prefilled

    @property
    def physical_len(self) -> int:
        """Slots per row of the batched cache (cached tokens, rejected drafts and padding)."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    def cached_len(self, slot: BatchSlot) -> int:
        return len(self.slots.get(slot, ()))

    @torch.inference_mode()
    def run(self, posts: dict[BatchSlot, Forward]) -> None:
        super().run(posts)
        self._compact_if_sparse()

    def _join(self, slot: BatchSlot, post: Forward) -> torch.Tensor | None:
        """Prefill the next `prefill_chunk` prompt tokens into the sequence's own cache; after the last,
        that cache becomes the batch's last row."""
        joining = self.joining.get(slot)
        if joining is None:  # the prompt's first part
            joining = self.joining[slot] = _Prefill(DynamicCache(config=self.model.config))
        length = post.input_ids.shape[0]
        start, end = joining.prefilled, min(joining.prefilled + self.prefill_chunk, length)
        wanted = end - max(length - post.num_logits, start)  # rows of this part whose logits are asked
        try:
            out = self.model(
                input_ids=post.input_ids[None, start:end].to(self.model.device),
                cache=joining.cache,
                use_cache=True,
                logits_to_keep=max(wanted, 1),  # 0 would keep them all
            )
        except Exception:
            self._abandon_join(slot)
            raise
        if wanted > 0:
            joining.logits.append(out.logits[0, -wanted:].float().cpu())
        joining.prefilled = end
        if end < length:
            return None
        del self.joining[slot]
        prefill = joining.cache
        if self.cache is None:
            self.cache = prefill
        else:
            grown = max(length, self.physical_len)
            for batch_layer, new_layer in zip(self.cache.layers, prefill.layers, strict=True):
                for name in ("keys", "values"):
                    old, new = getattr(batch_layer, name), getattr(new_layer, name)
                    setattr(batch_layer, name, torch.cat([_pad_slots(old, grown), _pad_slots(new, grown)]))
        self.slots[slot] = list(range(length))
        return torch.cat(joining.logits)

    def _step(self, posts: dict[BatchSlot, Forward]) -> None:
        assert self.cache is not None
        physical = self.physical_len
        rows = max(post.input_ids.shape[0] for post in posts.values())
        batch = len(self.rows)
        input_ids = torch.zeros(batch, rows, dtype=torch.int64)
        positions = torch.zeros(batch, rows, dtype=torch.int64)
        allowed = torch.zeros(batch, rows, physical + rows, dtype=torch.bool)
        # A padding row sees itself only (a row that sees nothing would turn softmax into NaN).
        allowed[:, range(rows), [physical + r for r in range(rows)]] = True
        for b, slot in enumerate(self.rows):
            post = posts.get(slot)
            if post is None:
                continue
            k = post.input_ids.shape[0]
            own = (
                torch.ones(k, k, dtype=torch.bool).tril()
                if post.tree_mask is None
                else post.tree_mask.to(torch.bool)
            )
            input_ids[b, :k] = post.input_ids
            positions[b, :k] = position_ids(own, len(self.slots[slot]))
            allowed[b, :k, self.slots[slot]] = True
            allowed[b, :k, physical : physical + k] = own
        if int(positions.max()) >= self.max_length:
            raise ValueError(f"sequence would exceed the model's {self.max_length} positions")
        device = self.model.device
        out = self.model(
            input_ids=input_ids.to(device),
            cache=self.cache,
            use_cache=True,
            attention_mask=additive_mask(allowed, self.model)[:, None],
            position_ids=positions.to(device),
        )
        for b, slot in enumerate(self.rows):
            post = posts.get(slot)
            if post is None:
                continue
            k = post.input_ids.shape[0]
            post.logits = out.logits[b, k - post.num_logits : k].float().cpu()
            self.slots[slot].extend(range(physical, physical + k))

    def _compact_if_sparse(self) -> None:
        longest = max((len(self.slots[slot]) for slot in self.rows), default=0)
        if self.cache is None or self.physical_len <= 2 * longest + COMPACT_SLACK:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], longest, old.shape[3])
                for b, slot in enumerate(self.rows):
                    new[b, :, : len(self.slots[slot])] = old[b, :, self.slots[slot]]
                setattr(layer, name, new)
        for slot in self.rows:
            self.slots[slot] = list(range(len(self.slots[slot])))

    def _abandon_join(self, slot: BatchSlot) -> None:
        self.joining.pop(slot, None)

    def _drop(self, slot: BatchSlot) -> None:
        b = self.rows.index(slot)
        del self.slots[slot]
        assert self.cache is not None
        if len(self.rows) == 1:
            self.cache = None
            return
        keep = torch.tensor([i for i in range(len(self.rows)) if i != b], device=self.model.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)

    def _keep(self, slot: BatchSlot, keep_len: int, keep_positions: list[int]) -> None:
        slots = self.slots[slot]
        self.slots[slot] = slots[:keep_len] + [slots[p] for p in keep_positions]


def _pad_slots(states: torch.Tensor, length: int) -> torch.Tensor:
    """[b, heads, L, d] keys or values padded with zeros to `length` slots."""
    missing = length - states.shape[2]
    if missing == 0:
        return states
    return torch.cat([states, states.new_zeros(*states.shape[:2], missing, states.shape[3])], dim=2)


class BatchSlot(ModelRunner):
    """One sequence of a `BatchedTarget`: a `ModelRunner` whose forwards are batched with the others'.

    It joins the batch with its first forward after `reset` (the prompt) and leaves it at `end` or
    `reset`; an idle slot holds no cache and never delays the others.
    """

    def __init__(self, target: BatchedTarget) -> None:
        self.target = target
        self.vocab_size = target.vocab_size
        self.max_length = target.max_length

    @property
    def cached_len(self) -> int:
        return self.target.cached_len(self)

    def forward(
        self, input_ids: torch.Tensor, num_logits: int, tree_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tree_mask is not None and tree_mask.shape[1] != tree_mask.shape[0]:
            raise ValueError(
                "a batched sequence verifies whole trees, root included: tree_mask must be [k, k]"
            )
        return self.target._forward(self, Forward(input_ids, num_logits, tree_mask))

    def compact(self, keep_len: int, keep_positions: list[int]) -> None:
        self.target._edit(self, keep_len, keep_positions)

    def rollback(self, keep_len: int) -> None:
        self.target._edit(self, keep_len, [])

    def reset(self) -> None:
        self.target._leave(self)

    def end(self) -> None:
        self.target._leave(self)
