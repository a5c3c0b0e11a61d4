"""A sorted draft's exit as a GGUF file llama.cpp runs (S2D on llama.cpp).

On PyTorch a token stops at a shallow exit and a deeper exit completes the skipped layers' cache later
(runners.sorted). llama.cpp runs a model's layers as one graph, so that cannot be had there: each exit
is a model of its own instead, a drafter among others. Its GGUF holds the source's first `depth` layers,
the exit's norm as the output norm and the shared LM head, every tensor copied as stored (quantized).

The exit's norm is the one `swarmspec train-sorted --rank 0` trained, if it did; else the model's own
final norm (the truncated model). Exits trained with adapters (rank > 0) are not a graph llama.cpp
holds. Written once, cached under the source's checksum, the depth and the norm's.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from swarmspec.errors import InvalidRequestError, ModelIntegrityError
from swarmspec.models.registry import REGISTRY, cache_root, gguf_checkpoint_dir, sha256_file
from swarmspec.models.sorted import trained_exit_norm

OUTPUT_NORM = "output_norm.weight"


def exit_gguf(name: str, source: Path, depth: int) -> Path:
    """The GGUF of the exit after `depth` layers of `source` (the file of registered name or path
    `name`), written on first use with the trained norm if there is one."""
    registered = REGISTRY.get(name)
    source_sha256 = registered.gguf_sha256 if registered else sha256_file(source)
    checkpoint = registered.cache_dir() if registered else gguf_checkpoint_dir(source_sha256)
    norm = trained_exit_norm(str(checkpoint), depth)
    norm_key = hashlib.sha256(norm.numpy().tobytes()).hexdigest()[:12] if norm is not None else "untrained"
    stem = source.stem if source_sha256[:12] in source.stem else f"{source.stem}-{source_sha256[:12]}"
    path = cache_root() / "exits" / f"{stem}-exit{depth}-{norm_key}.gguf"
    if not path.is_file():
        kind = "trained" if norm is not None else "untrained (no exit trained with --rank 0 there)"
        note = f"swarmspec: writing the {kind} exit after {depth} layers of {source.name}"
        write_exit_gguf(source, depth, path, norm, on_start=lambda: print(note, file=sys.stderr, flush=True))
    return path


def write_exit_gguf(
    source: Path,
    depth: int,
    out: Path,
    norm: torch.Tensor | None = None,
    on_start: Callable[[], None] | None = None,
) -> None:
    """Write `source`'s first `depth` layers, `norm` (default: its own) as the output norm and its LM
    head to `out`, atomically; every other key and tensor is copied as stored. `on_start` runs once
    the depth is known to fit, before the writing."""
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as err:
        raise ModelIntegrityError(f"cannot read {source} as GGUF: {err}") from None
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    arch = str(arch_field.contents()) if arch_field else "?"
    layers_field = reader.fields.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if layers_field is None:
        raise ModelIntegrityError(f"{source} names no architecture or layer count: not a model's GGUF")
    layers = int(layers_field.contents())
    if not 1 <= depth <= layers:
        raise InvalidRequestError(f"{source.name} has {layers} layers: there is no exit after {depth}")
    if on_start is not None:
        on_start()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    try:
        _write(reader, arch, depth, layers, norm, partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)  # what a failed write left


def _write(
    reader: gguf.GGUFReader, arch: str, depth: int, layers: int, norm: torch.Tensor | None, out: Path
) -> None:
    """`write_exit_gguf`'s writing, to `out`."""
    writer = gguf.GGUFWriter(out, arch, endianess=reader.endianess)
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value = field.contents()
        if field.name == block_count:
            value = depth
        elif field.name.startswith(f"{arch}.") and isinstance(value, list) and len(value) == layers:
            value = value[:depth]  # a per-layer setting
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= depth:
            continue
        data = tensor.data
        if tensor.name == OUTPUT_NORM and norm is not None:
            if tuple(norm.shape) != tuple(data.shape):
                raise InvalidRequestError(f"exit norm of shape {tuple(norm.shape)}, not {tuple(data.shape)}")
            data = norm.detach().to(torch.float32).numpy().astype(data.dtype)
        tensors.append(np.ascontiguousarray(data))
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
