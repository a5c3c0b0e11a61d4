"""The real packaged models: speculative greedy output is token-identical to `transformers`' generate.

Slow: loads the 1.5B target (fp32, ~7 GB) and the 0.5B drafter, fetched and converted on first use.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import openai
import pytest
import torch

from swarmspec.bench.load import serving
from swarmspec.config import EngineConfig, GenerationRequest
from swarmspec.drafters.model import ModelDrafter
from swarmspec.engine import Engine, SequenceState
from swarmspec.models.loading import LoadedModel, load_model
from swarmspec.models.registry import DEFAULT_DRAFTER, DEFAULT_TARGET
from swarmspec.policy import FixedDepth
from swarmspec.runners.hf import HFRunner
from swarmspec.serve.app import Server
from swarmspec.serve.engines import MethodEngines
from swarmspec.speculate import ChainSpeculation, NoSpeculation, Speculation

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain in two sentences what a hash map is.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Answer step by step.",
]
NEW_TOKENS = 64


def engine_of(target: LoadedModel, speculation: Callable[[], Speculation], gamma: int) -> Engine:
    """An engine whose generations each get a fresh target cache and `speculation()`, drafting `gamma`."""

    def new_state() -> SequenceState:
        spec = speculation()
        return SequenceState(target.new_runner(), spec, FixedDepth(gamma, len(spec.drafters)))

    return Engine(new_state, target.tokenizer, target.stop_token_ids)


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return load_model(DEFAULT_TARGET)


@pytest.fixture(scope="module")
def hf_reference(target: LoadedModel) -> dict[str, list[int]]:
    """transformers' own greedy decoding of each prompt, the promise we keep."""
    engine = engine_of(target, lambda: NoSpeculation(), gamma=1)
    reference = {}
    for prompt in PROMPTS:
        prompt_ids = engine.prompt_ids(GenerationRequest(prompt))
        with torch.inference_mode():
            out = target.model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=NEW_TOKENS,
            )  # fmt: skip
        reference[prompt] = out[0, len(prompt_ids) :].tolist()
    return reference


@pytest.mark.parametrize(
    "drafter_spec", [DEFAULT_DRAFTER, f"int8:{DEFAULT_DRAFTER}", None], ids=["fp32", "int8", "ar"]
)
def test_greedy_equals_transformers_generate(
    target: LoadedModel, hf_reference: dict[str, list[int]], drafter_spec: str | None
) -> None:
    drafter = ModelDrafter(HFRunner(load_model(drafter_spec).model)) if drafter_spec else None
    engine = engine_of(target, lambda: ChainSpeculation(drafter) if drafter else NoSpeculation(), gamma=4)
    for prompt in PROMPTS:
        result = engine.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
        assert result.token_ids == hf_reference[prompt], prompt
        if drafter is not None:
            assert result.stats.accepted_tokens > 0  # the drafter did real work
            assert result.stats.target_forwards < len(result.token_ids)


def test_onednn_target_equals_transformers_generate(hf_reference: dict[str, list[int]]) -> None:
    """The oneDNN fast path keeps the target's fp32 weights; its greedy output must not change."""
    packed = load_model(f"onednn:{DEFAULT_TARGET}")
    drafter = ModelDrafter(HFRunner(load_model(DEFAULT_DRAFTER).model))
    engine = engine_of(packed, lambda: ChainSpeculation(drafter), gamma=4)
    for prompt in PROMPTS:
        result = engine.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
        assert result.token_ids == hf_reference[prompt], prompt


@pytest.mark.parametrize(
    "shape",
    [
        {"method": "tree"},
        {"method": "tree", "tree_widths": (3, 2, 1, 1)},
        {"method": "tree", "tree_budget": 8},
        {"method": "vote"},
    ],
    ids=["merged", "3-2-1-1", "budget-8", "vote"],
)
def test_tree_and_vote_equal_transformers_generate(
    target: LoadedModel, hf_reference: dict[str, list[int]], shape: dict[str, Any]
) -> None:
    """Token trees and the vote over the int8 drafter, prompt lookup (latest and earliest occurrence)
    and suffix matching."""
    drafters = (f"int8:{DEFAULT_DRAFTER}", "prompt-lookup", "prompt-lookup-earliest", "suffix")
    config = EngineConfig(target=DEFAULT_TARGET, drafters=drafters, gamma=4, **shape)  # always drafting
    engine = Engine.from_models(config, target, {drafters[0]: load_model(drafters[0])})
    for prompt in PROMPTS:
        result = engine.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
        assert result.token_ids == hf_reference[prompt], prompt
        assert result.stats.accepted_tokens > 0
        assert sum(result.stats.accepted_by(drafters).values()) == result.stats.accepted_tokens


def test_pipeline_equals_transformers_generate(
    target: LoadedModel, hf_reference: dict[str, list[int]]
) -> None:
    """The int8 drafter on a thread of its own, drafting while the fp32 target verifies (one PyTorch
    intra-op thread each)."""
    drafter = f"int8:{DEFAULT_DRAFTER}"
    config = EngineConfig(target=DEFAULT_TARGET, method="pipeline", drafters=(drafter,), gamma=4)
    engine = Engine.from_models(config, target, {drafter: load_model(drafter)})
    for prompt in PROMPTS:
        result = engine.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
        assert result.token_ids == hf_reference[prompt], prompt
        assert result.stats.accepted_tokens > 0


def test_batched_server_equals_transformers_generate(
    target: LoadedModel, hf_reference: dict[str, list[int]]
) -> None:
    """The real pair behind the server with continuous batching: the three prompts sent at once (chat
    completions, streamed and not, official `openai` client) each get transformers' own greedy text."""
    drafter = f"int8:{DEFAULT_DRAFTER}"
    config = EngineConfig(target=DEFAULT_TARGET, drafters=(drafter,), gamma=4, max_batch=3)
    engines = MethodEngines(config, target, {drafter: load_model(drafter)})
    server = Server({"real": engines}, "chain", 8, 64)
    with serving(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(indexed: tuple[int, str]) -> str:
            i, prompt = indexed
            messages = [{"role": "user", "content": prompt}]
            if i % 2:
                stream = client.chat.completions.create(
                    model="real", messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True
                )
                return "".join(c.choices[0].delta.content or "" for c in stream)
            reply = client.chat.completions.create(
                model="real", messages=messages, max_tokens=NEW_TOKENS, temperature=0
            )
            return reply.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(ask, enumerate(PROMPTS)))
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert text == target.tokenizer.decode(hf_reference[prompt], skip_special_tokens=True), prompt
    (engine,) = engines.engines.values()
    assert engine.batched is not None and engine.batched.steps > 0
