"""The HTTP server, run for real (uvicorn on a local port) over tiny models and called with the official
`openai` client: the text equals the engine's own output, streaming concatenates to it, bad requests get
OpenAI-style errors, a full queue answers 503 at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from swarmspec.config import ChatMessage, EngineConfig, GenerationRequest
from swarmspec.serve.app import Job, Server, create_app
from swarmspec.serve.engines import MethodEngines

from tiny_models import tiny_loaded

MODEL = "tiny"
PROMPT = "t5 t9 t14 t5 t9 t20 t33"


@pytest.fixture(scope="module")
def engines() -> MethodEngines:
    target, drafter = tiny_loaded("tiny-target", 1), tiny_loaded("tiny-drafter", 7, layers=1)
    # A minimal chat template: the turns' contents, then the assistant's turn.
    target.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}t3"
    config = EngineConfig(target=target.spec, method="vote", drafters=(drafter.spec, "prompt-lookup"))
    return MethodEngines(config, target, {drafter.spec: drafter})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engines: MethodEngines) -> Iterator[tuple[Server, str]]:
    state = Server(engines, "vote", MODEL, max_queue=2, default_max_tokens=12)
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield state, f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server: tuple[Server, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0)


def engine_text(engines: MethodEngines, method: str, **request: Any) -> str:
    return engines(method).generate(GenerationRequest(**request)).text


def test_completion_equals_the_engines_output(client: openai.OpenAI, engines: MethodEngines) -> None:
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    expected = engine_text(engines, "ar", prompt=PROMPT, chat=False, max_new_tokens=20)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage is not None and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_pieces_concatenate_to_the_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_chat_completion_and_method_override(client: openai.OpenAI, engines: MethodEngines) -> None:
    messages = [{"role": "system", "content": "t40 t41"}, {"role": "user", "content": PROMPT}]
    expected = engine_text(
        engines, "ar", messages=tuple(ChatMessage(**m) for m in messages), max_new_tokens=15
    )
    for method in ("ar", "chain", "tree", "dsi"):
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=15, temperature=0, extra_body={"method": method}
        )
        assert response.choices[0].message.content == expected
        assert response.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=15, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    # Plain decoding: with speculation, what the engine learned from the first request (suffix index,
    # vote weights, acceptance) may change the second one's drafts and so which random numbers it uses.
    texts = {
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=15, temperature=0.9, seed=5, extra_body={"method": "ar"}
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_other_methods_drop_the_tree_shape(engines: MethodEngines) -> None:
    shaped = MethodEngines(
        replace(engines.config, method="tree", tree_budget=6), engines.target, engines.draft_models
    )
    assert shaped.config_for("tree").tree_budget == 6
    assert (
        shaped.config_for("chain").tree_budget == 0
        and shaped.config_for("chain").drafters == engines.config.drafters[:1]
    )
    assert shaped.config_for("ar").drafters == ()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"prompt": PROMPT, "top_p": 2}, 400, "top_p"),
        ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": PROMPT, "n": 2}, 400, "n must be 1"),
        ({"prompt": ""}, 400, "the prompt is empty"),
        ({"prompt": PROMPT, "frequency_penalty": 0.5}, 400, "penalties are not supported"),
        ({"prompt": PROMPT, "method": "beam"}, 400, "unknown method 'beam'"),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
        ({"max_tokens": 3}, 400, "prompt: Field required"),
        ({"prompt": "t1 " * 600, "max_tokens": 5}, 400, "exceeds the target's context"),
        ({"prompt": "t1 " * 600, "max_tokens": 5, "stream": True}, 400, "exceeds the target's context"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: tuple[Server, str], body: dict, status: int, message: str
) -> None:
    response = httpx.post(f"{server[1]}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400(server: tuple[Server, str]) -> None:
    response = httpx.post(
        f"{server[1]}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "invalid request" in response.json()["error"]["message"]


def test_models_health_and_metrics(client: openai.OpenAI, server: tuple[Server, str]) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server[1]}/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    metrics = httpx.get(f"{server[1]}/metrics").text
    for name in (
        "swarmspec_generated_tokens_total",
        "swarmspec_queue_depth",
        "swarmspec_running_batch_size",
        "swarmspec_acceptance_rate",
        "swarmspec_speculation_length",
        "swarmspec_time_to_first_token_seconds_count",
        'swarmspec_requests_total{endpoint="/v1/completions",status="200"}',
    ):
        assert name in metrics


class BlockingEngine:
    """Stands in for an engine whose generation takes long: it waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        self.release.wait(timeout=60)
        raise RuntimeError("released")


def test_full_queue_answers_503_at_once(server: tuple[Server, str]) -> None:
    state, url = server
    blocker = BlockingEngine()
    loop_less = [
        Job(lambda: blocker, GenerationRequest(prompt="x"), loop=None, kv_tokens=1) for _ in range(3)
    ]  # type: ignore[arg-type]
    assert state.worker.submit(loop_less[0])
    deadline = time.monotonic() + 10
    while state.worker.jobs.qsize():  # the worker took the blocking job; now fill the queue (2)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert state.worker.submit(loop_less[1]) and state.worker.submit(loop_less[2])
    for job in loop_less:
        job.cancelled.set()  # nothing is sent back for them
    start = time.monotonic()
    response = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "queue is full" in response.json()["error"]["message"]
    assert time.monotonic() - start < 5
    blocker.release.set()
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200  # the worker survived the failing job
