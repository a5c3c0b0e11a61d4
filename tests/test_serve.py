"""The HTTP server, run for real (uvicorn on a local port) over tiny models and called with the official
`openai` client: the text equals the engine's own output, streaming concatenates to it, bad requests get
OpenAI-style errors, a full queue answers 503 at once."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmspec.bench.load import serving
from swarmspec.config import ChatMessage, EngineConfig, GenerationRequest, SortedDraft
from swarmspec.drafters.sorted import SortedDrafter
from swarmspec.models.loading import LoadedModel
from swarmspec.models.sorted import SortedExits, trained_exits_path
from swarmspec.runners.batch import TorchBatchedTarget
from swarmspec.serve.app import Job, Server
from swarmspec.serve.engines import DraftModels, MethodEngines

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


@pytest.fixture(scope="module")
def server(engines: MethodEngines) -> Iterator[tuple[Server, str]]:
    state = Server({MODEL: engines}, "vote", max_queue=2, default_max_tokens=12)
    with serving(state) as url:
        yield state, url


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
    for method in ("ar", "chain", "tree", "dsi", "pipeline"):
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


@pytest.fixture(scope="module")
def batched_server(engines: MethodEngines) -> Iterator[tuple[Server, str]]:
    """Continuous batching: up to 8 requests decode together, within a budget of 400 cache tokens; their
    prompts join the batch 4 tokens per step."""
    config = replace(
        engines.config, method="chain", drafters=engines.config.drafters[:1], max_batch=8, prefill_chunk=4
    )
    batched = MethodEngines(config, engines.target, engines.draft_models)
    state = Server({MODEL: batched}, "chain", max_queue=64, default_max_tokens=12, kv_budget=400)
    with serving(state) as url:
        yield state, url


def test_concurrent_requests_each_equal_the_request_served_alone(
    batched_server: tuple[Server, str], engines: MethodEngines
) -> None:
    """36 requests at once (half streamed, different prompts and lengths, every method) through the
    batching server: each greedy text equals that request decoded alone; the counters add up."""
    state, url = batched_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    words = PROMPT.split()
    requests = [
        {
            "prompt": " ".join([*words[i % 5 :], f"t{10 + i}"]),
            "max_tokens": 6 + i % 9,
            "method": ("chain", "ar", "tree", "vote")[i % 4],
            "stream": i % 2 == 1,
        }
        for i in range(36)
    ]

    def ask(request: dict[str, Any]) -> tuple[str, int]:
        args = {"model": MODEL, "prompt": request["prompt"], "max_tokens": request["max_tokens"]}
        extra = {"extra_body": {"method": request["method"]}, "temperature": 0}
        if not request["stream"]:
            response = client.completions.create(**args, **extra)
            assert response.usage is not None
            return response.choices[0].text, response.usage.completion_tokens
        stream = client.completions.create(
            **args, **extra, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    methods = {request["method"] for request in requests}
    engines_used = [state.models[MODEL](method) for method in methods]  # built (and costs measured) first
    (batch,) = {engine.batched for engine in engines_used}  # every method decodes in one batch
    assert isinstance(batch, TorchBatchedTarget) and batch.prefill_chunk == 4  # the server's flag
    steps_before = batch.steps
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    for request, (text, _) in zip(requests, answers, strict=True):
        alone = engine_text(
            engines, "ar", prompt=request["prompt"], chat=False, max_new_tokens=request["max_tokens"]
        )
        assert text == alone, request
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    ok = [
        s
        for s in families["swarmspec_requests"].samples
        if s.name.endswith("_total") and s.labels["status"] == "200"
    ]
    assert sum(s.value for s in ok) == len(requests)
    generated = families["swarmspec_generated_tokens"].samples[0].value
    assert generated == sum(tokens for _, tokens in answers)
    assert families["swarmspec_running_batch_size"].samples[0].value == 0
    assert families["swarmspec_queue_depth"].samples[0].value == 0
    # The methods shared target forwards: fewer batched steps than tokens generated.
    assert 0 < batch.steps - steps_before < generated


def test_a_request_beyond_the_kv_budget_is_refused(batched_server: tuple[Server, str]) -> None:
    response = httpx.post(
        f"{batched_server[1]}/v1/completions",
        json={"model": MODEL, "prompt": "t1 " * 300, "max_tokens": 200},
        timeout=60,
    )
    assert response.status_code == 400
    assert "exceeds the server's KV budget of 400 tokens" in response.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(batched_server: tuple[Server, str]) -> None:
    state, url = batched_server
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "stream": True, "method": "ar"},
        timeout=60,
    ) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # It stops generating: its worker and cache tokens are free again, and the next request is served.
    deadline = time.monotonic() + 60
    while state.worker.budget.reserved or state.worker.running:
        assert time.monotonic() < deadline, "the abandoned generation did not stop"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text


def test_one_server_serves_several_targets_over_one_sorted_draft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two targets behind one server, the request's `model` choosing: one loaded sorted draft drafts
    for both, each with the exit thresholds tuned for its target, and each answer is exactly its
    target's own plain output."""
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    draft = tiny_loaded("tiny-drafter", 7, layers=3)
    sorted_draft = LoadedModel("sorted:tiny-drafter", draft.model, draft.tokenizer)
    tuned = {"target-a": {"1": 0.2}, "target-b": {"1": 0.9}}
    SortedExits(draft.model, (1, 3)).save(trained_exits_path(draft.model, (1, 3), 0), {"thresholds": tuned})
    draft_models = DraftModels({sorted_draft.spec: sorted_draft})
    targets = {"a": tiny_loaded("target-a", 1), "b": tiny_loaded("target-b", 2)}
    served = {
        name: MethodEngines(
            EngineConfig(
                target=target.spec,
                drafters=(sorted_draft.spec,),
                sorted_draft=SortedDraft(exits=(1, 3)),
                gamma=3,
            ),
            target,
            draft_models,
        )
        for name, target in targets.items()
    }
    with serving(Server(served, "chain", max_queue=4, default_max_tokens=12)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["a", "b"]
        for name, target in targets.items():
            reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=20, temperature=0)
            assert reply.model == name
            plain = MethodEngines(EngineConfig(target=target.spec, method="ar"), target)("ar")
            expected = plain.generate(GenerationRequest(prompt=PROMPT, chat=False, max_new_tokens=20))
            assert reply.choices[0].text == expected.text
            assert reply.usage is not None and reply.usage.completion_tokens == len(expected.token_ids)
        unknown = httpx.post(f"{url}/v1/completions", json={"model": "c", "prompt": PROMPT}, timeout=30)
        assert unknown.status_code == 404 and "runs 'a', 'b'" in unknown.json()["error"]["message"]
        # No model named: the first target answers.
        default = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
        assert default.status_code == 200 and default.json()["model"] == "a"
    assert draft_models.loaded == {sorted_draft.spec: sorted_draft}  # one copy of the draft's weights
    for engines, threshold in [(served["a"], 0.2), (served["b"], 0.9)]:
        (drafter,) = engines("chain").new_state().drafters
        assert isinstance(drafter, SortedDrafter) and drafter.runner.model is draft.model
        assert drafter.thresholds == (threshold, 0.0)
