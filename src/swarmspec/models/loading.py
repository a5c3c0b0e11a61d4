"""Load a model spec into a `transformers` model and tokenizer, optionally quantizing a drafter."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarmspec.errors import ModelNotFoundError, SwarmspecError
from swarmspec.models.registry import resolve_model

# Prefixes a model spec may carry. "int8" changes the weights (for drafters: losslessness never depends
# on the drafter); "onednn" keeps the exact fp32 weights and only changes the matmul kernel.
VARIANTS = ("int8", "onednn")


@dataclass(frozen=True)
class LoadedModel:
    spec: str  # what the user asked for, e.g. "int8:qwen2.5-coder-0.5b-instruct"
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def split_spec(spec: str) -> tuple[str | None, str]:
    """'int8:name' -> ('int8', 'name'); 'name' -> (None, 'name')."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in VARIANTS:
        return prefix, rest
    return None, spec


def load_model(spec: str) -> LoadedModel:
    """Load a model in float32, exactly as stored; an `int8:` or `onednn:` spec then converts its linears."""
    variant, name = split_spec(spec)
    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load model {name!r} from {source}: {err}") from err
    if variant == "int8":
        model = quantize_int8(model)
    elif variant == "onednn":
        pack_linears_onednn(model)
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


class PackedLinear(torch.nn.Module):
    """An fp32 linear layer computed by oneDNN from a weight packed once into its preferred layout.

    Same weight values as the nn.Linear it replaces; only the summation order differs (~1e-5 on the
    1.5B target's logits, the size of eager MKL's own k-row vs 1-row difference). On this CPU a forward
    of 8 tokens then costs about 1.1x one token instead of 2.3-5x (docs/cpu-fast-path.md).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def pack_linears_onednn(model: PreTrainedModel) -> None:
    """Replace every nn.Linear by a PackedLinear, freeing the unpacked weights."""
    if not torch.backends.mkldnn.is_available():
        raise SwarmspecError("the onednn: variant needs a PyTorch build with oneDNN (mkldnn)")
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name in linears:
        model.set_submodule(name, PackedLinear(model.get_submodule(name)))


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
