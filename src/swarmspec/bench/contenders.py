"""What the benchmark times: every swarmspec decoding method, the `transformers` peers and the
`llama-cpp-python` peers, behind one small interface, on the same loaded target (and drafter) weights.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from swarmspec.config import EngineConfig
from swarmspec.engine import Engine
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import LoadedModel, check_same_vocabulary
from swarmspec.sampling import SamplingConfig

# transformers' documented example value; it has no default (prompt lookup is off unless set).
HF_PROMPT_LOOKUP_TOKENS = 10
# llama-cpp-python's `LlamaPromptLookupDecoding` default.
LLAMA_CPP_PROMPT_LOOKUP_TOKENS = 10


class _TransformersOwnCall(logging.Filter):
    """transformers' assisted generation calls the assistant's `generate` with a generation config and
    generation arguments both (`AssistedCandidateGenerator._prepare_generation_args`), then warns that
    this is deprecated: a warning about its own call, which no caller can change, dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Passing `generation_config` together with" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_TransformersOwnCall())


@dataclass(frozen=True)
class Outcome:
    """One timed generation. Counters follow `metrics.DecodeStats`: the prefill is a target forward."""

    token_ids: list[int]
    wall_s: float
    target_forwards: int
    drafted_tokens: int
    accepted_tokens: int
    drafting_forwards: int  # forwards that verified at least one drafted token
    drafted_depth: int  # summed over those: the verified tree's depth (a chain's length)
    # Accepted tokens per proposing drafter spec (swarmspec methods; transformers does not say).
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    exit_tokens: int = 0  # sorted drafts: tokens drafted, and the layers they ran
    exit_layers: int = 0
    pipelined: bool | None = None  # the self-tuning pipeline: whether it ran pipelined (else took turns)

    @classmethod
    def of_chains(
        cls, token_ids: list[int], wall_s: float, prompt_len: int, fed_tokens: list[int]
    ) -> Outcome:
        """From the tokens fed to each target forward of chain speculation: the first feeds the prompt
        plus its drafts, every later one the newest committed token plus its drafts; every forward
        commits its accepted drafts plus one token of its own."""
        drafted = [fed_tokens[0] - prompt_len, *(n - 1 for n in fed_tokens[1:])] if fed_tokens else []
        forwards = len(fed_tokens)
        return cls(
            token_ids,
            wall_s,
            forwards,
            sum(drafted),
            len(token_ids) - forwards,
            sum(1 for d in drafted if d),
            sum(drafted),
        )


class Contender(ABC):
    """A way of generating with the target: a swarmspec method or a `transformers` baseline."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> Outcome: ...


class SwarmspecMethod(Contender):
    def __init__(self, name: str, engine: Engine, drafters: Sequence[str] = ()) -> None:
        super().__init__(name)
        self.engine = engine
        self.drafters = list(drafters)  # the engine's drafter specs, in its speculation's order

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> Outcome:
        stats = DecodeStats()
        token_ids: list[int] = []
        start = time.perf_counter()
        for chunk in self.engine.token_chunks(prompt_ids, max_new_tokens, sampling, seed, stats):
            token_ids.extend(chunk)
        wall_s = time.perf_counter() - start
        totals = stats.totals()
        return Outcome(
            token_ids,
            wall_s,
            totals.target_forwards,
            totals.drafted_tokens,
            totals.accepted_tokens,
            totals.drafting_forwards,
            totals.drafted_depth,
            stats.accepted_by(self.drafters),
            totals.exit_tokens,
            totals.exit_layers,
            stats.pipelined,
        )


class HFBaseline(Contender):
    """`model.generate`, plain, with an assistant model, or with prompt lookup.

    transformers reports no speculation counters, so a forward pre-hook on the target records the
    tokens fed to each forward (`Outcome.of_chains`). For plain `generate` that gives 0 drafted and 0
    accepted.
    """

    def __init__(
        self,
        name: str,
        target: LoadedModel,
        assistant: PreTrainedModel | None = None,
        prompt_lookup_tokens: int | None = None,
    ) -> None:
        super().__init__(name)
        self.model: PreTrainedModel = target.hf_model
        self.eos_token_ids = sorted(target.stop_token_ids)
        self.pad_token_id = target.tokenizer.pad_token_id
        self.assistant = assistant
        self.prompt_lookup_tokens = prompt_lookup_tokens

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> Outcome:
        fed_tokens: list[int] = []

        def count(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            fed_tokens.append(input_ids.shape[-1])

        config = hf_generation_config(sampling, max_new_tokens, self.eos_token_ids, self.pad_token_id)
        config.prompt_lookup_num_tokens = self.prompt_lookup_tokens
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        hook = self.model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            torch.manual_seed(seed)  # transformers samples from the global RNG
            start = time.perf_counter()
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    assistant_model=self.assistant,
                )
            tokens = output[0, len(prompt_ids) :].tolist()  # on a GPU: waits for the last kernel
            wall_s = time.perf_counter() - start
        finally:
            hook.remove()
        return Outcome.of_chains(tokens, wall_s, len(prompt_ids), fed_tokens)


class LlamaCppBaseline(Contender):
    """Plain decoding through `llama_cpp.Llama` (llama.cpp's defaults, the target's GGUF and thread
    count), optionally with its prompt-lookup drafter (`LlamaPromptLookupDecoding`).

    Counters as for `HFBaseline`, from the tokens fed to each `Llama.eval` call (one llama_decode per
    call for anything up to `n_batch` tokens).
    """

    def __init__(self, name: str, target: LoadedModel, threads: int | None, prompt_lookup: bool) -> None:
        super().__init__(name)
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LLAMA_CPP_PROMPT_LOOKUP_TOKENS)
        threads = threads or os.cpu_count() or 1
        self.llama = Llama(
            model_path=str(target.gguf_path),
            n_ctx=target.max_length,
            n_threads=threads,
            n_threads_batch=threads,
            draft_model=draft if prompt_lookup else None,
            # With a draft model llama-cpp-python keeps logits for every position but sizes its buffer by
            # this flag: without it, prompts longer than n_batch (512) crash in `Llama.eval` (0.3.36).
            logits_all=prompt_lookup,
            verbose=False,
        )
        self.stop_token_ids = target.stop_token_ids
        self.fed_tokens: list[int] = []
        evaluate = self.llama.eval

        def counted_eval(tokens: Sequence[int]) -> None:
            self.fed_tokens.append(len(tokens))
            evaluate(tokens)

        self.llama.eval = counted_eval  # type: ignore[method-assign]

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> Outcome:
        self.fed_tokens = []
        token_ids: list[int] = []
        start = time.perf_counter()
        self.llama.reset()  # no reuse of the previous run's cache: every run pays its own prefill
        self.llama.set_seed(seed)
        settings = (
            {"temp": 0.0, "top_k": 1, "top_p": 1.0}
            if sampling.greedy
            else {"temp": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
        )
        for token in self.llama.generate(prompt_ids, repeat_penalty=1.0, min_p=0.0, **settings):
            token_ids.append(token)
            if token in self.stop_token_ids or len(token_ids) >= max_new_tokens:
                break
        return Outcome.of_chains(token_ids, time.perf_counter() - start, len(prompt_ids), self.fed_tokens)


def hf_generation_config(
    sampling: SamplingConfig, max_new_tokens: int, eos_token_ids: list[int], pad_token_id: int | None
) -> GenerationConfig:
    """The same decoding rule as swarmspec's, spelled out in full so no checkpoint default sneaks in."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        repetition_penalty=1.0,
        do_sample=not sampling.greedy,
    )
    if not sampling.greedy:
        config.temperature = sampling.temperature
        config.top_k = sampling.top_k  # 0 turns top-k off, as in swarmspec
        config.top_p = sampling.top_p
    return config


def build_contenders(
    engine_configs: Sequence[tuple[str, EngineConfig]],
    baselines: Sequence[str],
    target: LoadedModel,
    draft_models: Mapping[str, LoadedModel],
    assistant: LoadedModel | None,
    hf_target: LoadedModel | None = None,
    threads: int | None = None,
) -> list[Contender]:
    """Swarmspec's engines (by name), then baselines (names as `BenchConfig` validated them), sharing one
    copy of the weights.

    The transformers baselines run on `hf_target` (the PyTorch model of a llama.cpp target), else on the
    target; the llama.cpp baselines on the target's GGUF with `threads` threads."""
    contenders: list[Contender] = [
        SwarmspecMethod(name, Engine.from_models(config, target, draft_models), config.drafters)
        for name, config in engine_configs
    ]
    hf_target = hf_target or target
    for name in baselines:
        if name == "hf-assisted":
            if assistant is None:
                raise ValueError("hf-assisted needs an assistant model")
            check_same_vocabulary(hf_target, assistant)
            contenders.append(HFBaseline(name, hf_target, assistant=assistant.hf_model))
        elif name == "hf-prompt-lookup":
            contenders.append(HFBaseline(name, hf_target, prompt_lookup_tokens=HF_PROMPT_LOOKUP_TOKENS))
        elif name == "hf-generate":
            contenders.append(HFBaseline(name, hf_target))
        else:
            lookup = name == "llama-cpp-prompt-lookup"
            contenders.append(LlamaCppBaseline(name, target, threads, prompt_lookup=lookup))
    return contenders
