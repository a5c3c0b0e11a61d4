"""The `swarmspec` command line. Flags map one to one onto the config dataclasses' fields."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import sys
import time
from typing import Any

from swarmspec.config import (
    AUTO,
    DEFAULT_KV_BUDGET,
    HF_BASELINES,
    LLAMA_CPP_PREFIX,
    METHODS,
    MODEL_FREE_DRAFTERS,
    VARIANT_KEYS,
    WORKERS,
    BenchConfig,
    EngineConfig,
    Gamma,
    GenerationRequest,
    LoadBenchConfig,
    SimulationConfig,
    SortedDraft,
    TrainSortedConfig,
    comma_list,
    default_baselines,
    default_drafters,
    read_gamma,
)
from swarmspec.errors import SwarmspecError
from swarmspec.sampling import SamplingConfig


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["swarmspec", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except SwarmspecError as err:
        print(f"swarmspec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nswarmspec: interrupted", file=sys.stderr)
        return 130


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except empty ones (those flags say what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ((), []):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(prog="swarmspec", description="Lossless speculative inference for LLMs.")
    parser.add_argument(
        "--version", action="version", version=f"swarmspec {importlib.metadata.version('swarmspec')}"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, formatter_class=_HelpFormatter)

    gen = command("generate", "generate text for a prompt, streaming it")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt; - reads it from stdin")
    gen.add_argument("--method", choices=METHODS, default=defaults.method, help="decoding method")
    add_engine_flags(gen)
    request = GenerationRequest(prompt="-")
    gen.add_argument("--max-new-tokens", type=int, default=request.max_new_tokens, help="upper bound")
    add_sampling_flags(gen, request.sampling, request.seed)
    gen.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=request.chat,
        help="wrap the prompt in the target's chat template",
    )
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(run=run_generate)

    models = command("models", "list the registered models and what is cached")
    models.set_defaults(run=run_models)

    fetch = command("fetch", "fetch and verify registered models (llamacpp:), or convert them for PyTorch")
    fetch.add_argument(
        "names",
        nargs="*",
        default=[defaults.target, *default_drafters("chain", defaults.target)],
        metavar="MODEL",
        help="model specs",
    )
    fetch.set_defaults(run=run_fetch)

    serve = command("serve", "an OpenAI-compatible HTTP server (completions, chat completions, metrics)")
    serve.add_argument("--method", choices=METHODS, default=defaults.method, help="requests may override it")
    add_engine_flags(serve, several_targets=True)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument(
        "--model-name",
        action="append",
        help="repeatable: the model id clients send for each --target, in order (default: the target spec)",
    )
    serve.add_argument("--max-queue", type=int, default=16, help="waiting requests before 503")
    serve.add_argument(
        "--max-tokens", type=int, default=512, help="chat completions' max_tokens when a request gives none"
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help="continuous batching: up to N requests decode together (1: one at a time)",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=defaults.prefill_chunk,
        help="continuous batching on PyTorch: a new prompt's tokens prefilled per step (default: 256)",
    )
    serve.add_argument(
        "--kv-budget",
        type=int,
        default=DEFAULT_KV_BUDGET,
        help="cache tokens (prompt + max_tokens) of the running requests together",
    )
    serve.set_defaults(run=run_serve)

    prof = command("profile", "measure forward latency for k new tokens, per model")
    prof.add_argument("--target", default=defaults.target, help="model spec")
    prof.add_argument("--drafter", action="append", help="repeatable (default: the chain's drafter)")
    prof.add_argument("--max-k", type=int, default=32, help="largest k")
    prof.add_argument("--context", type=int, default=256, help="cached tokens under each timed forward")
    prof.add_argument("--repeats", type=int, default=3, help="figures are medians")
    prof.add_argument("--target-threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    prof.add_argument("--drafter-threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    prof.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also the target's batched forwards, b = 1, 2, 4, ... up to this many sequences x k = 1..8 rows "
        "each (continuous batching)",
    )
    prof.set_defaults(run=run_profile)

    bench_defaults = BenchConfig()
    bench = command("bench", "time every method against llama.cpp and transformers (Spec-Bench style)")
    bench.add_argument("--questions", help="Spec-Bench-format JSONL (default: the built-in prompt set)")
    bench.add_argument("--categories", type=comma_list, default=(), help="task families to keep, a,b,...")
    bench.add_argument("--per-category", type=int, help="first N questions per task family")
    bench.add_argument("--max-new-tokens", type=int, default=bench_defaults.max_new_tokens, help="per run")
    bench.add_argument("--methods", type=comma_list, default=bench_defaults.methods, help="comma-separated")
    bench.add_argument(
        "--baselines",
        type=comma_list,
        default=None,
        help=f"for a llamacpp: target {','.join(default_baselines(LLAMA_CPP_PREFIX))}, else "
        f"{','.join(HF_BASELINES)}; '' for none",
    )
    add_engine_flags(bench)
    add_sampling_flags(bench, bench_defaults.sampling, bench_defaults.seed)
    bench.add_argument("--repeats", type=int, default=bench_defaults.repeats, help="figures are medians")
    bench.add_argument("--out", help="report directory (default: bench-results/<UTC time>)")
    bench.add_argument(
        "--variant",
        action="append",
        metavar="NAME:method=M,key=value,...",
        help="repeatable: one more contender, method M with its own settings (keys: "
        f"{', '.join(VARIANT_KEYS)}; lists go on after commas), e.g. chain-g6:method=chain,gamma=6",
    )
    bench.set_defaults(run=run_bench)

    load_defaults = LoadBenchConfig()
    load = command(
        "bench-serve",
        "load benchmark: concurrent streaming clients against the server, fixed speculation lengths vs auto",
    )
    load.add_argument("--target", default=load_defaults.target, help="model spec")
    load.add_argument("--method", choices=METHODS, default=load_defaults.method, help="when speculating")
    load.add_argument(
        "--drafter", action="append", help=f"repeatable (default: {', '.join(load_defaults.drafters)})"
    )
    load.add_argument(
        "--concurrency", type=int_list, default=load_defaults.concurrency, help="concurrent clients per level"
    )
    load.add_argument(
        "--gammas",
        type=gamma_list,
        default=load_defaults.gammas,
        help="speculation lengths, one server each (0: plain decoding, auto: batch-aware)",
    )
    load.add_argument("--max-depth", type=int, default=load_defaults.max_depth, help="auto: deepest draft")
    load.add_argument(
        "--requests-per-client", type=int, default=load_defaults.requests_per_client, help="per level"
    )
    load.add_argument("--min-requests", type=int, default=load_defaults.min_requests, help="per level")
    load.add_argument("--max-tokens", type=int, default=load_defaults.max_tokens, help="per request")
    load.add_argument(
        "--rounds", type=int, default=load_defaults.rounds, help="passes over the levels (medians)"
    )
    load.add_argument("--questions", help="Spec-Bench-format JSONL (default: the built-in prompt set)")
    load.add_argument("--out-dir", default=load_defaults.out_dir, help="report directory")
    load.set_defaults(run=run_bench_serve)

    sim_defaults = SimulationConfig()
    sim = command("simulate", "DSI vs SI vs plain decoding: a grid of drafter costs x acceptance, or a trace")
    sim.add_argument(
        "--drafter-costs", type=float_list, default=sim_defaults.drafter_costs, help="grid: c values"
    )
    sim.add_argument(
        "--acceptances", type=float_list, default=sim_defaults.acceptances, help="grid: a values"
    )
    sim.add_argument(
        "--targets", type=int, default=sim_defaults.targets, help="DSI's target instances (trace: 1..N)"
    )
    sim.add_argument(
        "--lookaheads", type=int_list, default=sim_defaults.lookaheads, help="each runs at its best"
    )
    sim.add_argument("--drafters", type=int, default=sim_defaults.drafters, help="DSI's drafter instances")
    sim.add_argument(
        "--preemptible",
        action=argparse.BooleanOptionalAction,
        default=sim_defaults.preemptible,
        help="a cancelled forward stops at once, as in the paper (--no-preemptible: it runs to its end, "
        "as in swarmspec's orchestrator)",
    )
    sim.add_argument("--tokens", type=int, default=sim_defaults.tokens, help="tokens per simulated run")
    sim.add_argument("--seed", type=int, default=sim_defaults.seed, help="of the acceptance draws")
    sim.add_argument("--target", help="trace: this machine's stored profile of this target")
    sim.add_argument(
        "--drafter", help="trace: a drafter model's stored profile, or a model-free drafter (free: no cost)"
    )
    sim.add_argument(
        "--target-threads", type=int, default=0, help="trace: threads the target was profiled at"
    )
    sim.add_argument(
        "--drafter-threads", type=int, default=0, help="trace: threads the drafter was profiled at"
    )
    sim.add_argument("--acceptance", type=float, help="trace: the drafter's acceptance rate")
    sim.add_argument("--report", help="trace: estimate the acceptance rate from this bench.json")
    sim.add_argument("--contender", default=sim_defaults.contender, help="trace: --report's contender")
    sim.add_argument("--out", help="report directory (default: simulate-results/<UTC time>)")
    sim.set_defaults(run=run_simulate)

    train = TrainSortedConfig()
    tr = command("train-sorted", "train a sorted draft's exits on targets' greedy answers (S2D)")
    tr.add_argument("--drafter", default=train.drafter, help="the PyTorch draft model whose exits to train")
    tr.add_argument(
        "--target",
        action="append",
        help=f"repeatable: whose answers to learn (default: {', '.join(train.targets)})",
    )
    tr.add_argument("--prompts", help="Spec-Bench-format JSONL (default: the built-in training prompts)")
    tr.add_argument("--sorted-exits", type=int_list, default=train.exits, help="exit depths in layers")
    tr.add_argument("--rank", type=int, default=train.rank, help="each exit's adapter rank (0: norm only)")
    tr.add_argument("--max-new-tokens", type=int, default=train.max_new_tokens, help="per answer")
    tr.add_argument("--epochs", type=int, default=train.epochs, help="passes over the answers")
    tr.add_argument("--batch-rows", type=int, default=train.batch_rows, help="positions per step")
    tr.add_argument("--learning-rate", type=float, default=train.learning_rate, help="AdamW")
    tr.add_argument("--held-out", type=float, default=train.held_out, help="share of prompts to measure on")
    tr.add_argument("--seed", type=int, default=train.seed, help="adapters' init, split and batch order")
    tr.add_argument(
        "--tune-thresholds",
        action=argparse.BooleanOptionalAction,
        default=train.tune_thresholds,
        help="tune each target's exit thresholds on the held-out prompts",
    )
    tr.add_argument(
        "--head-tokens", type=int, default=train.head_tokens, help="also measure a draft head of N tokens"
    )
    tr.add_argument("--restart", action="store_true", help="start over instead of resuming")
    tr.set_defaults(run=run_train_sorted)
    return parser


def add_engine_flags(parser: argparse.ArgumentParser, several_targets: bool = False) -> None:
    """The flags of `EngineConfig` that `generate`, `bench` and `serve` share (`serve` takes several
    targets: an `EngineConfig` each)."""
    defaults = EngineConfig()
    if several_targets:
        parser.add_argument(
            "--target",
            action="append",
            help=f"repeatable: a target model spec, each served with the same method and drafters, one copy "
            f"of each draft model for all (default: {defaults.target})",
        )
    else:
        parser.add_argument("--target", default=defaults.target, help="target model spec")
    parser.add_argument(
        "--drafter",
        action="append",
        help="repeatable: a model spec, prompt-lookup, prompt-lookup-earliest or suffix (default: chain "
        f"{','.join(default_drafters('chain', defaults.target))}; tree and vote "
        f"{','.join(default_drafters('tree', defaults.target))})",
    )
    parser.add_argument(
        "--gamma",
        type=gamma_value,
        default=defaults.gamma,
        help="tokens drafted per target forward (pipeline: per job), or auto: chosen each step from costs "
        "and acceptance",
    )
    parser.add_argument(
        "--max-depth", type=int, default=defaults.max_depth, help="--gamma auto: the deepest draft"
    )
    sorted_defaults = defaults.sorted_draft
    parser.add_argument(
        "--sorted-exits",
        type=int_list,
        default=sorted_defaults.exits,
        help="sorted: drafters: exit depths in layers (default: %(default)s)",
    )
    parser.add_argument(
        "--exit-thresholds",
        type=float_list,
        default=(),
        help="sorted: drafters: the top probability that stops a token at each exit but the deepest "
        "(default 0.5 each)",
    )
    parser.add_argument(
        "--head-tokens",
        type=int,
        default=sorted_defaults.head_tokens,
        help="sorted: drafters: draft over the N most frequent trained-on tokens only (0: full LM head)",
    )
    parser.add_argument("--tree", type=int_list, default=(), help="tree widths per depth, e.g. 3,2,1,1")
    parser.add_argument("--tree-budget", type=int, default=0, help="grow <= N nodes from the model drafter")
    help_threads = "llama.cpp threads (0: every core; dsi, pipeline: the cores shared out)"
    parser.add_argument("--target-threads", type=int, default=defaults.target_threads, help=help_threads)
    parser.add_argument("--drafter-threads", type=int, default=defaults.drafter_threads, help=help_threads)
    parser.add_argument("--targets", type=int, default=defaults.targets, help="dsi: target instances")
    parser.add_argument(
        "--lookahead", type=int, default=defaults.lookahead, help="dsi: drafted tokens per job"
    )
    parser.add_argument(
        "--workers", choices=WORKERS, default=defaults.workers, help="dsi: instances on threads or Ray actors"
    )
    parser.add_argument(
        "--ray-address", help="dsi --workers ray: join this cluster (default: start Ray here)"
    )


def add_sampling_flags(parser: argparse.ArgumentParser, sampling: SamplingConfig, seed: int | None) -> None:
    parser.add_argument("--temperature", type=float, default=sampling.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=sampling.top_p, help="nucleus sampling")
    parser.add_argument("--top-k", type=int, default=sampling.top_k, help="0 = off")
    parser.add_argument("--seed", type=int, default=seed, help="seeds the request's own generator")


def gamma_value(text: str) -> Gamma:
    try:
        return read_gamma(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or {AUTO}, got {text!r}") from None


def gamma_list(text: str) -> tuple[Gamma, ...]:
    return tuple(gamma_value(item) for item in comma_list(text))


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The values of `add_engine_flags`, by their field names in `EngineConfig` and `BenchConfig`."""
    return {
        "target": args.target,
        "drafters": tuple(args.drafter or ()),
        "sorted_draft": SortedDraft(args.sorted_exits, args.exit_thresholds, args.head_tokens),
        "gamma": args.gamma,
        "max_depth": args.max_depth,
        "tree_widths": args.tree,
        "tree_budget": args.tree_budget,
        "target_threads": args.target_threads,
        "drafter_threads": args.drafter_threads,
        "targets": args.targets,
        "lookahead": args.lookahead,
        "workers": args.workers,
        "ray_address": args.ray_address,
    }


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of `add_engine_flags` and --method."""
    return EngineConfig(method=args.method, **engine_flags(args))


def run_generate(args: argparse.Namespace) -> int:
    from swarmspec.engine import Engine  # imports torch/transformers: keep `--help` fast

    # Build (and so validate) the request before loading any model: user mistakes fail in milliseconds.
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        seed=args.seed,
        chat=args.chat,
        stop=tuple(args.stop),
    )
    config = engine_config(args)
    start = time.perf_counter()
    drafter_note = f" with drafters {', '.join(config.drafters)}" if config.method != "ar" else ""
    print(f"loading {config.target}{drafter_note} ...", file=sys.stderr, flush=True)
    engine = Engine.load(config)
    print(
        f"loaded in {time.perf_counter() - start:.1f} s; method {config.method}", file=sys.stderr, flush=True
    )

    stream = engine.stream(request)
    for piece in stream:
        if not args.json:
            print(piece, end="", flush=True)
    result = stream.result
    assert result is not None
    # Drafter indices are positions in config.drafters: every speculation keeps their order.
    by_drafter = result.stats.accepted_by(config.drafters if config.method != "ar" else ())
    if args.json:
        summary = {
            "method": config.method,
            "target": config.target,
            "drafters": list(config.drafters) if config.method != "ar" else None,
            "gamma": config.gamma if config.method != "ar" else None,
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            **result.stats.to_dict(),
            "accepted_by_drafter": by_drafter,
        }
        print(json.dumps(summary))
    else:
        print(f"\n\n{result.stats.summary()}", file=sys.stderr)
        if config.method != "ar" and len(config.drafters) > 1:
            shares = ", ".join(f"{spec} {accepted}" for spec, accepted in by_drafter.items())
            print(f"accepted tokens by proposing drafter: {shares}", file=sys.stderr)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from swarmspec.models.registry import list_models

    for status in list_models():
        cached = f"cached at {status.cached_dir}" if status.cached_dir else "not cached"
        parts = "parts installed" if status.parts_installed else "parts NOT installed"
        print(f"{status.name:32} {status.description}\n{'':32} {cached}; {parts}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from swarmspec.models.loading import llama_cpp_file
    from swarmspec.models.registry import fetch

    for name in args.names:  # llama.cpp needs the verified GGUF only; PyTorch the converted checkpoint
        path = (
            llama_cpp_file(name.removeprefix(LLAMA_CPP_PREFIX))
            if name.startswith(LLAMA_CPP_PREFIX)
            else fetch(name)
        )
        print(f"{name}: {path}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from swarmspec.serve.app import Server, create_app
    from swarmspec.serve.engines import DraftModels, MethodEngines

    if args.max_queue < 1 or args.max_tokens < 1 or args.kv_budget < 1 or not 0 < args.port < 65536:
        raise SwarmspecError("--max-queue, --max-tokens and --kv-budget must be >= 1, --port in 1..65535")
    configs = serve_configs(args)  # validates every target's settings before loading anything
    names = serve_model_names(args, configs)
    draft_models = DraftModels()
    served = {}
    for name, config in zip(names, configs, strict=True):
        print(f"loading {config.target} ...", file=sys.stderr, flush=True)
        served[name] = MethodEngines(config, draft_models=draft_models)
        served[name](config.method)  # load and warm up before accepting requests
    method = configs[0].method
    server = Server(served, method, args.max_queue, args.max_tokens, args.kv_budget)
    print(
        f"serving {', '.join(served)} ({method}) on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


def serve_configs(args: argparse.Namespace) -> list[EngineConfig]:
    """`serve`'s engine configuration for each --target (each target's default drafters, unless given)."""
    targets = args.target or [EngineConfig().target]
    flags = engine_flags(args)
    return [
        EngineConfig(
            method=args.method,
            max_batch=args.max_batch,
            prefill_chunk=args.prefill_chunk,
            **{**flags, "target": target},
        )
        for target in targets
    ]


def serve_model_names(args: argparse.Namespace, configs: list[EngineConfig]) -> list[str]:
    """The model id clients send for each target: --model-name in order, else the target's spec."""
    given = args.model_name or []
    if len(given) > len(configs):
        raise SwarmspecError(f"{len(given)} --model-name for {len(configs)} --target: give at most one each")
    names = [*given, *(config.target for config in configs[len(given) :])]
    if len(set(names)) < len(names):
        raise SwarmspecError(f"each served model needs its own name, got {names}")
    return names


def run_profile(args: argparse.Namespace) -> int:
    from swarmspec.models.loading import load_model
    from swarmspec.profile import (
        BATCH_KS,
        BATCH_SIZES,
        CostProfile,
        device_name,
        format_batch_table,
        format_table,
        measure_batch_latency,
        measure_forward_latency,
        profile_key,
    )

    if args.max_k < 1 or args.context < 1 or args.repeats < 1 or args.batch < 0:
        raise SwarmspecError("--max-k, --context and --repeats must be >= 1, --batch >= 0")
    if args.target_threads < 0 or args.drafter_threads < 0:
        raise SwarmspecError("thread counts must be >= 1 (0: every core)")
    device = device_name()
    profiles = []
    models = [(args.target, args.target_threads)]
    models += [
        (spec, args.drafter_threads)
        for spec in args.drafter or default_drafters("chain", args.target)
        if spec not in MODEL_FREE_DRAFTERS  # nothing to measure: they cost no forward
    ]
    for spec, threads in models:
        # Stored under the name the engine and `simulate` look up for a runner with these threads.
        key = profile_key(spec, threads)
        print(f"profiling {key} on {device} (k = 1..{args.max_k}, {args.repeats} repeats)", file=sys.stderr)
        loaded = load_model(spec)
        runner = loaded.new_runner(threads or None)
        ks = list(range(1, args.max_k + 1))
        latency = measure_forward_latency(runner, ks, args.context, args.repeats, label=key)
        del runner
        stored = CostProfile.load(key, device)
        batch_latency = stored.batch_latency_ms if stored is not None else {}
        if args.batch and spec == args.target:
            batches = [b for b in BATCH_SIZES if b <= args.batch]
            print(f"profiling {key}'s batched forwards (b = {batches}, k = {BATCH_KS})", file=sys.stderr)
            batched = loaded.new_batched_target(max(batches), threads or None)
            batch_latency = measure_batch_latency(batched, batches, BATCH_KS, args.context, args.repeats, key)
        profile = CostProfile(key, device, args.context, args.repeats, latency, batch_latency)
        print(f"  saved {profile.save()}", file=sys.stderr)
        profiles.append(profile)
    print(f"device: {device}; {args.context} cached tokens; median of {args.repeats}")
    print(format_table(profiles))
    if args.batch:
        print(format_batch_table(profiles[0]))
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from swarmspec.bench.load import run_load_bench

    config = LoadBenchConfig(
        target=args.target,
        method=args.method,
        drafters=tuple(args.drafter or LoadBenchConfig().drafters),
        concurrency=args.concurrency,
        gammas=args.gammas,
        max_depth=args.max_depth,
        requests_per_client=args.requests_per_client,
        min_requests=args.min_requests,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        questions=args.questions,
        out_dir=args.out_dir,
    )
    report = run_load_bench(config)
    paths = report.write(Path(config.out_dir))
    print(report.markdown())
    print(f"written: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from swarmspec.bench.run import run_bench as bench

    config = BenchConfig(
        questions=args.questions,
        categories=args.categories,
        per_category=args.per_category,
        max_new_tokens=args.max_new_tokens,
        methods=args.methods,
        baselines=args.baselines,
        **engine_flags(args),
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        seed=args.seed,
        repeats=args.repeats,
        out=args.out,
        variants=tuple(args.variant or ()),
    )
    result = bench(config, command_line=args.command_line)
    print_report(result.markdown, result.paths)
    return 0


def print_report(markdown: str, paths: dict[str, Any]) -> None:
    """A report's tables, then where its files are."""
    print(markdown)
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def run_train_sorted(args: argparse.Namespace) -> int:
    from swarmspec.train.sorted import train_sorted

    config = TrainSortedConfig(
        drafter=args.drafter,
        targets=tuple(args.target or TrainSortedConfig().targets),
        prompts=args.prompts,
        exits=args.sorted_exits,
        rank=args.rank,
        max_new_tokens=args.max_new_tokens,
        epochs=args.epochs,
        batch_rows=args.batch_rows,
        learning_rate=args.learning_rate,
        held_out=args.held_out,
        seed=args.seed,
        tune_thresholds=args.tune_thresholds,
        head_tokens=args.head_tokens,
        restart=args.restart,
    )
    result = train_sorted(config)
    print(result.markdown())
    print(f"exits: {result.path}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from swarmspec.dsi.report import run_simulation

    config = SimulationConfig(
        drafter_costs=args.drafter_costs,
        acceptances=args.acceptances,
        targets=args.targets,
        lookaheads=args.lookaheads,
        drafters=args.drafters,
        preemptible=args.preemptible,
        tokens=args.tokens,
        seed=args.seed,
        target=args.target,
        drafter=args.drafter,
        target_threads=args.target_threads,
        drafter_threads=args.drafter_threads,
        acceptance=args.acceptance,
        report=args.report,
        contender=args.contender,
        out=args.out,
    )
    result = run_simulation(config, command_line=args.command_line)
    print_report(result.markdown, result.paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
