"""Measure, for one llama.cpp configuration, whether batched forwards are bit-identical to one token at a
time, and what a forward of k tokens costs. The figures in docs/llama-cpp.md come from this script.

    python scripts/llama_cpp_exactness.py --model qwen2.5-coder-1.5b-instruct --repack on --rows 3
    python scripts/llama_cpp_exactness.py --repack off --rows 7
    python scripts/llama_cpp_exactness.py --repack off --rows 512          # ggml's tiled matmul at k >= 8
    GGML_CPU_TILED_MM_FORCE=1 python scripts/llama_cpp_exactness.py --repack off --rows 512

`--rows` is how many tokens go into one llama_decode after the prompt (swarmspec uses EXACT_ROWS).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from swarmspec.models.registry import DEFAULT_TARGET, gguf_file
from swarmspec.runners import llama_cpp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_TARGET, help="registered name or .gguf file")
    parser.add_argument("--repack", choices=("on", "off"), default="on")
    parser.add_argument("--rows", type=int, default=llama_cpp.EXACT_ROWS)
    parser.add_argument(
        "--flash-attn", choices=("on", "off"), default="on" if llama_cpp.FLASH_ATTN else "off"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=200, help="cached tokens under each forward")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    llama_cpp.REPACK = args.repack == "on"
    llama_cpp.EXACT_ROWS = args.rows
    llama_cpp.FLASH_ATTN = int(args.flash_attn == "on")
    runner = llama_cpp.LlamaCppModel(gguf_file(args.model)).new_runner(threads=args.threads)
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(1000, 30000, (args.context,), generator=generator)

    # Exactness: 16 greedy tokens one at a time, then fed at once (split into --rows per llama_decode).
    logits = runner.forward(context, num_logits=1)
    tokens, one_by_one = [], []
    for _ in range(16):
        tokens.append(int(logits[-1].argmax()))
        logits = runner.forward(torch.tensor(tokens[-1:]), num_logits=1)
        one_by_one.append(logits[0])
    for k in (2, 3, 4, 7, 8, 12, 16):
        runner.rollback(args.context)
        batched = runner.forward(torch.tensor(tokens[:k]), num_logits=k)
        gap = float((batched - torch.stack(one_by_one[:k])).abs().max())
        print(f"k={k:2}: max |logit gap| vs one token at a time = {gap:.4g}")

    # Cost: median latency of a forward of k tokens on top of the context, rounds interleaved over k.
    ks = (1, 2, 3, 4, 6, 7, 8, 12, 16)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for k in ks:
            runner.rollback(args.context)
            start = time.perf_counter()
            runner.forward(torch.randint(1000, 30000, (k,), generator=generator), num_logits=k)
            if repeat:
                samples[k].append((time.perf_counter() - start) * 1000)
    print(" | ".join(f"t({k}) {statistics.median(v):.1f} ms" for k, v in samples.items()))


if __name__ == "__main__":
    main()
