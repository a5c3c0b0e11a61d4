"""DSI with Ray actors (local Ray, started by the test): target instances and the drafter in other
processes give exactly plain decoding; an actor that dies fails the request clearly, never with a wrong
token."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

from swarmspec.config import EngineConfig
from swarmspec.drafters.model import ModelDrafter
from swarmspec.dsi.orchestrator import dsi_decode
from swarmspec.dsi.ray_workers import RayDrafter, RayInstance, start_ray
from swarmspec.engine import Engine
from swarmspec.errors import SwarmspecError
from swarmspec.metrics import DecodeStats
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.verify import make_verifier

from test_decode_greedy import prompt_for
from test_dsi_orchestrator import ReferenceDrafter
from tiny_models import run_decode, tiny_loaded, tiny_qwen2

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starting Ray takes seconds


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_ray()
    yield
    ray.shutdown()


def kill_and_wait(actor) -> None:
    """Kill an actor and wait until it is dead: `ray.kill` only asks, and calls made meanwhile may still
    be served."""
    ray.kill(actor)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(300):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
            time.sleep(0.1)


def run(instances, drafter, prompt, max_new_tokens: int, stats: DecodeStats | None = None) -> list[int]:
    greedy = SamplingConfig()
    chunks = dsi_decode(
        instances, drafter, make_verifier(greedy), prompt, max_new_tokens=max_new_tokens, lookahead=3,
        sampling=greedy, stop_token_ids=frozenset(), generator=torch.Generator().manual_seed(0),
        stats=stats or DecodeStats(),
    )  # fmt: skip
    return [t for chunk in chunks for t in chunk]


@pytest.mark.parametrize("seed", range(3))
def test_ray_actors_match_plain_decoding(seed: int) -> None:
    target = tiny_qwen2(seed)
    prompt = prompt_for(seed, 4 + 3 * seed)
    reference, _ = run_decode(target, None, prompt, 30)
    instances = [RayInstance(functools.partial(HFRunner, target), num_cpus=0) for _ in range(2)]
    # A drafter in an actor of its own (an agreeing one: the target itself), and one in this process.
    # Factories are pickled into the actors: only swarmspec's own classes are imported there by name.
    drafter = RayDrafter(functools.partial(ModelDrafter, HFRunner(target)), num_cpus=0)
    assert run(instances, drafter, prompt, 30) == reference
    scripted = ReferenceDrafter(reference, len(prompt), wrong={2, 9, 10})
    assert run(instances, scripted, prompt, 30) == reference


def test_a_dying_actor_fails_the_request_and_commits_nothing_wrong() -> None:
    target = tiny_qwen2(1)
    prompt = prompt_for(1, 6)
    reference, _ = run_decode(target, None, prompt, 200)
    instances = [RayInstance(functools.partial(HFRunner, target), num_cpus=0) for _ in range(2)]
    greedy = SamplingConfig()
    chunks = dsi_decode(
        instances, ReferenceDrafter(reference, len(prompt), wrong={5, 40}), make_verifier(greedy), prompt,
        max_new_tokens=200, lookahead=2, sampling=greedy, stop_token_ids=frozenset(),
        generator=torch.Generator().manual_seed(0), stats=DecodeStats(),
    )  # fmt: skip
    output = list(next(chunks))
    threading.Timer(0.05, ray.kill, args=(instances[1].actor,)).start()
    with pytest.raises(SwarmspecError, match="Ray target actor died"):
        for chunk in chunks:
            output.extend(chunk)
    assert output == reference[: len(output)]


def test_an_engine_with_ray_workers_equals_plain_decoding() -> None:
    target, drafter = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-drafter", 7, layers=1)
    plain = Engine.from_models(EngineConfig(target=target.spec, method="ar"), target, {})
    config = EngineConfig(target=target.spec, method="dsi", drafters=(drafter.spec,), workers="ray")
    engine = Engine.from_models(config, target, {drafter.spec: drafter})
    for seed in range(2):
        prompt = prompt_for(seed, 9)
        expected = [t for c in plain.token_chunks(prompt, 24, SamplingConfig(), 0, DecodeStats()) for t in c]
        stats = DecodeStats()
        assert [t for c in engine.token_chunks(prompt, 24, SamplingConfig(), 0, stats) for t in c] == expected
        assert stats.new_tokens == len(expected)


def test_after_an_actor_dies_the_engine_serves_with_new_actors() -> None:
    target = tiny_loaded("tiny-target", 2)
    plain = Engine.from_models(EngineConfig(target=target.spec, method="ar"), target, {})
    config = EngineConfig(target=target.spec, method="dsi", drafters=("prompt-lookup",), workers="ray")
    engine = Engine.from_models(config, target, {})
    prompt = prompt_for(3, 9)
    expected = [t for c in plain.token_chunks(prompt, 20, SamplingConfig(), 0, DecodeStats()) for t in c]
    (state,) = engine._idle  # the warmed-up state the next generation takes
    kill_and_wait(state.instances[0].actor)
    with pytest.raises(SwarmspecError, match="Ray target actor died"):
        list(engine.token_chunks(prompt, 20, SamplingConfig(), 0, DecodeStats()))
    assert engine._idle == []  # not put back
    assert [
        t for c in engine.token_chunks(prompt, 20, SamplingConfig(), 0, DecodeStats()) for t in c
    ] == expected


def test_a_dead_drafter_actor_is_replaced_on_the_next_request() -> None:
    target, drafter = tiny_loaded("tiny-target", 3), tiny_loaded("tiny-drafter", 3)
    config = EngineConfig(target=target.spec, method="dsi", drafters=(drafter.spec,), workers="ray")
    engine = Engine.from_models(config, target, {drafter.spec: drafter})
    (state,) = engine._idle
    kill_and_wait(state.drafter.actor)
    prompt = prompt_for(4, 9)
    first = [t for c in engine.token_chunks(prompt, 16, SamplingConfig(), 0, DecodeStats()) for t in c]
    assert engine._idle == []  # plain decoding finished the request; the state was not reused
    assert [
        t for c in engine.token_chunks(prompt, 16, SamplingConfig(), 0, DecodeStats()) for t in c
    ] == first
    (fresh,) = engine._idle  # a new state, with a live drafter actor, went back to the pool
    assert fresh is not state and fresh.healthy and ray.get(fresh.drafter.actor.call.remote("end")) is None
