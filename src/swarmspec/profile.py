"""Cost profiles: measured forward latency of a model for k new tokens, per device.

Adaptive speculation (length policies, batch-aware speculation) decides from these measurements, never
from assumptions: on a CPU a forward of 8 tokens costs several times one token, on a GPU about the same.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from swarmspec.models.registry import cache_root
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.batch import BatchedTarget, Forward


@dataclass(frozen=True)
class CostProfile:
    model: str  # the model spec as given, e.g. "int8:qwen2.5-coder-0.5b-instruct"
    device: str
    context_len: int  # cached tokens each timed forward ran on top of
    repeats: int
    latency_ms: dict[int, float]  # k new tokens -> median forward latency
    # Continuous batching: batch size b -> {k rows per sequence -> median forward latency}
    batch_latency_ms: dict[int, dict[int, float]] = field(default_factory=dict)

    def ratio(self, k: int) -> float:
        """t(k) / t(1): what verifying k tokens costs in single-token forwards."""
        return self.latency_ms[k] / self.latency_ms[1]

    def save(self) -> Path:
        path = profile_path(self.model, self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, model: str, device: str | None = None) -> CostProfile | None:
        path = profile_path(model, device or device_name())
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["latency_ms"] = {int(k): v for k, v in data["latency_ms"].items()}
        batched = data.get("batch_latency_ms", {})
        data["batch_latency_ms"] = {int(b): {int(k): v for k, v in c.items()} for b, c in batched.items()}
        return cls(**data)


def device_name() -> str:
    """A stable description of where forwards run: the CPU model and thread count, or the GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = match.group(1).strip() if match else cpu
    return f"{cpu} x{torch.get_num_threads()} threads"


def profile_key(spec: str, threads: int) -> str:
    """The name a profile is stored under: the model spec, and the runner's llama.cpp threads if set."""
    return f"{spec} x{threads} threads" if threads else spec


def profile_path(model: str, device: str) -> Path:
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()

    return cache_root() / "profiles" / slug(device) / f"{slug(model)}.json"


def measure_forward_latency(
    runner: ModelRunner,
    ks: Sequence[int],
    context_len: int,
    repeats: int,
    label: str = "",
) -> dict[int, float]:
    """Median milliseconds of a forward of k new tokens on top of `context_len` cached tokens.

    Repeats are interleaved over k (1..K, 1..K, ...) so that machine drift hits every k alike.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = min(runner.vocab_size, 32_000)  # ordinary token ids; content does not change the cost
    runner.reset()
    runner.forward(torch.randint(vocab, (context_len,), generator=generator), num_logits=1)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for repeat in range(repeats + 1):  # the first round warms up and is discarded
        for k in ks:
            tokens = torch.randint(vocab, (k,), generator=generator)
            start = time.perf_counter()
            runner.forward(tokens, num_logits=k)
            elapsed_ms = (time.perf_counter() - start) * 1000
            runner.rollback(context_len)
            if repeat > 0:
                samples[k].append(elapsed_ms)
        if label:
            print(f"  {label} round {repeat}/{repeats} done", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in samples.items()}


def format_table(profiles: Sequence[CostProfile]) -> str:
    """A text table: one row per k, latency and t(k)/t(1) per model."""
    header = f"{'k':>3} | " + " | ".join(f"{p.model[:34]:>34}" for p in profiles)
    sub = f"{'':>3} | " + " | ".join(f"{'ms':>14} {'t(k)/t(1)':>19}" for _ in profiles)
    rows = [header, sub, "-" * len(header)]
    for k in sorted(profiles[0].latency_ms):
        cells = " | ".join(f"{p.latency_ms[k]:>14.1f} {p.ratio(k):>19.2f}" for p in profiles)
        rows.append(f"{k:>3} | {cells}")
    return "\n".join(rows)


# The forward sizes a self-tuning policy reads (policy.StepCosts interpolates between them).
POLICY_KS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


def forward_costs(
    model: str,
    runner: ModelRunner,
    ks: Sequence[int] = POLICY_KS,
    persist: bool = True,
    context_len: int = 256,
    repeats: int = 3,
) -> dict[int, float]:
    """Milliseconds of the runner's forward over k rows for each k in `ks`: this device's stored profile
    of `model` when it covers them, else measured now (and stored when `persist`, under `model`)."""
    device = device_name()
    stored = CostProfile.load(model, device) if persist else None
    if stored is not None and set(ks) <= set(stored.latency_ms):
        return {k: stored.latency_ms[k] for k in ks}
    context_len = min(context_len, runner.max_length - max(ks))
    if persist:
        print(
            f"swarmspec: measuring {model}'s forward costs on this machine (once; stored for next time)",
            file=sys.stderr,
            flush=True,
        )
    latency = measure_forward_latency(runner, ks, context_len, repeats, label=model if persist else "")
    runner.reset()
    if persist:
        kept = stored.batch_latency_ms if stored is not None else {}
        CostProfile(model, device, context_len, repeats, latency, kept).save()
    return latency


# The batched forwards a batch-aware policy reads: batch sizes, and rows per sequence.
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
BATCH_KS = (1, 2, 3, 4, 6, 8)


def measure_batch_latency(
    batched: BatchedTarget,
    batches: Sequence[int],
    ks: Sequence[int],
    context_len: int,
    repeats: int,
    label: str = "",
) -> dict[int, dict[int, float]]:
    """Median milliseconds of one batched forward of b sequences with k new tokens each, every sequence
    on top of `context_len` cached tokens (repeats interleaved over k, as in `measure_forward_latency`)."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(batched.vocab_size, 32_000)
    latency: dict[int, dict[int, float]] = {}
    for b in batches:
        slots = [batched.slot() for _ in range(b)]
        for slot in slots:  # each prefills alone (in parts, if the backend takes long prompts so) and joins
            prompt = Forward(torch.randint(vocab, (context_len,), generator=generator), 1, None)
            while prompt.logits is None:
                batched.run({slot: prompt})
        samples: dict[int, list[float]] = {k: [] for k in ks}
        for repeat in range(repeats + 1):  # the first round warms up and is discarded
            for k in ks:
                forwards = {
                    s: Forward(torch.randint(vocab, (k,), generator=generator), k, None) for s in slots
                }
                start = time.perf_counter()
                batched.run(forwards)
                elapsed_ms = (time.perf_counter() - start) * 1000
                for slot in slots:
                    slot.rollback(context_len)
                if repeat > 0:
                    samples[k].append(elapsed_ms)
        for slot in slots:
            slot.end()
        latency[b] = {k: statistics.median(v) for k, v in samples.items()}
        if label:
            print(f"  {label} batch of {b} done", file=sys.stderr, flush=True)
    return latency


def batch_forward_costs(
    model: str,
    batched: BatchedTarget,
    max_batch: int,
    persist: bool = True,
    context_len: int = 128,
    repeats: int = 2,
) -> dict[int, dict[int, float]]:
    """Milliseconds of a batched forward, batch size -> {k rows per sequence -> ms}, for the batch sizes
    of `BATCH_SIZES` below `max_batch` and `max_batch` itself: this device's stored profile of
    `model` when it has them, else measured now (and stored with the single-sequence costs). What was
    measured on `batched` is kept with it: engines sharing a batch measure it once, while it is empty."""
    device = device_name()
    batches = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
    if set(batches) <= set(batched.measured_ms):  # another engine sharing this batch measured them
        return {b: batched.measured_ms[b] for b in batches}
    stored = CostProfile.load(model, device) if persist else None
    if stored is not None and set(batches) <= set(stored.batch_latency_ms):
        return {b: stored.batch_latency_ms[b] for b in batches}
    if persist:
        print(
            f"swarmspec: measuring {model}'s batched forward costs on this machine (once; stored)",
            file=sys.stderr,
            flush=True,
        )
    label = model if persist else ""
    latency = measure_batch_latency(batched, batches, BATCH_KS, context_len, repeats, label)
    batched.measured_ms.update(latency)
    if persist:
        base = stored or CostProfile(model, device, context_len, repeats, {})
        merged = {**base.batch_latency_ms, **latency}
        CostProfile(model, device, base.context_len, base.repeats, base.latency_ms, merged).save()
    return latency


def format_batch_table(profile: CostProfile) -> str:
    """A text table of the batched costs: one row per batch size, ms per k rows per sequence."""
    ks = sorted({k for curve in profile.batch_latency_ms.values() for k in curve})
    header = f"{'batch':>5} | " + " | ".join(f"{f'k={k} ms':>9}" for k in ks) + " | tokens/s at k=1"
    rows = [f"{profile.model}: one forward of b sequences x k rows", header, "-" * len(header)]
    for b, curve in sorted(profile.batch_latency_ms.items()):
        cells = " | ".join(f"{curve[k]:>9.1f}" if k in curve else f"{'-':>9}" for k in ks)
        rows.append(f"{b:>5} | {cells} | {1000 * b / curve[min(curve)]:>8.1f}")
    return "\n".join(rows)
