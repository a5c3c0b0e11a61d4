"""The load benchmark (`swarmspec bench-serve`): concurrent streaming clients against the real server.

One server per speculation length (fixed gammas and `auto`, the batch-aware policy), all over one copy
of the weights, each with continuous batching. For every concurrency level, interleaved over the
servers, `concurrency` clients (the official `openai` client, streaming) send the requests one after
another; the benchmark records throughput, per-request latency and time to first token, and the
speculation the server chose (drafted tokens per sequence per step, from its /metrics). Every greedy
answer is compared with the same request served alone by plain decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from swarmspec.bench.order import balanced_cycle, balanced_order
from swarmspec.bench.questions import Question, load_questions
from swarmspec.config import AUTO, ChatMessage, EngineConfig, Gamma, GenerationRequest, LoadBenchConfig
from swarmspec.engine import Engine
from swarmspec.errors import InvalidRequestError
from swarmspec.models.loading import LoadedModel, load_model
from swarmspec.profile import device_name
from swarmspec.serve.app import Server, create_app
from swarmspec.serve.engines import MethodEngines

MODEL_NAME = "bench"


@dataclass(frozen=True)
class LoadResult:
    """One server (speculation length) at one concurrency level."""

    gamma: str  # "0", "2", ..., or "auto"
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    latency_s: list[float]  # per request, send to last token
    ttft_s: list[float]  # per request, send to first token
    drafted_per_step: float  # drafted tokens the target verified per sequence per forward
    texts: list[str]  # the answers, in request order
    round: int = 0  # which pass over the levels

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def summary(self) -> dict[str, float | int | str]:
        def pct(values: list[float], q: int) -> float:
            if len(values) == 1:
                return values[0]
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

        return {
            "gamma": self.gamma,
            "concurrency": self.concurrency,
            "round": self.round,
            "requests": self.requests,
            "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "latency_p50_s": round(pct(self.latency_s, 50), 3),
            "latency_p90_s": round(pct(self.latency_s, 90), 3),
            "latency_p99_s": round(pct(self.latency_s, 99), 3),
            "ttft_p50_s": round(pct(self.ttft_s, 50), 3),
            "ttft_p90_s": round(pct(self.ttft_s, 90), 3),
            "drafted_per_step": round(self.drafted_per_step, 3),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server: Server) -> Iterator[str]:
    """The server on a free local port, in a thread (its base URL)."""
    port = free_port()
    app = create_app(server)
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=60)


def counters(url: str) -> dict[str, float]:
    """The server's drafted-token and target-forward counters."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return {
        name: sum(s.value for s in families[name].samples if s.name.endswith("_total"))
        for name in ("swarmspec_drafted_tokens", "swarmspec_target_forwards")
    }


@dataclass(frozen=True)
class Outcome:
    text: str
    completion_tokens: int
    latency_s: float
    ttft_s: float


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> Outcome:
    """One streamed greedy chat completion."""
    start = time.perf_counter()
    first = None
    pieces = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Outcome("".join(pieces), tokens, end - start, (first or end) - start)


async def load(
    url: str, prompts: Sequence[str], concurrency: int, max_tokens: int
) -> tuple[list[Outcome], float]:
    """`concurrency` clients taking the prompts in order: each request's outcome, and the wall time."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    outcomes: list[Outcome | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))

    async def client_loop() -> None:
        for i in next_index:
            outcomes[i] = await one_request(client, prompts[i], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return [o for o in outcomes if o is not None], wall


def run_level(
    url: str, gamma: Gamma, prompts: Sequence[str], concurrency: int, max_tokens: int
) -> LoadResult:
    before = counters(url)
    outcomes, wall = asyncio.run(load(url, prompts, concurrency, max_tokens))
    after = counters(url)
    forwards = after["swarmspec_target_forwards"] - before["swarmspec_target_forwards"]
    drafted = after["swarmspec_drafted_tokens"] - before["swarmspec_drafted_tokens"]
    return LoadResult(
        str(gamma),
        concurrency,
        len(prompts),
        sum(o.completion_tokens for o in outcomes),
        wall,
        [o.latency_s for o in outcomes],
        [o.ttft_s for o in outcomes],
        drafted / forwards if forwards else 0.0,
        [o.text for o in outcomes],
    )


@dataclass
class LoadReport:
    config: LoadBenchConfig
    device: str
    results: list[LoadResult]
    reference: dict[str, str]  # prompt -> its answer served alone by plain decoding (no batching)

    def mismatches(self) -> list[tuple[str, int, int]]:
        """(gamma, concurrency, request index) of every answer that differs from the reference."""
        prompts = level_prompts(self.config, self.questions)
        return [
            (r.gamma, r.concurrency, i)
            for r in self.results
            for i, text in enumerate(r.texts)
            if text != self.reference[prompts[r.concurrency][i]]
        ]

    @property
    def questions(self) -> list[Question]:
        return bench_questions(self.config)

    def throughput(self, concurrency: int, gamma: str) -> tuple[float, list[float]]:
        """The median tokens/s over the rounds of one server at one level, and each round's."""
        rounds = [r.tokens_per_s for r in self.results if r.concurrency == concurrency and r.gamma == gamma]
        return (statistics.median(rounds) if rounds else 0.0), rounds

    def paired_ratios(self, concurrency: int, gamma: str) -> list[float]:
        """Per round, auto's tokens/s over `gamma`'s in the same round: the machine's drift between
        rounds (a shared host) cancels out of each ratio."""
        by_round = {(r.round, r.gamma): r.tokens_per_s for r in self.results if r.concurrency == concurrency}
        rounds = sorted({round_ for round_, _ in by_round})
        return [
            by_round[(n, AUTO)] / by_round[(n, gamma)]
            for n in rounds
            if (n, AUTO) in by_round and by_round.get((n, gamma))
        ]

    def best_fixed(self, concurrency: int) -> str | None:
        """The fixed speculation length with the highest median throughput at this level."""
        fixed = {r.gamma for r in self.results if r.concurrency == concurrency and r.gamma != AUTO}
        return max(sorted(fixed), key=lambda g: self.throughput(concurrency, g)[0], default=None)

    def markdown(self) -> str:
        c = self.config
        mismatches = self.mismatches()
        lines = [
            f"# swarmspec bench-serve: {c.target}, {c.method} with {', '.join(c.drafters)}",
            "",
            f"Device: {self.device}. Continuous batching up to {max(c.concurrency)} sequences; greedy; "
            f"{c.max_tokens} tokens per request; {len(self.questions)} questions cycled; each level sends "
            f"max({c.requests_per_client} x concurrency, {c.min_requests}) requests from `concurrency` "
            "streaming clients (official `openai` client), the servers interleaved level by level "
            f"(their order a balanced Latin square: over every {balanced_cycle(len(c.gammas))} rounds each "
            "runs in every place, and right after every other, equally often); "
            f"{c.rounds} round(s) over all levels, throughput the median over rounds.",
            "",
            "Greedy outputs identical to the same request served alone by plain decoding: "
            + ("**all** of them" if not mismatches else f"**{len(mismatches)} differ**: {mismatches[:10]}"),
            "",
            "## Batch-aware policy (`auto`) against the best fixed length",
            "",
            "auto / best: the ratio of the medians; per round: auto over the best fixed length in the same "
            "round, and their median.",
            "",
            "| concurrency | auto tokens/s (rounds) | best fixed | its tokens/s (rounds) | auto / best | "
            "per round (median) |",
            "|---|---|---|---|---|---|",
        ]

        def shown(level: int, gamma: str) -> str:
            median, rounds = self.throughput(level, gamma)
            return (
                f"{median:.1f} ({', '.join(f'{t:.1f}' for t in rounds)})"
                if len(rounds) > 1
                else f"{median:.1f}"
            )

        for level in c.concurrency:
            best = self.best_fixed(level)
            auto = self.throughput(level, AUTO)[0]
            if auto and best:
                ratio = auto / self.throughput(level, best)[0]
                paired = self.paired_ratios(level, best)
                per_round = f"{', '.join(f'{r:.2f}' for r in paired)} ({statistics.median(paired):.2f}x)"
                lines.append(
                    f"| {level} | {shown(level, AUTO)} | gamma {best} | {shown(level, best)} | "
                    f"{ratio:.2f}x | {per_round} |"
                )
        lines += [
            "",
            "## Every run",
            "",
            "| round | concurrency | gamma | tokens/s | latency p50 / p90 / p99 (s) | TTFT p50 / p90 (s) | "
            "drafted per sequence-step | requests |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            s = r.summary()
            lines.append(
                f"| {r.round} | {r.concurrency} | {r.gamma} | {r.tokens_per_s:.1f} | {s['latency_p50_s']} / "
                f"{s['latency_p90_s']} / {s['latency_p99_s']} | {s['ttft_p50_s']} / {s['ttft_p90_s']} | "
                f"{r.drafted_per_step:.2f} | {r.requests} |"
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "device": self.device,
            "mismatches": self.mismatches(),
            "results": [r.summary() | {"texts": r.texts} for r in self.results],
        }

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        levels = list(self.config.concurrency)
        for gamma in dict.fromkeys(r.gamma for r in self.results):
            style = {"linewidth": 2.5, "color": "black"} if gamma == AUTO else {}
            ax.plot(
                levels,
                [self.throughput(level, gamma)[0] for level in levels],
                marker="o",
                label=f"gamma {gamma}",
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(self.config.concurrency), [str(c) for c in self.config.concurrency])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("throughput (generated tokens/s)")
        ax.set_title("swarmspec bench-serve: fixed speculation lengths vs batch-aware auto")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def write(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out_dir / "bench-serve.json",
            "markdown": out_dir / "bench-serve.md",
            "plot": out_dir / "throughput.png",
        }
        paths["json"].write_text(json.dumps(self.to_json(), indent=1))
        paths["markdown"].write_text(self.markdown())
        self.plot(paths["plot"])
        return paths


def bench_questions(config: LoadBenchConfig) -> list[Question]:
    """The questions, families interleaved (one of each in turn), so every level mixes them."""
    questions = load_questions(config.questions)
    by_family: dict[str, list[Question]] = {}
    for question in questions:
        by_family.setdefault(question.family, []).append(question)
    interleaved = [q for group in itertools.zip_longest(*by_family.values()) for q in group if q is not None]
    if not interleaved:
        raise InvalidRequestError("no benchmark questions")
    return interleaved


def level_prompts(config: LoadBenchConfig, questions: Sequence[Question]) -> dict[int, list[str]]:
    """Each concurrency level's prompts, in the order they are sent."""
    return {
        level: [
            questions[i % len(questions)].prompt
            for i in range(max(config.requests_per_client * level, config.min_requests))
        ]
        for level in config.concurrency
    }


def run_load_bench(
    config: LoadBenchConfig,
    target: LoadedModel | None = None,
    draft_models: Mapping[str, LoadedModel] | None = None,
) -> LoadReport:
    """Every speculation length at every concurrency level (levels in turn, servers interleaved within
    a level), and the reference: each distinct request served alone by plain decoding. The models are
    loaded from the config unless given."""
    questions = bench_questions(config)
    prompts = level_prompts(config, questions)
    engine_config = EngineConfig(
        target=config.target,
        method=config.method,
        drafters=config.drafters,
        max_depth=config.max_depth,
        max_batch=max(config.concurrency),
    )
    if target is None:
        print(f"loading {config.target} ...", file=sys.stderr, flush=True)
        target = load_model(config.target)
    if draft_models is None:
        draft_models = {spec: load_model(spec) for spec in engine_config.model_drafters}
    servers = {}
    for gamma in config.gammas:
        method = "ar" if gamma == 0 else config.method
        engines = MethodEngines(
            replace(engine_config, method=method, gamma=AUTO if gamma == 0 else gamma), target, draft_models
        )
        servers[gamma] = Server(
            {MODEL_NAME: engines},
            method,
            max_queue=4 * max(config.concurrency),
            default_max_tokens=config.max_tokens,
        )
    results: list[LoadResult] = []
    with contextlib.ExitStack() as stack:
        urls = {gamma: stack.enter_context(serving(server)) for gamma, server in servers.items()}
        for gamma, url in urls.items():  # builds the engines (and measures their costs) before timing
            print(f"warming up the gamma {gamma} server ...", file=sys.stderr, flush=True)
            asyncio.run(load(url, [questions[0].prompt], 1, 4))
        servers_in_turn = list(urls.items())
        for round_ in range(config.rounds):
            for level in config.concurrency:
                # No server always runs first at a level (after the change of batch size), last, or
                # right after the same other server (`balanced_order`).
                for index in balanced_order(len(servers_in_turn), round_):
                    gamma, url = servers_in_turn[index]
                    result = replace(
                        run_level(url, gamma, prompts[level], level, config.max_tokens), round=round_
                    )
                    print(
                        f"  round {round_}, concurrency {level:>2}, gamma {gamma!s:>4}: "
                        f"{result.tokens_per_s:7.2f} tokens/s, {result.drafted_per_step:.2f} drafted per "
                        "sequence-step",
                        file=sys.stderr,
                        flush=True,
                    )
                    results.append(result)
    reference = reference_answers(
        replace(engine_config, method="ar", max_batch=1), target, prompts, config.max_tokens
    )
    return LoadReport(config, device_name(), results, reference)


def reference_answers(
    config: EngineConfig, target: LoadedModel, prompts: dict[int, list[str]], max_tokens: int
) -> dict[str, str]:
    """Each distinct prompt's answer served alone by plain decoding, without batching."""
    engine = Engine.from_models(config, target, {})
    distinct = list(dict.fromkeys(p for level in prompts.values() for p in level))
    print(
        f"reference: {len(distinct)} requests served alone by plain decoding ...", file=sys.stderr, flush=True
    )
    return {
        prompt: engine.generate(
            GenerationRequest(messages=(ChatMessage("user", prompt),), max_new_tokens=max_tokens)
        ).text
        for prompt in distinct
    }
