"""Load a model spec into a `transformers` model and tokenizer, optionally quantizing a drafter."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarmspec.errors import ModelNotFoundError, SwarmspecError
from swarmspec.models.registry import resolve_model

# Prefixes a drafter spec may carry; losslessness never depends on the drafter, so it may be approximate.
QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class LoadedModel:
    spec: str  # what the user asked for, e.g. "int8:qwen2.5-coder-0.5b-instruct"
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def split_spec(spec: str) -> tuple[str | None, str]:
    """'int8:name' -> ('int8', 'name'); 'name' -> (None, 'name')."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in QUANTIZATIONS:
        return prefix, rest
    return None, spec


def load_model(spec: str) -> LoadedModel:
    """Load a model in float32, exactly as stored; an `int8:` spec then quantizes its linear layers."""
    quantization, name = split_spec(spec)
    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load model {name!r} from {source}: {err}") from err
    if quantization == "int8":
        model = quantize_int8(model)
    return LoadedModel(spec, model.eval(), tokenizer)


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations quantized per call).

    On this kind of CPU an int8 linear runs ~10x faster than fp32 at one row; accuracy drops a little,
    which only lowers the drafter's acceptance rate, never the output's correctness.
    """
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which has no CPU wheel here yet.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def check_same_vocabulary(target: LoadedModel, drafter: LoadedModel) -> None:
    """Token-level drafting needs one vocabulary: same token ids for the same strings, same logits width."""
    if target.model.config.vocab_size != drafter.model.config.vocab_size or (
        target.tokenizer.get_vocab() != drafter.tokenizer.get_vocab()
    ):
        raise SwarmspecError(
            f"drafter {drafter.spec!r} does not share the target {target.spec!r}'s vocabulary "
            f"({drafter.model.config.vocab_size} vs {target.model.config.vocab_size} logits); "
            "choose a drafter of the same model family"
        )
