"""Typed configuration. The CLI (and later the server) builds these by field name, one flag per field."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmspec.errors import InvalidRequestError
from swarmspec.models.registry import DEFAULT_DRAFTER, DEFAULT_TARGET
from swarmspec.sampling import SamplingConfig

METHODS = ("ar", "chain")


@dataclass(frozen=True)
class EngineConfig:
    # Registered name, local checkpoint dir, .gguf file or hub id of the model whose output we promise.
    target: str = DEFAULT_TARGET
    # The drafter for speculative methods: a model spec, optionally prefixed "int8:" to quantize it.
    drafter: str = DEFAULT_DRAFTER
    # "ar": plain autoregressive decoding (the baseline); "chain": one drafter proposes gamma tokens.
    method: str = "chain"
    # Tokens drafted per target forward.
    gamma: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.gamma < 1:
            raise InvalidRequestError(f"gamma must be >= 1, got {self.gamma}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    # Upper bound on generated tokens; generation also stops at EOS or a stop string.
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Seeds the request's own torch.Generator; None draws a fresh seed.
    seed: int | None = None
    # Wrap the prompt in the target's chat template (as a single user turn).
    chat: bool = True
    # Generation stops when the text contains any of these; the stop string is not returned.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise InvalidRequestError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
