"""What pipelining can win on this machine: a target forward of 1 and k tokens and a draft model's
per-token forward, each alone on 2 and on 1 thread(s), then the target's k-token forward on one thread
while the drafter drafts on another (`--method pipeline`'s layout on 2 cores). The figures in
docs/pipeline.md come from this script.

    python scripts/pipeline_costs.py --target qwen2.5-coder-1.5b-instruct \
        --drafter int8:qwen2.5-coder-0.5b-instruct --k 5

PyTorch models only: intra-op threads are set per Python thread, as the pipeline does.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from swarmspec.models.loading import LoadedModel, load_model
from swarmspec.models.registry import DEFAULT_DRAFTER, DEFAULT_TARGET

CONTEXT = 200  # cached tokens under each forward


def forward_ms(model: LoadedModel, k: int, threads: int, repeats: int) -> float:
    """Median ms of a k-token forward over CONTEXT cached tokens, with `threads` intra-op threads on the
    calling thread."""
    torch.set_num_threads(threads)
    runner = model.new_runner()
    runner.forward(torch.arange(200, 200 + CONTEXT), num_logits=1)
    times = []
    for _ in range(repeats):
        runner.rollback(CONTEXT)
        start = time.perf_counter()
        runner.forward(torch.arange(500, 500 + k), num_logits=k)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--k", type=int, default=5, help="tokens of the target's verification forward")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    target, drafter = load_model(args.target), load_model(args.drafter)
    for threads in (2, 1):
        t1 = forward_ms(target, 1, threads, args.repeats)
        tk = forward_ms(target, args.k, threads, args.repeats)
        d1 = forward_ms(drafter, 1, threads, args.repeats)
        print(
            f"{threads} thread(s) alone: target t(1) {t1:.0f} ms, t({args.k}) {tk:.0f} ms; "
            f"drafter {d1:.0f} ms"
        )
    together: dict[str, float] = {}

    def verify() -> None:
        together["target"] = forward_ms(target, args.k, 1, args.repeats)

    def draft() -> None:
        together["drafter"] = forward_ms(drafter, 1, 1, args.repeats * 5)

    threads = [threading.Thread(target=verify), threading.Thread(target=draft)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(
        f"1 thread each, at once: target t({args.k}) {together['target']:.0f} ms, "
        f"drafter {together['drafter']:.0f} ms"
    )


if __name__ == "__main__":
    main()
