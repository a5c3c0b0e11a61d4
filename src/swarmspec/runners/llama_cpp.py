"""The llama.cpp runner: a native GGUF file (quantized weights as stored) through `llama-cpp-python`'s
low-level API: batches through `llama_decode`, rollback and tree pruning through the memory functions.
`LlamaCppBatchedTarget` batches many sequences' chains and trees (continuous batching, `runners.batch`).

Trees. Attention without flash attention sums over cache cells in cell order, so a logits row is
bit-identical to plain decoding only when every token it attends to sits in the cell at its position.
- A tree the target verifies (its root fed in the same forward) is decoded branch by branch in
  depth-first order: a stretch of a branch continues the cells of its ancestors, and moving to the next
  branch removes the cells below the branching point. Each node is computed once, in its cells.
- A tree grown level by level on top of cached nodes (draft models) is one `llama_decode` per level with
  sequence ids (the rule in llama.cpp's `set_input_kq_mask`, src/llama-kv-cache.cpp: a token attends to
  the cells carrying its *first* sequence id at positions <= its own). A node continues its parent's
  sequence if it is the first child, else opens one that receives (`llama_memory_seq_cp`, bookkeeping
  only in a unified cache) the cells of its deepest cached ancestor's sequence up to that position;
  ancestors in the same batch carry the new id too. Siblings then sit in cells away from their
  positions and may round differently, which only a drafter (never deciding the output) tolerates.
- After verification the accepted path is kept in place only as far as it lies in the cells at its
  positions; the rest of it is dropped from the cache and fed again at the front of the next forward.

Exactness (greedy output equal to llama.cpp's own one-token-at-a-time decoding of the same GGUF), measured
on this CPU (docs/llama-cpp.md): a logits row must come out of the same kernels as a single decoded
token, whatever else is in the batch and however long the context.
- llama.cpp repacks Q4_K weights at load (its default, kept here) and then multiplies blocks of 4 rows
  with a GEMM and the rest row by row with a GEMV; the two round differently (logits differ by ~0.4).
  Rows of 1 to 3 tokens all take the GEMV, bit-identical to a single token. So every forward after the
  prompt is split into `llama_decode` calls of at most `EXACT_ROWS` tokens. Prompts are processed as
  llama.cpp processes them (`n_batch` tokens per call), so the prompt's cache equals plain decoding's.
- Flash attention is off (llama-cpp-python's default): for one token over 512 or more cache cells its
  CPU kernel splits the keys across threads and merges partial softmaxes, which rounds differently
  from the per-row kernel of a batch.
- Without flash attention, attention is two f16 matmuls; llamafile's sgemm (a build option) takes some
  batch sizes and not others. llama-cpp-python is built with GGML_LLAMAFILE=OFF (the Makefile does it;
  it measured no slower here) and a build with it is refused (`check_build`).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from swarmspec.errors import ModelIntegrityError, ModelNotFoundError, SwarmspecError
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.batch import BatchedTarget, BatchSlot, Forward
from swarmspec.tree import position_ids

# The largest batch whose every row goes through the same kernels as a single token (see above).
EXACT_ROWS = 3
# Tokens per llama_decode when processing a prompt: llama-cpp-python's default `n_batch`.
PROMPT_BATCH = 512
# Sequences a tree may use at once (one per leaf).
MAX_SEQUENCES = 64
# Cache cells beyond the longest sequence, for the speculative nodes of a tree near the end of it.
TREE_CELLS = 256
GGUF_MAGIC = b"GGUF"
# Weight repacking at load (llama.cpp's default) and flash attention (off): see the module docstring.
REPACK = True
FLASH_ATTN = 0  # a llama_flash_attn_type: 0 disabled, 1 enabled

# llama.cpp logs every load to stderr; its last lines are kept for error messages instead.
_recent_log: collections.deque[str] = collections.deque(maxlen=20)
_log_callback = None  # the ctypes callback, referenced here so that it is never freed


def _llama_cpp():
    global _log_callback
    try:
        import llama_cpp
    except ImportError as err:
        raise SwarmspecError(
            "the llama.cpp backend needs llama-cpp-python; install swarmspec with `pip install -e .` "
            f"(it builds llama-cpp-python from source): {err}"
        ) from None
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            _recent_log.append(text.decode("utf-8", errors="replace"))

        _log_callback = record
        llama_cpp.llama_log_set(record, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def check_gguf_file(path: Path) -> None:
    """A clear error for a missing file or one that is not GGUF, before llama.cpp reads it."""
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelIntegrityError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def check_build(llama_cpp) -> None:
    """Refuse a llama.cpp built with llamafile's sgemm: its attention matmuls are not batch-invariant."""
    if "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode():
        raise SwarmspecError(
            "this llama-cpp-python was built with GGML_LLAMAFILE, which makes batched verification round "
            'differently from plain decoding; rebuild it with `CMAKE_ARGS="-DGGML_LLAMAFILE=OFF" pip install '
            "--no-cache-dir --force-reinstall llama-cpp-python` (the Makefile does this)"
        )


class LlamaCppModel:
    """GGUF weights loaded once by llama.cpp; every runner over it is a context with its own cache."""

    def __init__(self, path: Path) -> None:
        check_gguf_file(path)
        llama_cpp = _llama_cpp()
        check_build(llama_cpp)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = REPACK
        _recent_log.clear()
        self.handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.handle:
            lines = "".join(_recent_log).strip().splitlines()
            detail = [line for line in lines if "error" in line] or lines or ["no detail"]
            raise ModelIntegrityError(
                f"llama.cpp could not load {path} (truncated or corrupt GGUF?): {detail[0]}"
            )
        self.path = path
        vocab = llama_cpp.llama_model_get_vocab(self.handle)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.context_train = int(llama_cpp.llama_model_n_ctx_train(self.handle))
        self._free = llama_cpp.llama_model_free

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self._free(self.handle)
            self.handle = None

    def new_runner(self, context: int = 4096, threads: int | None = None) -> LlamaCppRunner:
        return LlamaCppRunner(self, context, threads)


def _new_context(model: LlamaCppModel, cells: int, sequences: int, unified: bool, threads: int):
    """A llama.cpp context over the model: `cells` cache cells for `sequences` sequence ids, in one
    cache (`unified`) or a stream per sequence; flash attention off (see the module docstring)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = cells
    params.n_batch = PROMPT_BATCH
    params.n_ubatch = PROMPT_BATCH
    params.n_seq_max = sequences
    params.kv_unified = unified
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    params.flash_attn_type = FLASH_ATTN
    ctx = llama_cpp.llama_init_from_model(model.handle, params)
    if not ctx:
        raise SwarmspecError(f"llama.cpp could not create a context: {''.join(_recent_log).strip()}")
    return ctx


@dataclass
class _Node:
    """A tree node in the cache (or in the batch being built)."""

    token: int
    position: int
    seq: int  # the sequence it was created in: its first sequence id
    claimed: bool = False  # a child already continues `seq`
    batch_index: int | None = None  # set while it is in the batch being built


class LlamaCppRunner(ModelRunner):
    """One llama.cpp context (KV cache) over a `LlamaCppModel`, for one sequence at a time.

    Cache slots, as the `ModelRunner` interface counts them: first the committed tokens (sequence 0,
    positions 0..n-1), then the nodes of the last tree forward in the order they were fed.
    """

    def __init__(self, model: LlamaCppModel, context: int = 4096, threads: int | None = None) -> None:
        llama_cpp = _llama_cpp()
        self._api = llama_cpp
        self.model = model
        self.vocab_size = model.vocab_size
        self.max_length = min(context, model.context_train)
        threads = threads or os.cpu_count() or 1
        self.cells = self.max_length + TREE_CELLS
        # One cache shared by the tree's sequences (unified).
        self.ctx = _new_context(model, self.cells, MAX_SEQUENCES, unified=True, threads=threads)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(PROMPT_BATCH, 0, MAX_SEQUENCES)
        self.threads = threads
        self.committed: list[int] = []  # tokens of sequence 0, positions 0..n-1
        self.in_cache = 0  # committed[:in_cache] are in the cache, in cells 0..in_cache-1; the rest pending
        self.tree: list[_Node] = []  # the last tree forward's nodes, slots len(committed)...
        self.tree_cells: list[int] = []  # the tree nodes (indices) in the cells after the committed ones

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self._api.llama_batch_free(self.batch)
            self._api.llama_free(self.ctx)
            self.ctx = None

    @property
    def cached_len(self) -> int:
        return len(self.committed) + len(self.tree)

    def forward(
        self, input_ids: torch.Tensor, num_logits: int, tree_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens = input_ids.tolist()
        k = len(tokens)
        if tree_mask is None:
            if self.tree:
                raise ValueError("a chain forward cannot follow a tree forward before compact()")
            if len(self.committed) + k > self.max_length:
                raise ValueError(f"sequence would exceed the context of {self.max_length} positions")
            start = len(self.committed)
            self.committed.extend(tokens)
            entries = self._pending_entries(set())
            logits = self._decode(entries, num_logits, prompt=start == 0)
            self.in_cache = len(self.committed)
            return logits
        return self._tree_forward(tokens, num_logits, tree_mask)

    def _verify_tree(self, tokens: list[int], num_logits: int, tree_mask: torch.Tensor) -> torch.Tensor:
        """A tree whose root is fed now (the target verifying it): decoded branch by branch in depth-first
        order, each stretch of a branch continuing the cells of its ancestors, so every node is computed
        in the cells at its positions, exactly as plain decoding computes it; each node once."""
        k = len(tokens)
        root_position = len(self.committed)
        positions = position_ids(tree_mask, root_position).tolist()
        if max(positions) >= self.max_length:
            raise ValueError(f"sequence would exceed the context of {self.max_length} positions")
        segments, cells = branch_segments(mask_parents(tree_mask))
        rows: dict[int, np.ndarray] = {}
        for continued, segment in segments:
            if continued:  # back to the branching point
                self._api.llama_memory_seq_rm(self.memory, 0, root_position + continued, -1)
            entries = self._pending_entries(set())
            entries += [(tokens[n], positions[n], [0]) for n in segment]
            logits = self._decode(entries, len(segment), prompt=False).numpy()
            rows.update(zip(segment, logits, strict=True))
            self.in_cache = len(self.committed)
        self.tree = [_Node(token, position, 0) for token, position in zip(tokens, positions, strict=True)]
        self.tree_cells = cells
        return torch.from_numpy(np.stack([rows[n] for n in range(k - num_logits, k)]))

    def _tree_forward(self, tokens: list[int], num_logits: int, tree_mask: torch.Tensor) -> torch.Tensor:
        """A tree on top of cached tree nodes (a draft model growing it level by level): one batch
        with sequence ids. Siblings sit in cells away from their positions, so their logits may round
        differently from plain decoding; only drafters, which never decide the output, use this."""
        k, m = tree_mask.shape
        if m == k and not self.tree:
            return self._verify_tree(tokens, num_logits, tree_mask)
        cached_nodes = m - k
        first_slot = self.cached_len - cached_nodes
        if first_slot < 0 or (cached_nodes == 0 and self.tree):
            raise ValueError("the tree's cached nodes must be the last cached tokens")
        # Tree node j -> its _Node (committed tokens count as nodes of sequence 0).
        nodes: list[_Node] = []
        for j in range(cached_nodes):
            slot = first_slot + j
            if slot < len(self.committed):
                pending = slot >= self.in_cache
                last = slot == len(self.committed) - 1
                nodes.append(_Node(self.committed[slot], slot, 0, not last, -1 if pending else None))
            else:
                nodes.append(self.tree[slot - len(self.committed)])
        root_position = nodes[0].position if nodes else len(self.committed)
        positions = position_ids(tree_mask, root_position).tolist()
        if max(positions) >= self.max_length:
            raise ValueError(f"sequence would exceed the context of {self.max_length} positions")
        if self.cached_len + k > self.cells:
            raise ValueError(
                f"a tree of {k} nodes does not fit the {self.cells - self.cached_len} free cache cells"
            )
        used = {n.seq for n in self.tree} | {0}
        free = (s for s in range(1, MAX_SEQUENCES) if s not in used)
        seq_ids: list[list[int]] = []  # per new node: its sequence first, then its descendants' new ones
        copies: list[tuple[int, int, int]] = []  # (from seq, to seq, up to position) before decoding
        new_nodes: list[_Node] = []
        for i, token in enumerate(tokens):
            row = tree_mask[i]
            ancestors = [j for j in range(cached_nodes + i) if row[j]]
            if cached_nodes + i >= m or not row[cached_nodes + i]:
                raise ValueError("a tree mask row must include the node itself")
            node = _Node(token, positions[i], 0, batch_index=i)
            if ancestors:  # else the root, fed in this forward: it continues the committed sequence 0
                parent = nodes[ancestors[-1]]
                if not parent.claimed:
                    parent.claimed = True
                    node.seq = parent.seq
                else:
                    node.seq = next(free, -1)
                    if node.seq < 0:
                        raise ValueError(f"a tree may have at most {MAX_SEQUENCES - 1} leaves")
                    cached = [nodes[j] for j in ancestors if nodes[j].batch_index is None]
                    if cached:  # the context and the cached ancestors
                        copies.append((cached[-1].seq, node.seq, cached[-1].position + 1))
                    elif self.in_cache > 0:  # the cached part of the context
                        copies.append((0, node.seq, self.in_cache))
                    for j in ancestors:  # pending committed tokens (index -1) carry every sequence anyway
                        index = nodes[j].batch_index
                        if index is not None and index >= 0:
                            seq_ids[index].append(node.seq)
            seq_ids.append([node.seq])
            nodes.append(node)
            new_nodes.append(node)
        for source_seq, target_seq, end in copies:
            self._api.llama_memory_seq_cp(self.memory, source_seq, target_seq, 0, end)
        # Pending committed tokens precede every node: they carry every sequence of this forward.
        all_seqs = sorted({s for ids in seq_ids for s in ids} | {0})
        entries = self._pending_entries(set(all_seqs))
        entries += [(n.token, n.position, ids) for n, ids in zip(new_nodes, seq_ids, strict=True)]
        logits = self._decode(entries, num_logits, prompt=False)
        self.in_cache = len(self.committed)
        for node in new_nodes:
            node.batch_index = None
        self.tree_cells.extend(range(len(self.tree), len(self.tree) + len(new_nodes)))
        self.tree.extend(new_nodes)
        return logits

    def _pending_entries(self, extra_seqs: set[int]) -> list[tuple[int, int, list[int]]]:
        seqs = [0, *sorted(extra_seqs - {0})]
        return [(self.committed[p], p, seqs) for p in range(self.in_cache, len(self.committed))]

    def _decode(
        self, entries: list[tuple[int, int, list[int]]], num_logits: int, prompt: bool
    ) -> torch.Tensor:  # [num_logits, V]
        """Decode (token, position, sequence ids) in order; logits of the last num_logits entries."""
        chunk = PROMPT_BATCH if prompt else EXACT_ROWS
        first_logit = len(entries) - num_logits
        rows: list[np.ndarray] = []
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            batch = self.batch
            batch.n_tokens = len(part)
            wanted = 0
            for i, (token, position, seqs) in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = len(seqs)
                for j, seq in enumerate(seqs):
                    batch.seq_id[i][j] = seq
                logit = start + i >= first_logit
                batch.logits[i] = logit
                wanted += logit
            status = self._api.llama_decode(self.ctx, batch)
            if status != 0:
                raise SwarmspecError(f"llama_decode failed ({status}): {''.join(_recent_log).strip()}")
            if wanted:
                pointer = self._api.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab_size)).copy())
        return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, self.vocab_size)

    def compact(self, keep_len: int, keep_positions: list[int]) -> None:
        kept_slots = [*range(keep_len), *keep_positions]
        n_committed = len(self.committed)
        path = [self.tree[s - n_committed] for s in kept_slots if s >= n_committed]
        if not self.tree:
            if keep_positions != list(range(keep_len, keep_len + len(keep_positions))):
                raise ValueError("without a tree, only a prefix of the cache can be kept")
            self.rollback(keep_len + len(keep_positions))
            return
        if keep_len < n_committed:
            raise ValueError("compact() keeps every committed token before the tree")
        for a, b in itertools.pairwise(path):
            if b.position != a.position + 1:
                raise ValueError("the kept tree nodes must form a path")
        if path and path[0].position != n_committed:
            raise ValueError("the kept path must continue the committed tokens")
        last_seq = path[-1].seq if path else 0
        api, memory = self._api, self.memory
        api.llama_memory_seq_keep(memory, last_seq)
        end = n_committed + len(path)
        api.llama_memory_seq_rm(memory, last_seq, end, -1)
        if last_seq != 0:
            api.llama_memory_seq_cp(memory, last_seq, 0, -1, -1)
            api.llama_memory_seq_rm(memory, last_seq, -1, -1)
        # Cells stay in position order only up to the path's first gap: feed the rest again.
        tree_slots = [s - n_committed for s in kept_slots if s >= n_committed]
        contiguous = 0
        while contiguous < min(len(tree_slots), len(self.tree_cells)) and (
            tree_slots[contiguous] == self.tree_cells[contiguous]
        ):
            contiguous += 1
        if contiguous < len(path):
            api.llama_memory_seq_rm(memory, 0, n_committed + contiguous, -1)
        self.committed.extend(node.token for node in path)
        self.in_cache = n_committed + contiguous
        self.tree, self.tree_cells = [], []

    def rollback(self, keep_len: int) -> None:
        if keep_len > self.cached_len:
            raise ValueError(f"cannot roll back to {keep_len} tokens: only {self.cached_len} are cached")
        if keep_len > len(self.committed):
            raise ValueError("rollback() cannot keep part of a tree; use compact()")
        if self.tree:  # drop the tree's cells and its sequence ids on the committed cells
            self._api.llama_memory_seq_keep(self.memory, 0)
        self._api.llama_memory_seq_rm(self.memory, 0, keep_len, -1)
        del self.committed[keep_len:]
        self.in_cache = min(self.in_cache, keep_len)
        self.tree, self.tree_cells = [], []

    def reset(self) -> None:
        self._api.llama_memory_clear(self.memory, True)
        self.committed, self.in_cache, self.tree, self.tree_cells = [], 0, [], []


@dataclass
class _Joining:
    """A sequence whose prompt is prefilled a `llama_decode` call per step."""

    seq: int
    prefilled: int = 0  # prompt tokens in its cache
    logits: list[np.ndarray] = field(default_factory=list)  # the rows asked for, so far


@dataclass
class _Stream:
    """A joined sequence's cache stream: its committed tokens, as far as they are in the cells at their
    positions, then those to feed again; and the nodes of its last tree forward."""

    seq: int  # its sequence id
    in_cache: int  # committed tokens in cells 0..in_cache-1 of its stream
    pending: list[int] = field(default_factory=list)  # the committed tokens after them, fed next step
    tree: list[int] = field(default_factory=list)  # the last tree's tokens, slots committed...
    parents: list[int] = field(default_factory=list)  # and their parents (the root's: -1)
    tree_cells: list[int] = field(default_factory=list)  # tree nodes in the cells after the committed ones

    @property
    def committed(self) -> int:
        return self.in_cache + len(self.pending)


@dataclass
class _Segment:
    """Rows a sequence decodes in order, continuing the cells of their ancestors: a chain, or a stretch
    of one branch of a tree. Before its first row, the sequence's cells from `trim` on are removed
    (back to the branching point of the branch before it)."""

    seq: int  # the sequence's id
    entries: list[tuple[int, int, int, bool]]  # (token, position, sequence id, wants logits)
    nodes: list[int | None]  # the tree node of each entry (None: a pending committed token)
    trim: int | None = None


class LlamaCppBatchedTarget(BatchedTarget):
    """Continuous batching on llama.cpp: one context whose cache has a stream of its own per sequence
    (`kv_unified` off, a sequence id per request), so every sequence's tokens sit in the cells at their
    positions, as in plain decoding. A step decodes every sequence's rows in `llama_decode` calls of at
    most `EXACT_ROWS` rows, rows of several sequences sharing a call: each row goes through the same
    kernels as a single token, so its logits are bit-identical to the sequence decoded alone. A tree is
    decoded branch by branch as `LlamaCppRunner` decodes it, its sequence's cells below the branching
    point removed between two branches (only its own stream changes; the other sequences' rows go on in
    the same calls). A joining sequence's prompt takes one call of `PROMPT_BATCH` tokens per step, the
    calls plain decoding makes (chunked prefill: a long prompt does not stall the batch for all of its
    length)."""

    def __init__(
        self, model: LlamaCppModel, max_batch: int, context: int, threads: int | None = None
    ) -> None:
        llama_cpp = _llama_cpp()
        super().__init__(model.vocab_size, min(context, model.context_train))
        self._api = llama_cpp
        self.model = model
        threads = threads or os.cpu_count() or 1
        # A stream of max_length cells per sequence.
        self.ctx = _new_context(model, self.max_length * max_batch, max_batch, unified=False, threads=threads)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(PROMPT_BATCH, 0, 1)
        self.free_seqs = list(range(max_batch))
        self.streams: dict[BatchSlot, _Stream] = {}  # the joined sequences
        self.joining: dict[BatchSlot, _Joining] = {}  # sequences whose prompt is partly prefilled

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self._api.llama_batch_free(self.batch)
            self._api.llama_free(self.ctx)
            self.ctx = None

    def cached_len(self, slot: BatchSlot) -> int:
        stream = self.streams.get(slot)
        return 0 if stream is None else stream.committed + len(stream.tree)

    def _join(self, slot: BatchSlot, post: Forward) -> torch.Tensor | None:
        """One `llama_decode` call of the prompt per step, as plain decoding processes it (so its cache
        is the same), while the running sequences go on between the calls; the logits with the last."""
        tokens = post.input_ids.tolist()
        joining = self.joining.get(slot)
        if joining is None:  # the prompt's first part
            if not self.free_seqs:
                raise SwarmspecError(f"all {len(self.streams)} sequences of the batch are in use")
            if len(tokens) > self.max_length:
                raise ValueError(f"sequence would exceed the context of {self.max_length} positions")
            joining = self.joining[slot] = _Joining(self.free_seqs.pop(0))
            self._api.llama_memory_seq_rm(self.memory, joining.seq, -1, -1)
        end = min(joining.prefilled + PROMPT_BATCH, len(tokens))
        first_logit = len(tokens) - post.num_logits
        entries = [(tokens[p], p, joining.seq, p >= first_logit) for p in range(joining.prefilled, end)]
        try:
            joining.logits.append(self._decode(entries, PROMPT_BATCH))
        except Exception:
            self._abandon_join(slot)
            raise
        joining.prefilled = end
        if end < len(tokens):
            return None
        del self.joining[slot]
        self.streams[slot] = _Stream(joining.seq, len(tokens))
        return torch.from_numpy(np.concatenate(joining.logits))

    def _step(self, posts: dict[BatchSlot, Forward]) -> None:
        # Every post is checked and planned before anything is decoded; the streams change only once all
        # of them are, and a failed call leaves every posted stream's cache as it was before the step.
        plans = {slot: self._segments(self.streams[slot], post) for slot, post in posts.items()}
        queues = {slot: segments for slot, (segments, _) in plans.items()}
        rows: dict[BatchSlot, dict[int, np.ndarray]] = {slot: {} for slot in posts}
        try:
            while any(queues.values()):
                self._decode_call(queues, rows)
        except Exception:
            for slot in posts:
                stream = self.streams[slot]
                self._api.llama_memory_seq_rm(self.memory, stream.seq, stream.in_cache, -1)
            raise
        for slot, post in posts.items():
            self.streams[slot] = plans[slot][1]
            k = post.input_ids.shape[0]
            wanted = [rows[slot][n] for n in range(k - post.num_logits, k)]
            post.logits = torch.from_numpy(np.stack(wanted)) if wanted else torch.empty(0, self.vocab_size)

    def _decode_call(
        self, queues: dict[BatchSlot, list[_Segment]], rows: dict[BatchSlot, dict[int, np.ndarray]]
    ) -> None:
        """One `llama_decode` call of at most `EXACT_ROWS` rows, at most one segment of each sequence: a
        sequence's next segment starts in a later call, after its cells below the branching point are
        gone. Sequences with the most segments left go first (each of them needs a call of its own)."""
        taken: list[tuple[BatchSlot, int | None]] = []
        entries: list[tuple[int, int, int, bool]] = []
        for slot in sorted(queues, key=lambda s: -len(queues[s])):
            segments = queues[slot]
            if not segments or len(entries) == EXACT_ROWS:
                break
            segment = segments[0]
            if segment.trim is not None:
                self._api.llama_memory_seq_rm(self.memory, segment.seq, segment.trim, -1)
                segment.trim = None
            count = EXACT_ROWS - len(entries)
            entries += segment.entries[:count]
            taken += [(slot, node) for node in segment.nodes[:count]]
            del segment.entries[:count], segment.nodes[:count]
            if not segment.entries:
                segments.pop(0)
        logits = iter(self._decode(entries, EXACT_ROWS))
        for (slot, node), entry in zip(taken, entries, strict=True):
            if entry[3]:
                assert node is not None
                rows[slot][node] = next(logits)

    def _segments(self, stream: _Stream, post: Forward) -> tuple[list[_Segment], _Stream]:
        """The sequence's rows as segments (its pending tokens, then its chain or its tree, branch by
        branch: `branch_segments`), and its stream once they are decoded: a chain committed (as
        `LlamaCppRunner` commits chains), a tree held until `_keep`."""
        if stream.tree:
            raise ValueError("a forward cannot follow a tree forward before compact()")
        tokens = post.input_ids.tolist()
        k, root, seq = len(tokens), stream.committed, stream.seq
        if k == 0:
            raise ValueError("a forward needs at least one token")
        if post.tree_mask is None:
            parents, positions = list(range(-1, k - 1)), list(range(root, root + k))
        else:
            parents, positions = mask_parents(post.tree_mask), position_ids(post.tree_mask, root).tolist()
        if max(positions) >= self.max_length:
            raise ValueError(f"sequence would exceed the context of {self.max_length} positions")
        branches, cells = branch_segments(parents)
        segments = [
            _Segment(
                seq,
                [(tokens[n], positions[n], seq, n >= k - post.num_logits) for n in nodes],
                list(nodes),
                trim=root + continued if continued else None,
            )
            for continued, nodes in branches
        ]
        # The pending tokens go first, in the cells the root's branch continues.
        segments[0].entries[:0] = [(t, stream.in_cache + i, seq, False) for i, t in enumerate(stream.pending)]
        segments[0].nodes[:0] = [None] * len(stream.pending)
        if len(cells) == k:  # a chain: committed as decoded
            return segments, _Stream(seq, root + k)
        return segments, _Stream(seq, root, [], tokens, parents, cells)

    def _decode(self, entries: list[tuple[int, int, int, bool]], chunk: int) -> np.ndarray:
        """Decode (token, position, sequence id, wants logits) in calls of `chunk` rows; the logits
        wanted, in order."""
        rows: list[np.ndarray] = []
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            self.batch.n_tokens = len(part)
            for i, (token, position, seq, wanted) in enumerate(part):
                self.batch.token[i] = token
                self.batch.pos[i] = position
                self.batch.n_seq_id[i] = 1
                self.batch.seq_id[i][0] = seq
                self.batch.logits[i] = wanted
            status = self._api.llama_decode(self.ctx, self.batch)
            if status != 0:
                raise SwarmspecError(f"llama_decode failed ({status}): {''.join(_recent_log).strip()}")
            wanted = sum(1 for entry in part if entry[3])
            if wanted:
                pointer = self._api.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.vocab_size)).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.vocab_size), dtype=np.float32)

    def _abandon_join(self, slot: BatchSlot) -> None:
        joining = self.joining.pop(slot, None)
        if joining is not None:
            self._api.llama_memory_seq_rm(self.memory, joining.seq, -1, -1)
            self.free_seqs.insert(0, joining.seq)

    def _drop(self, slot: BatchSlot) -> None:
        stream = self.streams.pop(slot)
        self._api.llama_memory_seq_rm(self.memory, stream.seq, -1, -1)
        self.free_seqs.append(stream.seq)

    def _keep(self, slot: BatchSlot, keep_len: int, keep_positions: list[int]) -> None:
        """Keep a prefix of the committed tokens, or all of them and a path of the tree from its root.
        The path stays in its cells as far as it is the last branch decoded; the rest of it is removed
        from the cache and fed again at the front of the next step (as `LlamaCppRunner.compact`)."""
        stream = self.streams[slot]
        committed = stream.committed
        path = [s - committed for s in [*range(keep_len), *keep_positions] if s >= committed]
        if path and (keep_len < committed or any(s < committed for s in keep_positions)):
            raise ValueError("a batched sequence keeps all its committed tokens before a path of its tree")
        if path and (not stream.tree or max(path) >= len(stream.tree)):
            raise ValueError(f"cannot keep slot {committed + max(path)}: it is not cached")
        if not path:
            kept = keep_len + len(keep_positions)
            if keep_positions != list(range(keep_len, kept)):
                raise ValueError("without a tree, a batched sequence keeps a prefix of its tokens")
            stream.pending = stream.pending[: max(kept - stream.in_cache, 0)]
            stream.in_cache = min(stream.in_cache, kept)
        else:
            if path[0] != 0 or any(stream.parents[b] != a for a, b in itertools.pairwise(path)):
                raise ValueError("the kept tree nodes must form a path from its root")
            contiguous = 0
            while contiguous < min(len(path), len(stream.tree_cells)) and (
                path[contiguous] == stream.tree_cells[contiguous]
            ):
                contiguous += 1
            stream.in_cache = committed + contiguous
            stream.pending = [stream.tree[node] for node in path[contiguous:]]
        self._api.llama_memory_seq_rm(self.memory, stream.seq, stream.in_cache, -1)
        stream.tree, stream.parents, stream.tree_cells = [], [], []


def mask_parents(tree_mask: torch.Tensor) -> list[int]:
    """Each node's parent (the root's: -1) from a [k, k] ancestor mask: its deepest ancestor."""
    rows = tree_mask.tolist()
    return [-1, *[max(j for j in range(i) if rows[i][j]) for i in range(1, len(rows))]]


def branch_segments(parents: list[int]) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """A tree decoded branch by branch in depth-first order (children in index order), each node once:
    stretches of branches, each with how many tree cells, from the root's, it continues (the cells
    after those are removed before it), and the nodes left in the cells after the last (its branch)."""
    children: list[list[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        children[parents[node]].append(node)
    segments: list[tuple[int, list[int]]] = []
    cells: list[int] = []  # the branch decoded so far, root first
    stack = [0]
    while stack:
        node = stack.pop()
        stack.extend(reversed(children[node]))
        if not cells or parents[node] != cells[-1]:  # the first node, or a new branch: back to its parent
            del cells[cells.index(parents[node]) + 1 if cells else 0 :]
            segments.append((len(cells), []))
        segments[-1][1].append(node)
        cells.append(node)
    return segments, cells
