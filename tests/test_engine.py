"""One engine, many generations: each runs on its own state, so interleaved generations give exactly
what each gives alone, and every method is deterministic under a fixed seed."""

from __future__ import annotations

import itertools

import pytest
import torch

from swarmspec.config import (
    AUTO,
    METHODS,
    MODEL_FREE_DRAFTERS,
    ONE_DRAFTER_METHODS,
    ORCHESTRATED_METHODS,
    EngineConfig,
    Gamma,
)
from swarmspec.engine import DsiState, Engine, PipelineChoice
from swarmspec.errors import InvalidRequestError
from swarmspec.metrics import DecodeStats
from swarmspec.policy import AcceptanceStats, CostModelPolicy, StepCosts
from swarmspec.sampling import SamplingConfig

from tiny_models import tiny_loaded

SAMPLINGS = [SamplingConfig(), SamplingConfig(temperature=0.9, top_k=20, top_p=0.9)]
# DSI's and the pipeline's sampled output is exact in distribution but not fixed by the seed: which
# drafts a job verifies depends on which thread finishes first.
SEEDED = [
    (method, sampling)
    for method in METHODS
    for sampling in SAMPLINGS
    if method not in ORCHESTRATED_METHODS or sampling.greedy
]
SEEDED_IDS = [f"{m}-{'greedy' if s.greedy else 'sampled'}" for m, s in SEEDED]


def engine_for(method: str, tree_budget: int = 0, shared_learning: bool = True, gamma: Gamma = 3) -> Engine:
    """Tiny models; tree and vote over the model, prompt lookup and (with shared learning) suffix. With
    gamma auto, the costs are a CPU-like curve on which the tiny drafter pays for short drafts."""
    target, drafter = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-drafter", 7, layers=1)
    free = MODEL_FREE_DRAFTERS if shared_learning else ("prompt-lookup",)
    drafters = (drafter.spec,) if method in ONE_DRAFTER_METHODS else (drafter.spec, *free)
    config = EngineConfig(
        target=target.spec, method=method, drafters=drafters, gamma=gamma, tree_budget=tree_budget
    )
    costs = StepCosts(
        {1: 30.0, 2: 40.0, 32: 340.0}, tuple(2.0 if d == drafter.spec else 0.0 for d in drafters)
    )
    return Engine.from_models(config, target, {drafter.spec: drafter}, costs=costs)


def generate(engine: Engine, prompt: list[int], sampling: SamplingConfig, seed: int) -> list[int]:
    return [t for chunk in engine.token_chunks(prompt, 30, sampling, seed, DecodeStats()) for t in chunk]


@pytest.mark.parametrize("gamma", [3, AUTO])
@pytest.mark.parametrize(("method", "sampling"), SEEDED, ids=SEEDED_IDS)
def test_interleaved_generations_equal_each_alone(
    method: str, sampling: SamplingConfig, gamma: Gamma
) -> None:
    """Without the suffix index: a generation that ends while another runs teaches it what was said,
    which is the point of sharing it (and changes sampled drafts, never a greedy output). Likewise the
    policy's acceptance statistics, shared when a generation ends."""
    prompts = [[5, 9, 14, 5, 9, 20, 33], [40, 41, 42, 40, 41, 60, 70, 80]]
    alone = [
        generate(engine_for(method, shared_learning=False, gamma=gamma), p, sampling, 3) for p in prompts
    ]
    engine = engine_for(method, shared_learning=False, gamma=gamma)
    streams = [engine.token_chunks(prompt, 30, sampling, 3, DecodeStats()) for prompt in prompts]
    outputs: list[list[int]] = [[], []]
    for pair in itertools.zip_longest(*streams):  # one step of each, alternating
        for output, chunk in zip(outputs, pair, strict=True):
            output.extend(chunk or [])
    assert outputs == alone


@pytest.mark.parametrize(
    ("method", "sampling"),
    [*SEEDED, *[("tree-budget", s) for s in SAMPLINGS]],
    ids=[*SEEDED_IDS, "tb-g", "tb-s"],
)
def test_every_method_is_deterministic_under_a_seed(method: str, sampling: SamplingConfig) -> None:
    def fresh_engine() -> Engine:  # the suffix index and vote weights start empty
        return engine_for("tree", tree_budget=6) if method == "tree-budget" else engine_for(method)

    prompt = [3, 4, 5, 6, 3, 4, 7]
    assert generate(fresh_engine(), prompt, sampling, seed=11) == generate(
        fresh_engine(), prompt, sampling, 11
    )


@pytest.mark.parametrize("method", [*METHODS, "tree-budget"])
def test_self_tuned_methods_equal_plain_decoding(method: str) -> None:
    plain = engine_for("ar")
    engine = engine_for("tree", 6, gamma=AUTO) if method == "tree-budget" else engine_for(method, gamma=AUTO)
    for seed in range(8):
        prompt = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        prompt += prompt[:6]  # something for prompt lookup to copy
        expected = generate(plain, prompt, SAMPLINGS[0], seed)  # 30 tokens
        stats = DecodeStats()
        assert [t for c in engine.token_chunks(prompt, 30, SAMPLINGS[0], seed, stats) for t in c] == expected
        assert stats.new_tokens == stats.target_forwards + stats.accepted_tokens


@pytest.mark.parametrize("method", ["tree", "tree-budget", "vote"])
def test_trees_at_the_end_of_the_context_fit(method: str) -> None:
    """Prompt + max_new_tokens fill the tiny target's 512 positions exactly: trees near the end hold
    more cache entries than positions, and must still verify (and equal plain decoding)."""
    engine = engine_for("tree", tree_budget=6) if method == "tree-budget" else engine_for(method)
    prompt = [2 + (7 * i) % 90 for i in range(500)]
    plain = engine_for("ar")
    expected = [t for c in plain.token_chunks(prompt, 12, SAMPLINGS[0], 0, DecodeStats()) for t in c]
    assert [t for c in engine.token_chunks(prompt, 12, SAMPLINGS[0], 0, DecodeStats()) for t in c] == expected


def test_a_request_that_does_not_fit_leaves_the_state_in_the_pool() -> None:
    engine = engine_for("chain")
    (state,) = engine._idle
    with pytest.raises(InvalidRequestError, match="exceeds the target's context"):
        list(engine.token_chunks([5] * 500, 100, SAMPLINGS[0], 0, DecodeStats()))
    assert engine._idle == [state]


@pytest.mark.parametrize("gamma", [3, AUTO])
def test_the_pipeline_takes_its_length_from_gamma(gamma: Gamma) -> None:
    """A fixed gamma: that many drafts a job; auto: a policy that charges the target's forwards alone
    (drafting runs beside them), up to max_depth, or the self-tuning chain taking turns."""
    (state,) = engine_for("pipeline", gamma=gamma)._idle
    if gamma == AUTO:
        assert isinstance(state, PipelineChoice) and isinstance(state.turns.policy, CostModelPolicy)
        pipelined = state.pipelined
        assert isinstance(pipelined.policy, CostModelPolicy)
        assert pipelined.policy.costs.draft_token_ms == (0.0,)
        assert pipelined.lookahead == EngineConfig().max_depth
    else:
        assert isinstance(state, DsiState) and state.policy is None and state.lookahead == 3


# Taking turns with every core on a CPU: every verified row costs most of a forward.
CPU_LIKE = StepCosts({1: 30.0, 2: 50.0, 32: 640.0}, (10.0,))
# Each model on its own core: slower, on a CPU-like curve or a flat one (a GPU target, a CPU drafter).
CPU_APART = StepCosts({1: 45.0, 2: 75.0, 32: 960.0}, (14.0,))
FLAT_APART = StepCosts({1: 40.0, 2: 40.5, 32: 55.0}, (14.0,))


@pytest.mark.parametrize(
    ("apart", "pipelined"), [(FLAT_APART, True), (CPU_APART, False)], ids=["flat", "cpu"]
)
def test_the_self_tuning_pipeline_pipelines_where_the_costs_say_it_pays(
    apart: StepCosts, pipelined: bool
) -> None:
    """Taking turns with every core costs `CPU_LIKE`; each model on its own core costs `apart`. The
    drafter is the target's twin, so its acceptance stays high; with a useless one, see below."""
    target, drafter = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-twin", 1)
    config = EngineConfig(target=target.spec, method="pipeline", drafters=(drafter.spec,))
    engine = Engine.from_models(config, target, {drafter.spec: drafter}, CPU_LIKE, pipelined_costs=apart)
    plain = engine_for("ar")
    for seed in range(3):
        prompt = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        stats = DecodeStats()
        output = [t for c in engine.token_chunks(prompt, 30, SAMPLINGS[0], seed, stats) for t in c]
        assert output == generate(plain, prompt, SAMPLINGS[0], seed)
        assert stats.pipelined is pipelined and f"pipelined {'yes' if pipelined else 'no'}" in stats.summary()


def test_the_self_tuning_pipeline_takes_turns_once_its_drafter_proves_useless() -> None:
    """On the flat curve pipelining pays while the drafter is accepted (at first, the optimistic prior);
    once the running acceptance says it is not, plain decoding with every core commits more."""
    target, drafter = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-drafter", 7, layers=1)
    config = EngineConfig(target=target.spec, method="pipeline", drafters=(drafter.spec,))
    engine = Engine.from_models(config, target, {drafter.spec: drafter}, CPU_LIKE, pipelined_costs=FLAT_APART)
    (state,) = engine._idle
    assert isinstance(state, PipelineChoice) and isinstance(state.turns.policy, CostModelPolicy)
    assert state.pays()
    useless = AcceptanceStats(2)
    useless.record([(0, 1, False)] * 10)  # what the generations left behind: ten drafts rejected
    state.turns.policy.prior.stats = useless
    assert not state.pays()
    stats = DecodeStats()
    prompt = [5, 9, 14, 5, 9, 20, 33]
    output = [t for c in engine.token_chunks(prompt, 30, SAMPLINGS[0], 0, stats) for t in c]
    assert stats.pipelined is False and output == generate(engine_for("ar"), prompt, SAMPLINGS[0], 0)
