"""The PyTorch backend on a GPU: the target's cost curve there, what the self-tuning policy drafts on it,
and plain decoding through swarmspec's loop against `transformers.generate`.

The packaged models' weights are not needed (nor available on a GPU machine without network): a
forward's cost depends on the architecture, not on the weights' values, so the default models'
architectures run with random weights. Their outputs are meaningless, so no acceptance rate is
measured here: the policy is shown the GPU curve at given rates, next to this repository's measured
llama.cpp CPU curve (docs/llama-cpp.md). The lossless test suites run on the GPU separately:
`SWARMSPEC_TEST_DEVICE=cuda pytest tests/test_decode_greedy.py ...` (README, "Tests").

    python scripts/gpu_check.py [--out gpu-check.json]      # on a GPU: measure, then analyze
    python scripts/gpu_check.py --analyze docs/bench/gpu/gpu-check-h200.json   # anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from swarmspec.decode import decode
from swarmspec.metrics import DecodeStats
from swarmspec.policy import (
    AcceptancePrior,
    AcceptanceStats,
    BatchPeers,
    CostModelPolicy,
    FixedDepth,
    StepCosts,
    expected_committed,
)
from swarmspec.profile import POLICY_KS, measure_batch_latency, measure_forward_latency
from swarmspec.runners.batch import TorchBatchedTarget
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import NoSpeculation
from swarmspec.tree import TokenTree
from swarmspec.verify import make_verifier

# The packaged Qwen2.5-Coder instruct models' shapes (their config.json).
SHAPES = {
    "qwen2.5-coder-0.5b-instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                        num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-coder-1.5b-instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                        num_attention_heads=12, num_key_value_heads=2),
}  # fmt: skip
# The 1.5B target on llama.cpp here (docs/llama-cpp.md, 256 cached tokens) and its 0.5B drafter.
LLAMA_CPP_CURVE = {1: 28.0, 2: 53.0, 3: 69.0, 4: 95.0, 8: 204.0, 16: 400.0, 32: 777.0}
LLAMA_CPP_DRAFT_MS = 15.9
# The 0.5B (`onednn:`) batched on this CPU, b sequences -> {k rows each -> ms} (docs/serving.md).
TORCH_CPU_BATCH_CURVES = {
    1: {1: 63.7, 2: 75.5, 3: 67.9, 4: 59.0, 6: 67.8, 8: 70.9},
    4: {1: 67.3, 2: 90.0, 3: 86.9, 4: 98.8, 6: 112.5, 8: 136.6},
    16: {1: 116.3, 2: 209.8, 3: 269.6, 4: 311.9, 6: 427.4, 8: 524.4},
    32: {1: 158.9, 2: 351.6, 3: 462.2, 4: 543.9, 6: 718.8, 8: 855.3},
}
RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
# Continuous batching: sequences per batched forward, and rows each.
BATCHES, BATCH_KS = (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16)


def random_model(name: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
        **SHAPES[name],
    )  # fmt: skip
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def trained_policy(verify_ms: dict[int, float], draft_ms: float, rate: float) -> CostModelPolicy:
    """`CostModelPolicy` after 400 steps of a drafter whose tokens are each accepted (given their
    parent) at `rate`, deterministically."""
    prior = AcceptancePrior()
    prior.stats = AcceptanceStats.after_chains([rate, rate], depth=32)
    return CostModelPolicy(StepCosts(verify_ms, (draft_ms,)), max_depth=32, prior=prior)


def verified_rows(verify_ms: dict[int, float], draft_ms: float, rate: float) -> int:
    """Drafted tokens the policy verifies per step: a draft model's depth, or for a free drafter
    (draft_ms 0) how much of a 32-token proposal `select` keeps."""
    policy = trained_policy(verify_ms, draft_ms, rate)
    depth = policy.draft_depths(32)[0]
    if draft_ms > 0:
        return depth
    proposal = TokenTree.chain(0, torch.arange(1, depth + 1))
    return len(policy.select(proposal)) - 1


def batch_rows(batch_ms: dict[int, dict[int, float]], batch: int, rate: float) -> int:
    """The rows per sequence the batch-aware policy gives a batch of `batch` sequences whose free
    drafters are each accepted at `rate` (`BatchPeers.best_rows`)."""
    curves = {int(b): {int(k): ms for k, ms in c.items()} for b, c in batch_ms.items()}
    costs = StepCosts(curves[1], (0.0,), {b: c for b, c in curves.items() if b > 1})
    peers = BatchPeers(lambda: batch)
    limit = max(curves[1])
    for member in range(batch):
        peers.publish(member, [expected_committed(rate, depth) for depth in range(limit)])
    return peers.best_rows(costs, limit)


def analyze(report: dict) -> dict[str, dict[str, dict[float, int]]]:
    """What the policy chooses on the measured GPU curves, next to this repository's CPU curves."""
    curves = {name: {int(k): ms for k, ms in c.items()} for name, c in report["curves_ms"].items()}
    target, drafter = curves["qwen2.5-coder-1.5b-instruct"], curves["qwen2.5-coder-0.5b-instruct"]
    gpu_batches = {int(b): c for b, c in report["batch_curves_ms"].items()}
    choices = {
        f"drafted by the 0.5B ({drafter[1]:.1f} ms a token), GPU": (target, drafter[1]),
        f"drafted by the 0.5B ({LLAMA_CPP_DRAFT_MS} ms a token), llama.cpp CPU": (
            LLAMA_CPP_CURVE,
            LLAMA_CPP_DRAFT_MS,
        ),
        "drafted by a 1 ms drafter, GPU": (target, 1.0),
        "verified of a free 32-token proposal, GPU": (target, 0.0),
        "verified of a free 32-token proposal, llama.cpp CPU": (LLAMA_CPP_CURVE, 0.0),
    }
    analysis = {
        "tokens per step": {
            label: {rate: verified_rows(verify, draft, rate) for rate in RATES}
            for label, (verify, draft) in choices.items()
        },
        "rows per sequence in a batch, free drafters": {
            f"{where}, {b} sequences": {rate: batch_rows(batches, b, rate) for rate in RATES}
            for where, batches in (("GPU", gpu_batches), ("PyTorch CPU", TORCH_CPU_BATCH_CURVES))
            for b in (1, 4, 16, 32, 64)
            if b in batches
        },
    }
    for section, rows in analysis.items():
        print(f"{section}, by acceptance {RATES}:")
        for label, by_rate in rows.items():
            print(f"  {label}: {list(by_rate.values())}")
    return analysis


def tokens_per_s_ar(
    model: Qwen2ForCausalLM, prompt: list[int], new_tokens: int, rounds: int
) -> dict[str, float]:
    """Plain greedy decoding, swarmspec's loop (`ar`) against `model.generate`, interleaved; medians."""
    sampling = SamplingConfig()
    times: dict[str, list[float]] = {"swarmspec ar": [], "hf-generate": []}
    outputs: dict[str, list[int]] = {}
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        chunks = decode(
            HFRunner(model), NoSpeculation(), make_verifier(sampling), prompt, max_new_tokens=new_tokens,
            policy=FixedDepth(0, 0), sampling=sampling, stop_token_ids=frozenset(),
            generator=torch.Generator().manual_seed(0), stats=DecodeStats(),
        )  # fmt: skip
        outputs["swarmspec ar"] = [t for chunk in chunks for t in chunk]
        times["swarmspec ar"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([prompt], device="cuda")
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        outputs["hf-generate"] = out[0, len(prompt) :].tolist()
        times["hf-generate"].append(time.perf_counter() - start)
    result = {name: new_tokens / statistics.median(t[1:]) for name, t in times.items()}
    result["identical"] = float(outputs["swarmspec ar"] == outputs["hf-generate"])
    return result


def measure(repeats: int) -> dict:
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ks = (*POLICY_KS, 48, 64)
    curves: dict[str, dict[int, float]] = {}
    for name in SHAPES:
        model = random_model(name, torch.float32)
        curves[name] = measure_forward_latency(HFRunner(model), ks, context_len=256, repeats=repeats)
        print(name, "fp32 ms:", {k: round(v, 2) for k, v in curves[name].items()}, flush=True)
        if name.startswith("qwen2.5-coder-1.5b"):
            prompt = torch.randint(32000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
            report["ar_tokens_per_s"] = tokens_per_s_ar(model, prompt, new_tokens=128, rounds=3)
            print("plain decoding, tokens/s:", report["ar_tokens_per_s"], flush=True)
            batched = TorchBatchedTarget(model)
            report["batch_curves_ms"] = measure_batch_latency(batched, BATCHES, BATCH_KS, 128, repeats)
            print("batched forwards, ms:", report["batch_curves_ms"], flush=True)
        del model
        torch.cuda.empty_cache()
    report["curves_ms"] = curves
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--analyze", type=Path, help="a stored report: print the policy's choices on its curves (no GPU)"
    )
    args = parser.parse_args()
    if args.analyze:
        analyze(json.loads(args.analyze.read_text()))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: torch.cuda.is_available() is False")
    report = measure(args.repeats)
    report["policy"] = analyze(report)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
