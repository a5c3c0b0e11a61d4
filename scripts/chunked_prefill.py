"""Chunked prefill, measured: a short request decodes while a long prompt joins the batch.

Reports, per round and mode, the longest pause between two tokens of the running request and the
long request's time to first token: `chunked` (the default: on llama.cpp one 512-token `llama_decode`
of the prompt per step, on PyTorch `--prefill-chunk` tokens per step) against `whole` (the prompt
prefilled in one go, as before chunking). Modes interleave.

    python scripts/chunked_prefill.py --long-tokens 2500 --rounds 2
    python scripts/chunked_prefill.py --target onednn:qwen2.5-coder-0.5b-instruct --long-tokens 2000
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time

import torch

from swarmspec.config import LLAMA_CPP_PREFIX, EngineConfig
from swarmspec.engine import Engine
from swarmspec.metrics import DecodeStats
from swarmspec.models.loading import load_model
from swarmspec.models.registry import DEFAULT_TARGET
from swarmspec.runners.batch import PREFILL_CHUNK, BatchedTarget, TorchBatchedTarget
from swarmspec.sampling import SamplingConfig


def whole_join(batched: BatchedTarget):
    """The batched target's join as before chunking: every part of the prompt in one go."""
    chunked = batched._join

    def join(slot, post):
        logits = None
        while logits is None:
            logits = chunked(slot, post)
        return logits

    return join


def one_round(engine: Engine, vocab: int, long_tokens: int, seed: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    short = torch.randint(1000, vocab, (40,), generator=generator).tolist()
    long = torch.randint(1000, vocab, (long_tokens,), generator=generator).tolist()
    times: list[float] = []
    ttft: list[float] = []

    def run_short() -> None:
        for _ in engine.token_chunks(short, 40, SamplingConfig(), 0, DecodeStats()):
            times.append(time.perf_counter())

    def run_long() -> None:
        start = time.perf_counter()
        for _ in engine.token_chunks(long, 4, SamplingConfig(), 0, DecodeStats()):
            ttft.append(time.perf_counter() - start)

    short_thread = threading.Thread(target=run_short)
    short_thread.start()
    while len(times) < 5:
        time.sleep(0.01)
    long_thread = threading.Thread(target=run_long)
    long_thread.start()
    short_thread.join()
    long_thread.join()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return max(gaps), ttft[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=LLAMA_CPP_PREFIX + DEFAULT_TARGET)
    parser.add_argument("--long-tokens", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="PyTorch targets only")
    args = parser.parse_args()
    target = load_model(args.target)
    batched = target.new_batched_target(max_batch=2)
    if isinstance(batched, TorchBatchedTarget):
        batched.prefill_chunk = args.prefill_chunk
    config = EngineConfig(target=args.target, method="ar", max_batch=2)
    engine = Engine.from_models(config, target, {}, batched=batched)
    chunked_join = batched._join
    results: dict[str, list[tuple[float, float]]] = {"chunked": [], "whole": []}
    for round_index in range(args.rounds):
        for mode in results:
            batched._join = chunked_join if mode == "chunked" else whole_join(batched)
            gap, ttft = one_round(engine, min(target.vocab_size, 30000), args.long_tokens, round_index)
            results[mode].append((gap, ttft))
            print(
                f"round {round_index + 1} {mode}: longest pause {gap:.2f} s, long request TTFT {ttft:.2f} s"
            )
    for mode, values in results.items():
        print(
            f"{mode}: median longest pause {statistics.median(v[0] for v in values):.2f} s, "
            f"median TTFT {statistics.median(v[1] for v in values):.2f} s"
        )


if __name__ == "__main__":
    main()
