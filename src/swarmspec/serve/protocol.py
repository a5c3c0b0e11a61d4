"""The OpenAI API's request bodies (the fields swarmspec serves) and its response objects.

Requests are validated here into `GenerationRequest`s; anything the engine cannot honour (n > 1,
logprobs, penalties) is refused with a clear message instead of being silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from swarmspec.config import ChatMessage, GenerationRequest
from swarmspec.errors import InvalidRequestError
from swarmspec.sampling import SamplingConfig

# What OpenAI's API does when a field is left out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_COMPLETION_TOKENS = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    # swarmspec's extension (the `openai` client's `extra_body`): the speculation method for this request.
    method: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(f"n must be 1 (one choice per request), got {self.n}")
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidRequestError(
                "presence and frequency penalties are not supported (lossless decoding)"
            )
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported")

    def generation_request(self, default_max_tokens: int, **text: Any) -> GenerationRequest:
        self.check_supported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationRequest(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            sampling=SamplingConfig(temperature=self.temperature, top_p=self.top_p),
            seed=self.seed,
            stop=stop,
            **text,
        )


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False

    def to_generation(self, default_max_tokens: int) -> GenerationRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise InvalidRequestError(f"give one prompt per request, got {len(prompts)}")
        if self.echo:
            raise InvalidRequestError("echo is not supported")
        return self.generation_request(default_max_tokens, prompt=prompts[0], chat=False)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The content as text; of a list of parts, only text parts are accepted."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise InvalidRequestError("only text content is supported")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)

    def to_generation(self, default_max_tokens: int) -> GenerationRequest:
        messages = tuple(ChatMessage(m.role, m.text()) for m in self.messages)
        return self.generation_request(default_max_tokens, messages=messages, chat=True)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseIds:
    """The id, creation time and model name every object of one response carries."""

    def __init__(self, kind: Literal["completion", "chat"], model: str) -> None:
        self.kind = kind
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _object(self, obj: str, choice: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        base = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**base, "choices": [{"index": 0, **choice}], **extra}

    def full(self, text: str, finish_reason: str, usage_: dict[str, int], stats: dict[str, Any]) -> dict:
        extra = {"usage": usage_, "swarmspec": stats}
        if self.kind == "completion":
            choice = {"text": text, "finish_reason": finish_reason, "logprobs": None}
            return self._object("text_completion", choice, extra)
        message = {"role": "assistant", "content": text}
        return self._object("chat.completion", {"message": message, "finish_reason": finish_reason}, extra)

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed piece; `text` None with a finish reason closes the choice."""
        if self.kind == "completion":
            choice = {"text": text or "", "finish_reason": finish_reason, "logprobs": None}
            return self._object("text_completion", choice, {})
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return self._object("chat.completion.chunk", {"delta": delta, "finish_reason": finish_reason}, {})

    def usage_chunk(self, usage_: dict[str, int]) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        base = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**base, "choices": [], "usage": usage_}
