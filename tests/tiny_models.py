"""Shared helpers: tiny random-init models of the target's architecture (Qwen2), and a decode runner."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from swarmspec.decode import decode
from swarmspec.drafters.base import Drafter
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import LoadedModel
from swarmspec.policy import FixedDepth, SpeculationPolicy
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import ChainSpeculation, NoSpeculation, Speculation
from swarmspec.verify import Verifier, make_verifier

VOCAB = 96
EOS = 1
# Where the tiny models run: "cpu" (CI), or e.g. "cuda" to run the same tests on a GPU (the runners take
# and return CPU tensors wherever the model is, so only tests that call a model directly need to know).
TEST_DEVICE = torch.device(os.environ.get("SWARMSPEC_TEST_DEVICE", "cpu"))


def tiny_qwen2(seed: int, vocab_size: int = 96, layers: int = 2, init_std: float = 0.3) -> Qwen2ForCausalLM:
    """A random Qwen2 small enough for hundreds of forwards per second.

    A large init_std spreads the logits, so near-ties (where k-row and 1-row kernels could round to
    different argmaxes) are rare, and the distributions are far from uniform.
    """
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_std,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():  # no global RNG state leaks out of model construction
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(TEST_DEVICE).eval()


def run_decode(
    target: Qwen2ForCausalLM,
    drafter: Drafter | Speculation | None,
    prompt: list[int],
    max_new_tokens: int,
    gamma: int = 4,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    verifier: Verifier | None = None,
    stop_token_ids: frozenset[int] = frozenset(),
    runner: HFRunner | None = None,
    policy: SpeculationPolicy | None = None,
) -> tuple[list[int], DecodeStats]:
    """Decode on a fresh cache; `policy` defaults to `gamma` tokens from every drafter."""
    sampling = sampling or SamplingConfig()
    stats = DecodeStats()
    speculation = ChainSpeculation(drafter) if isinstance(drafter, Drafter) else drafter or NoSpeculation()
    chunks = decode(
        runner or HFRunner(target),
        speculation,
        verifier or make_verifier(sampling),
        prompt,
        max_new_tokens=max_new_tokens,
        policy=policy or FixedDepth(gamma, len(speculation.drafters)),
        sampling=sampling,
        stop_token_ids=stop_token_ids,
        generator=torch.Generator().manual_seed(seed),
        stats=stats,
    )
    return [t for chunk in chunks for t in chunk], stats


class TrigramLM(ModelRunner):
    """A tiny-vocabulary language model whose next-token logits are a random table of the last two tokens.

    Implements the same `ModelRunner` interface as `HFRunner`, in microseconds per forward, so
    distribution tests can push thousands of samples through the real decode loop, drafter and
    verifier; its exact distributions are read off the table.
    """

    def __init__(self, seed: int, vocab_size: int = 4, scale: float = 1.5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, vocab_size, generator=generator) * scale  # [V, V, V]
        self.vocab_size = vocab_size
        self.max_length = 1 << 20
        self.tokens: list[int] = []

    @property
    def cached_len(self) -> int:
        return len(self.tokens)

    def next_logits(self, sequence: list[int]) -> torch.Tensor:  # [V]
        return self.table[sequence[-2], sequence[-1]]

    def forward(
        self, input_ids: torch.Tensor, num_logits: int, tree_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        new = input_ids.tolist()
        k = len(new)
        sees = tree_mask if tree_mask is not None else torch.ones(k, k, dtype=torch.bool).tril()
        root = len(self.tokens) + k - sees.shape[1]
        block = self.tokens[root:] + new  # the tree's nodes, root first
        rows = [
            self.next_logits(self.tokens[:root] + [block[j] for j in range(len(block)) if sees[i, j]])
            for i in range(k - num_logits, k)
        ]
        self.tokens.extend(new)
        return torch.stack(rows)

    def compact(self, keep_len: int, keep_positions: list[int]) -> None:
        self.tokens = self.tokens[:keep_len] + [self.tokens[p] for p in keep_positions]

    def rollback(self, keep_len: int) -> None:
        del self.tokens[keep_len:]

    def reset(self) -> None:
        self.tokens = []


def tiny_loaded(name: str, seed: int, layers: int = 2) -> LoadedModel:
    """A tiny random Qwen2 with a real (word-level) fast tokenizer over its vocabulary."""
    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="t0", eos_token=f"t{EOS}")
    model = tiny_qwen2(seed, vocab_size=VOCAB, layers=layers)
    model.generation_config.eos_token_id = EOS
    return LoadedModel(name, model, tokenizer)
