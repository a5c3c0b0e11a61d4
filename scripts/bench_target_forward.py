"""Benchmark the target model's k-token forward on CPU (eager vs torch.compile variants).

For each variant and each k, the script prefills a fixed context (default 200 tokens) into a
``transformers.DynamicCache`` once, then times forwards of k new tokens on top of it, removing the k
tokens again after every forward with ``cache.crop(-k)``.  It reports the median latency t(k) and the
ratio t(k)/t(1), plus compile time for compiled variants.  Optional checks compare a variant's logits
with eager fp32 logits, its greedy continuation with eager ``generate``, and (for eager) whether a
k-token forward equals k one-token forwards ("batch invariance").

Run one variant per process (compile state is process-global), e.g.::

    python scripts/bench_target_forward.py --model /tmp/probe/q15/hf --variant eager
    python scripts/bench_target_forward.py --model /tmp/probe/q15/hf --variant compile-dynamic --check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from swarmspec.models.loading import pack_linears_onednn

VARIANTS = (
    "eager",  # sdpa attention (transformers default)
    "eager-attn",  # attn_implementation="eager"
    "compile-dynamic",  # torch.compile(forward, dynamic=True), default mode
    "compile-tokdim",  # torch.compile(forward), only the token dim marked dynamic
    "compile-ma-dynamic",  # max-autotune-no-cudagraphs + freezing, dynamic=True
    "compile-ma-tokdim",  # max-autotune-no-cudagraphs + freezing, token dim dynamic
    "eager-onednn",  # eager, every nn.Linear routed to oneDNN with a pre-packed fp32 weight
)

Forward = Callable[[torch.Tensor, DynamicCache], torch.Tensor]
PROMPT = "Write a Python function that parses an ISO-8601 date string and returns a datetime object."


def build_context(tok: Any, n: int) -> torch.Tensor:
    """Deterministic context of exactly ``n`` real tokens (chat prompt, repeated if short)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT * 8}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids[0]
    while ids.numel() < n + 64:
        ids = torch.cat([ids, ids])
    return ids[: n + 64].unsqueeze(0)


def make_forward(model: torch.nn.Module, variant: str) -> tuple[Forward, str]:
    """Return (forward(ids, cache) -> logits, description) for a variant."""

    def raw(ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    if variant in ("eager", "eager-attn"):
        return raw, variant
    if variant == "eager-onednn":
        pack_linears_onednn(model)  # the same conversion as the `onednn:` model variant
        return raw, variant
    import torch._inductor.config as ind_cfg

    torch._dynamo.config.cache_size_limit = 64
    mode = None
    if variant.startswith("compile-ma"):
        ind_cfg.freezing = True
        mode = "max-autotune-no-cudagraphs"
    dynamic = True if variant.endswith("dynamic") else None
    compiled = torch.compile(raw, mode=mode, dynamic=dynamic)
    if variant.endswith("tokdim"):

        def fwd(ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
            torch._dynamo.mark_dynamic(ids, 1)
            return compiled(ids, cache)

        return fwd, f"{variant} (mode={mode})"
    return compiled, f"{variant} (mode={mode}, dynamic={dynamic})"


def bench(
    fwd: Forward, ctx: torch.Tensor, ks: list[int], n_ctx: int, runs: int, warmup: int
) -> dict[int, list[float]]:
    """Median-ready latency samples (ms) for a k-token forward on top of an n_ctx-token cache."""
    cache = DynamicCache()
    fwd(ctx[:, :n_ctx], cache)
    times: dict[int, list[float]] = {}
    for k in ks:
        ids = ctx[:, n_ctx : n_ctx + k].contiguous()
        samples = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            fwd(ids, cache)
            dt = (time.perf_counter() - t0) * 1e3
            cache.crop(-k)
            assert cache.get_seq_length() == n_ctx
            if i >= warmup:
                samples.append(dt)
        times[k] = samples
        print(f"  k={k:3d}  median {statistics.median(samples):8.1f} ms  {[round(s, 1) for s in samples]}")
    return times


def logits_k(fwd: Forward, ctx: torch.Tensor, n_ctx: int, k: int) -> torch.Tensor:
    """Logits of a k-token forward on top of an n_ctx-token prefix (fresh cache)."""
    cache = DynamicCache()
    fwd(ctx[:, :n_ctx], cache)
    return fwd(ctx[:, n_ctx : n_ctx + k], cache)[0].float()


def logits_one_by_one(fwd: Forward, ctx: torch.Tensor, n_ctx: int, k: int) -> torch.Tensor:
    """Logits for the same k positions, obtained one token per forward."""
    cache = DynamicCache()
    fwd(ctx[:, :n_ctx], cache)
    rows = [fwd(ctx[:, n_ctx + i : n_ctx + i + 1], cache)[0, -1].float() for i in range(k)]
    return torch.stack(rows)


def greedy(fwd: Forward, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding of n tokens with a given forward (one token per step)."""
    cache = DynamicCache()
    logits = fwd(prompt, cache)
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = fwd(torch.tensor([[nxt]]), cache)
    return out


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "bitwise_equal": bool(torch.equal(a, b)),
        "argmax_mismatches": int((a.argmax(-1) != b.argmax(-1)).sum()),
        "rows": int(a.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", choices=VARIANTS, default="eager")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep default)")
    ap.add_argument("--ks", default="1,2,4,8,16,32")
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="compare logits/greedy tokens with eager fp32")
    ap.add_argument("--batch-invariance", action="store_true", help="eager k-token vs 1-token logits")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--json", default="", help="write results to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    attn = "eager" if args.variant == "eager-attn" else "sdpa"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    print(f"loaded in {time.perf_counter() - t0:.1f}s; threads={torch.get_num_threads()} attn={attn}")
    ctx = build_context(tok, args.ctx)
    result: dict[str, Any] = {"variant": args.variant, "threads": torch.get_num_threads(), "attn": attn}

    with torch.inference_mode():
        eager_fwd, _ = make_forward(model, "eager")
        ref_logits: dict[int, torch.Tensor] = {}
        msgs = [{"role": "user", "content": PROMPT}]
        prompt = tok.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        if args.check:
            for k in (1, 8):
                ref_logits[k] = logits_k(eager_fwd, ctx, args.ctx, k)
            gen = model.generate(**prompt, do_sample=False, max_new_tokens=32)
            ref_tokens = gen[0, prompt["input_ids"].shape[1] :].tolist()
        if args.batch_invariance:
            bi = {}
            for k in (2, 8, 32):
                batched = logits_k(eager_fwd, ctx, args.ctx, k)
                bi[k] = compare(batched, logits_one_by_one(eager_fwd, ctx, args.ctx, k))
                print(f"batch invariance k={k}: {bi[k]}")
            result["batch_invariance"] = bi

        fwd, desc = make_forward(model, args.variant)
        print(f"variant: {desc}")
        if args.variant.startswith("compile"):
            # Compile time: first call of each shape family (prefill + one decode shape + a second one).
            t0 = time.perf_counter()
            cache = DynamicCache()
            fwd(ctx[:, : args.ctx], cache)
            t_first = time.perf_counter() - t0
            for k in ks:
                t1 = time.perf_counter()
                fwd(ctx[:, args.ctx : args.ctx + k], cache)
                cache.crop(-k)
                print(f"  first call k={k}: {time.perf_counter() - t1:.1f}s")
            result["compile_s"] = {"first_call": t_first, "total_warm": time.perf_counter() - t0}
            print(f"compile: first call {t_first:.1f}s, all shapes {time.perf_counter() - t0:.1f}s")
        if not args.no_bench:
            times = bench(fwd, ctx, ks, args.ctx, args.runs, args.warmup)
            med = {k: statistics.median(v) for k, v in times.items()}
            result["median_ms"] = med
            result["samples_ms"] = times
            if 1 in med:
                print("ratios t(k)/t(1): " + ", ".join(f"{k}:{med[k] / med[1]:.2f}" for k in ks))
        if args.check:
            chk = {k: compare(logits_k(fwd, ctx, args.ctx, k), ref_logits[k]) for k in ref_logits}
            toks = greedy(fwd, prompt["input_ids"], 32)
            chk["greedy_32_equal_generate"] = toks == ref_tokens
            pairs = enumerate(zip(toks, ref_tokens, strict=True))
            chk["greedy_first_diff"] = next((i for i, (a, b) in pairs if a != b), None)
            print(f"check vs eager: {chk}")
            result["check"] = chk
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
