"""DSI's target instances and drafter as Ray actors, so that one generation spans processes or machines.

The manager (`dsi_decode`) is unchanged: a `RayInstance` is a `TargetInstance` whose `verify` runs in
an actor, and a `RayDrafter` is a `Drafter` whose calls run in one. Each actor builds its model from a
picklable factory in its own process (a process holds its own copy of the weights). A dead actor fails
the generation with a clear error; nothing it computed after a rejection is ever committed, because
stale results are dropped by epoch in the manager whatever process they come from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.dsi.orchestrator import Job, LocalInstance
from swarmspec.errors import SwarmspecError
from swarmspec.runners.base import ModelRunner
from swarmspec.sampling import SamplingConfig

# How long an actor may take to be placed and to load (or download) its model before the request fails.
PLACEMENT_TIMEOUT_S = 900.0


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise SwarmspecError(f"--workers ray needs the ray package (`pip install ray`): {err}") from None
    return ray


def start_ray(address: str | None = None) -> None:
    """Join the cluster at `address`, or start a Ray of its own on this machine (once per process; never
    a cluster found through RAY_ADDRESS or `ray start`, which only `address` joins)."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(
            address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False
        )


class RayActor:
    """A part of a generation that lives in a Ray actor."""

    actor: Any
    dead = False  # set once a call found the actor dead

    def kill(self) -> None:
        """Stop the actor (its process's resources go back to the cluster)."""
        _ray().kill(self.actor)

    def _get(self, ref: Any, role: str, timeout: float | None = None) -> Any:
        ray = _ray()
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError as err:
            self.dead = True
            raise SwarmspecError(f"a Ray {role} actor died: {err}") from None
        except ray.exceptions.GetTimeoutError:
            raise SwarmspecError(
                f"a Ray {role} actor was not ready after {timeout:.0f} s: no free CPU in the cluster, or "
                "its model is still loading (or downloading)"
            ) from None


class _TargetActor:
    def __init__(self, new_runner: Callable[[], ModelRunner]) -> None:
        torch.set_num_threads(1)  # one core per actor unless its runner says otherwise (llama.cpp threads)
        self.instance = LocalInstance(new_runner())

    def max_length(self) -> int:
        return self.instance.max_length

    def verify(self, job: Job) -> torch.Tensor:
        return self.instance.verify(job)


class RayInstance(RayActor):
    """A target instance in a Ray actor; `new_runner` is called there."""

    def __init__(self, new_runner: Callable[[], ModelRunner], num_cpus: float = 1) -> None:
        ray = _ray()
        actor_class = ray.remote(num_cpus=num_cpus, max_restarts=0)(_TargetActor)
        self.actor = actor_class.remote(new_runner)
        self.max_length = self._get(self.actor.max_length.remote(), "target", timeout=PLACEMENT_TIMEOUT_S)

    def verify(self, job: Job) -> torch.Tensor:
        return self._get(self.actor.verify.remote(job), "target")


class _DrafterActor:
    def __init__(self, new_drafter: Callable[[], Drafter]) -> None:
        torch.set_num_threads(1)
        self.drafter = new_drafter()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.drafter, method)(*args)

    def propose(
        self, context: list[int], max_tokens: int, sampling: SamplingConfig, seed: int | None
    ) -> Draft:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.drafter.propose(context, max_tokens, sampling, generator)


class RayDrafter(Drafter, RayActor):
    """A drafter in a Ray actor: every call is forwarded to it."""

    def __init__(self, new_drafter: Callable[[], Drafter], num_cpus: float = 1) -> None:
        ray = _ray()
        self.actor = ray.remote(num_cpus=num_cpus, max_restarts=0)(_DrafterActor).remote(new_drafter)
        self._get(self.actor.call.remote("end"), "drafter", timeout=PLACEMENT_TIMEOUT_S)  # placed and loaded

    def begin(self, prompt_ids: list[int]) -> None:
        self._get(self.actor.call.remote("begin", prompt_ids), "drafter")

    def observe(self, committed: list[int]) -> None:
        self._get(self.actor.call.remote("observe", committed), "drafter")

    def end(self) -> None:
        self._get(self.actor.call.remote("end"), "drafter")

    def propose(
        self,
        context: list[int],
        max_tokens: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        # The generator stays here: the actor samples from one seeded by a draw from it.
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
        return self._get(self.actor.propose.remote(context, max_tokens, sampling, seed), "drafter")
