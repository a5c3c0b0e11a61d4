"""Load a model spec into a `transformers` model and tokenizer, optionally quantizing a drafter."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarmspec.errors import ModelNotFoundError, SwarmspecError
from swarmspec.models.gguf_exit import exit_gguf
from swarmspec.models.registry import gguf_file, gguf_tokenizer, resolve_model, split_exit
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.batch import PREFILL_CHUNK, BatchedTarget, TorchBatchedTarget
from swarmspec.runners.hf import HFRunner
from swarmspec.runners.llama_cpp import LlamaCppBatchedTarget, LlamaCppModel

# Prefixes a model spec may carry. "int8" changes the weights (for drafters: losslessness never depends
# on the drafter); "onednn" keeps the exact fp32 weights and only changes the matmul kernel; "llamacpp"
# runs the GGUF file itself (quantized weights as stored) on llama.cpp instead of PyTorch; "sorted" loads
# the exact weights for a drafter that drafts with the model's early exits (drafters.sorted); "cuda" puts
# the exact fp32 weights on the GPU (runners take and return CPU tensors, so the rest does not change).
VARIANTS = ("int8", "onednn", "llamacpp", "sorted", "cuda")
SORTED = "sorted"
CUDA = "cuda"
LLAMA_CPP = "llamacpp"
# The llama.cpp backend's context (KV cache) size when the model allows that many positions.
LLAMA_CPP_CONTEXT = 4096


@dataclass(frozen=True)
class LoadedModel:
    """Weights loaded once (a `transformers` module or a llama.cpp model) and the tokenizer."""

    spec: str  # what the user asked for, e.g. "int8:qwen2.5-coder-0.5b-instruct"
    model: PreTrainedModel | LlamaCppModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def backend(self) -> str:
        return LLAMA_CPP if isinstance(self.model, LlamaCppModel) else "torch"

    @property
    def vocab_size(self) -> int:
        """Width of the logits."""
        if isinstance(self.model, LlamaCppModel):
            return self.model.vocab_size
        return self.model.config.vocab_size

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt + output) a runner of this model holds."""
        if isinstance(self.model, LlamaCppModel):
            return min(LLAMA_CPP_CONTEXT, self.model.context_train)
        return self.model.config.max_position_embeddings

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """The EOS ids `transformers.generate` stops on: the generation config's, else the tokenizer's."""
        eos = None if isinstance(self.model, LlamaCppModel) else self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))

    def new_runner(self, threads: int | None = None) -> ModelRunner:
        """A runner with an empty cache of its own over these (shared) weights; `threads`: llama.cpp's
        threads for this runner (default: every core); PyTorch runners share torch's intra-op pool."""
        if isinstance(self.model, LlamaCppModel):
            return self.model.new_runner(self.max_length, threads)
        return HFRunner(self.model)

    def new_batched_target(
        self, max_batch: int, threads: int | None = None, prefill_chunk: int | None = None
    ) -> BatchedTarget:
        """Continuous batching: one batched cache over these weights for up to `max_batch` sequences'
        forwards (`threads`: llama.cpp's; PyTorch shares torch's intra-op pool; `prefill_chunk`:
        PyTorch's prompt tokens per step, default `PREFILL_CHUNK`)."""
        if isinstance(self.model, LlamaCppModel):
            if prefill_chunk is not None:
                raise SwarmspecError("llama.cpp prefills in the 512-token calls plain decoding makes")
            return LlamaCppBatchedTarget(self.model, max_batch, self.max_length, threads)
        return TorchBatchedTarget(self.model, prefill_chunk=prefill_chunk or PREFILL_CHUNK)

    @property
    def gguf_path(self) -> Path:
        """The GGUF file a llama.cpp model runs from."""
        if not isinstance(self.model, LlamaCppModel):
            raise SwarmspecError(f"{self.spec} runs on PyTorch; this needs a llama.cpp model (llamacpp:)")
        return self.model.path

    @property
    def hf_model(self) -> PreTrainedModel:
        """The `transformers` module, for what only PyTorch runs (the transformers baselines)."""
        if isinstance(self.model, LlamaCppModel):
            raise SwarmspecError(f"{self.spec} runs on llama.cpp; this needs a PyTorch model")
        return self.model


def split_spec(spec: str) -> tuple[str | None, str]:
    """'int8:name' -> ('int8', 'name'); 'name' -> (None, 'name')."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in VARIANTS:
        return prefix, rest
    return None, spec


def check_spec(spec: str) -> None:
    """Fail on a bad model name before anything is loaded (fetching what the spec needs on the way)."""
    variant, name = split_spec(spec)
    if variant == LLAMA_CPP:
        llama_cpp_file(name)
    else:
        resolve_model(name)


def llama_cpp_file(name: str) -> Path:
    """The GGUF file a llama.cpp spec's name runs: a registered model's or a path's, or for
    "exit<N>:<model>" the model's sorted-draft exit after N layers (models.gguf_exit)."""
    depth, model_name = split_exit(name)
    source = gguf_file(model_name)
    return source if depth is None else exit_gguf(model_name, source, depth)


def model_name(spec: str) -> str:
    """The model a spec loads, without backend, variant or exit prefixes: what users load by name."""
    return split_exit(split_spec(spec)[1])[1]


def load_model(spec: str) -> LoadedModel:
    """Load a model in float32, exactly as stored; an `int8:` or `onednn:` spec then converts its linears,
    a `cuda:` spec moves it to the GPU; a `llamacpp:` spec loads the GGUF on llama.cpp."""
    variant, name = split_spec(spec)
    if variant == CUDA and not torch.cuda.is_available():
        raise SwarmspecError(
            f"{spec}: the cuda: variant needs a GPU that PyTorch can use, and torch.cuda.is_available() "
            f"is False here (torch {torch.__version__}); drop the prefix to run on the CPU"
        )
    if variant == LLAMA_CPP:
        model = LlamaCppModel(llama_cpp_file(name))  # a file that is not GGUF fails here, clearly
        # An exit's GGUF holds its model's tokenizer: read (and cached) from the model's own file.
        return LoadedModel(spec, model, gguf_tokenizer(gguf_file(split_exit(name)[1])))
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
    elif variant == SORTED and torch.backends.mkldnn.is_available():
        # A token that stops at a shallow exit leaves the deeper layers for later, where they run over
        # several tokens at once: oneDNN does that for about the cost of one (eager MKL: 2.6x for two),
        # so only there do early exits save time. The LM head stays: draft heads take its rows.
        pack_linears_onednn(model, keep=("lm_head",))
    elif variant == CUDA:
        # fp32 as on the CPU: with TF32 off (PyTorch's default for matmuls) a k-row verification forward
        # differs from k one-row forwards only in the last bits, as eager fp32 does on the CPU.
        model = model.to("cuda")
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


def pack_linears_onednn(model: PreTrainedModel, keep: Sequence[str] = ()) -> None:
    """Replace every nn.Linear but those named in `keep` by a PackedLinear, freeing the unpacked
    weights."""
    if not torch.backends.mkldnn.is_available():
        raise SwarmspecError("the onednn: variant needs a PyTorch build with oneDNN (mkldnn)")
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in keep
    ]
    for name in linears:
        model.set_submodule(name, PackedLinear(model.get_submodule(name)))


def check_same_vocabulary(target: LoadedModel, drafter: LoadedModel) -> None:
    """Token-level drafting needs one vocabulary: same token ids for the same strings, same logits width."""
    if target.vocab_size != drafter.vocab_size or (
        target.tokenizer.get_vocab() != drafter.tokenizer.get_vocab()
    ):
        raise SwarmspecError(
            f"drafter {drafter.spec!r} does not share the target {target.spec!r}'s vocabulary "
            f"({drafter.vocab_size} vs {target.vocab_size} logits); "
            "choose a drafter of the same model family"
        )
