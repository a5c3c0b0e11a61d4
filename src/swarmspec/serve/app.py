"""The HTTP server: OpenAI's completions and chat completions (streamed by server-sent events or not),
models, health and Prometheus metrics, over one engine per target and speculation method. One process may
serve several targets (the request's `model` chooses), their draft models loaded once for all of them.

Generations run on worker threads in arrival order: one at a time, or with continuous batching
(`--max-batch N`, PyTorch and llama.cpp targets) up to N at once, their target forwards batched step by step
(`runners.batch`), as far as a KV budget in cache tokens allows. Requests wait in a bounded queue, and
when it is full a new request gets 503 with Retry-After at once instead of hanging. A worker also
builds a method's engine on its first request. A client that disconnects stops its generation
(at the next text piece the decode loop yields).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from swarmspec.config import DEFAULT_KV_BUDGET, METHODS, GenerationRequest
from swarmspec.engine import Engine, GenerationResult
from swarmspec.errors import InvalidRequestError, SwarmspecError
from swarmspec.serve.engines import MethodEngines
from swarmspec.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseIds,
    error_body,
    usage,
)

logger = logging.getLogger("swarmspec.serve")

# Seconds a client told "queue full" is asked to wait before retrying.
RETRY_AFTER_S = 1
# How often a waiting non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 1.0


class Metrics:
    """What /metrics exposes, in a registry of its own (several servers may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swarmspec_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge("swarmspec_queue_depth", "generations waiting to start", registry=r)
        self.running = Gauge("swarmspec_running_batch_size", "generations running now", registry=r)
        self.generated = Counter("swarmspec_generated_tokens", "tokens generated", registry=r)
        self.drafted = Counter("swarmspec_drafted_tokens", "drafted tokens the target verified", registry=r)
        self.accepted = Counter("swarmspec_accepted_tokens", "drafted tokens the target accepted", registry=r)
        self.forwards = Counter("swarmspec_target_forwards", "target forward passes", registry=r)
        self.acceptance = Gauge(
            "swarmspec_acceptance_rate", "accepted / drafted tokens, last generation", registry=r
        )
        self.tokens_per_s = Gauge(
            "swarmspec_tokens_per_second", "tokens/s of the last generation", registry=r
        )
        self.draft_depth = Gauge(
            "swarmspec_speculation_length",
            "mean verified draft depth when drafting, last generation",
            registry=r,
        )
        self.ttft = Histogram(
            "swarmspec_time_to_first_token_seconds", "queueing + prefill + first forward", registry=r
        )

    def record(self, result: GenerationResult) -> None:
        totals = result.stats.totals()
        self.generated.inc(totals.new_tokens)
        self.drafted.inc(totals.drafted_tokens)
        self.accepted.inc(totals.accepted_tokens)
        self.forwards.inc(totals.target_forwards)
        self.tokens_per_s.set(totals.tokens_per_s)
        self.acceptance.set(totals.acceptance_rate or 0.0)
        self.draft_depth.set(totals.mean_draft_depth or 0.0)


@dataclass
class Job:
    """One generation handed to the workers; its events come back on `events` in the server's loop."""

    engine: Callable[[], Engine]  # called on a worker thread
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    kv_tokens: int  # cache it may fill: prompt + max_tokens
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class KvBudget:
    """Cache tokens (prompt + max_tokens) the running generations may fill together. A job waits
    until its tokens fit; one alone always fits (longer requests are refused before they queue)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.reserved = 0
        self._changed = threading.Condition()

    def reserve(self, tokens: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.reserved == 0 or self.reserved + tokens <= self.tokens)
            self.reserved += tokens

    def release(self, tokens: int) -> None:
        with self._changed:
            self.reserved -= tokens
            self._changed.notify_all()


class Worker:
    """Runs up to `concurrency` jobs at once (threads taking jobs in arrival order from a bounded queue;
    with continuous batching their target forwards run together), within a KV budget."""

    def __init__(
        self, max_queue: int, metrics: Metrics, concurrency: int = 1, kv_budget: int = 1 << 62
    ) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.budget = KvBudget(kv_budget)
        self.running = 0
        self._count_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, name=f"swarmspec-worker-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> bool:
        """False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        self.metrics.queue_depth.set(self.jobs.qsize())
        return True

    def stop(self) -> None:
        """Drop the waiting jobs, let the running ones end (or their clients' cancel), end the threads."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        for _ in self.threads:
            with contextlib.suppress(queue.Full):
                self.jobs.put(None, timeout=5)
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.metrics.queue_depth.set(self.jobs.qsize())
            if job.cancelled.is_set():
                continue
            self.budget.reserve(job.kv_tokens)
            self._count(+1)
            try:
                self._generate(job)
            except Exception:  # never lose a worker: the next request must still be served
                logger.exception("generation failed")
            finally:
                self._count(-1)
                self.budget.release(job.kv_tokens)

    def _count(self, change: int) -> None:
        with self._count_lock:
            self.running += change
            self.metrics.running.set(self.running)

    def _generate(self, job: Job) -> None:
        def emit(kind: str, value: Any) -> None:
            if not job.cancelled.is_set():  # nobody listens to a cancelled job
                job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

        try:
            stream = job.engine().stream(job.request)
            pieces = iter(stream)
            try:
                for i, piece in enumerate(pieces):
                    if i == 0:
                        self.metrics.ttft.observe(time.perf_counter() - job.submitted)
                    emit("text", piece)
                    if job.cancelled.is_set():
                        return
            finally:
                pieces.close()  # stops the decode loop (no more target forwards) if it is still running
            assert stream.result is not None
            self.metrics.record(stream.result)
            emit("done", stream.result)
        except InvalidRequestError as err:
            emit("error", (400, str(err)))
        except SwarmspecError as err:  # the server's side: a model that will not load, a worker that died
            logger.error("generation failed: %s", err)
            emit("error", (500, str(err)))
        except Exception as err:  # a bug or a crashed drafter: the request fails, the server lives
            logger.exception("generation failed")
            emit("error", (500, f"generation failed: {type(err).__name__}: {err}"))


class Server:
    """The app's state: the targets served, by the model name clients send (the first is the default;
    each with its engines per method, made on first use), the worker they share and the metrics."""

    def __init__(
        self,
        models: Mapping[str, MethodEngines],
        default_method: str,
        max_queue: int,
        default_max_tokens: int,
        kv_budget: int = DEFAULT_KV_BUDGET,
    ) -> None:
        if not models:
            raise ValueError("a server needs at least one target")
        self.models = dict(models)
        self.default_model = next(iter(self.models))
        self.default_method = default_method
        self.default_max_tokens = default_max_tokens
        self.kv_budget = kv_budget
        self.metrics = Metrics()
        # With continuous batching up to max_batch generations run at once, whatever their targets;
        # else one at a time.
        max_batch = max(engines.config.max_batch for engines in self.models.values())
        self.worker = Worker(max_queue, self.metrics, max_batch, kv_budget)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.worker.stop)

    app = FastAPI(
        title="swarmspec", description="lossless speculative inference, OpenAI-compatible", lifespan=lifespan
    )
    app.state.server = server

    def error(status: int, message: str, endpoint: str, **headers: str) -> JSONResponse:
        server.metrics.requests.labels(endpoint, str(status)).inc()
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, kind), status_code=status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error(400, f"invalid request: {problems}", request.url.path)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"object": "model", "created": 0, "owned_by": "swarmspec"}
        return {"object": "list", "data": [{"id": name, **card} for name in server.models]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def serve(
        body: CompletionRequest | ChatCompletionRequest, endpoint: str, request: Request
    ) -> Response:
        model = server.default_model if body.model is None else body.model
        if model not in server.models:
            served = ", ".join(repr(name) for name in server.models)
            return error(404, f"model {body.model!r} is not served here; this server runs {served}", endpoint)
        engines = server.models[model]
        method = body.method or server.default_method
        if method not in METHODS:
            return error(400, f"unknown method {method!r}; choose one of {', '.join(METHODS)}", endpoint)
        try:
            default_max_tokens = (
                DEFAULT_COMPLETION_TOKENS
                if isinstance(body, CompletionRequest)
                else server.default_max_tokens
            )
            generation = body.to_generation(default_max_tokens)
            # A streamed request gets its 400 here too, before it queues.
            prompt_tokens = await asyncio.to_thread(engines.check, generation)
            kv_tokens = prompt_tokens + generation.max_new_tokens
            if kv_tokens > server.kv_budget:
                raise InvalidRequestError(
                    f"prompt ({prompt_tokens} tokens) + max_tokens ({generation.max_new_tokens}) exceeds the "
                    f"server's KV budget of {server.kv_budget} tokens"
                )
        except SwarmspecError as err:
            return error(400, str(err), endpoint)
        job = Job(lambda: engines(method), generation, asyncio.get_running_loop(), kv_tokens)
        if not server.worker.submit(job):
            return error(
                503,
                "the server is busy: the queue is full, retry later",
                endpoint,
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        ids = ResponseIds("completion" if isinstance(body, CompletionRequest) else "chat", model)
        if body.stream:
            server.metrics.requests.labels(endpoint, "200").inc()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse_events(job, ids, include_usage, request), media_type="text/event-stream"
            )
        text = []
        getter = asyncio.ensure_future(job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await request.is_disconnected():  # nobody will read the answer: stop generating
                        server.metrics.requests.labels(endpoint, "disconnected").inc()
                        return Response(status_code=499)
                    continue
                kind, value = getter.result()
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    return error(value[0], value[1], endpoint)
                else:
                    result: GenerationResult = value
                    break
                getter = asyncio.ensure_future(job.events.get())
        finally:
            getter.cancel()
            job.cancelled.set()  # a no-op for a finished job
        server.metrics.requests.labels(endpoint, "200").inc()
        totals = result.stats.totals()
        stats = {
            "method": method,
            "target_forwards": totals.target_forwards,
            "drafted_tokens": totals.drafted_tokens,
            "accepted_tokens": totals.accepted_tokens,
            "tokens_per_s": round(totals.tokens_per_s, 3),
        }
        used = usage(result.stats.prompt_tokens, len(result.token_ids))
        return JSONResponse(ids.full("".join(text), result.finish_reason, used, stats))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve(body, "/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serve(body, "/v1/chat/completions", request)

    return app


async def sse_events(job: Job, ids: ResponseIds, include_usage: bool, request: Request) -> AsyncIterator[str]:
    """Server-sent events: a chunk per text piece, the closing chunk, the usage (if asked), [DONE]."""

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    first = True
    try:
        while True:
            kind, value = await job.events.get()
            if await request.is_disconnected():
                job.cancelled.set()
                return
            if kind == "text":
                yield event(ids.chunk(value, first=first))
                first = False
            elif kind == "error":
                yield event(
                    error_body(value[1], "server_error" if value[0] >= 500 else "invalid_request_error")
                )
                break
            else:
                result: GenerationResult = value
                if first:  # nothing was generated: the chat role still opens the message
                    yield event(ids.chunk("", first=True))
                yield event(ids.chunk(None, finish_reason=result.finish_reason))
                if include_usage:
                    yield event(ids.usage_chunk(usage(result.stats.prompt_tokens, len(result.token_ids))))
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away mid-stream: stop generating for it
        job.cancelled.set()
