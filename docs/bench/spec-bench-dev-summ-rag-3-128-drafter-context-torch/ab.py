"""A/B harness: chain and vote with the draft model seeing the whole prompt or a window of it."""
import dataclasses, sys
from swarmspec.bench import run as R
from swarmspec.bench.contenders import SwarmspecMethod
from swarmspec.config import BenchConfig
from swarmspec.engine import Engine

WINDOWS = {"chain": (256,), "vote": (256, 128)}
orig = R.build_contenders
def build(engine_configs, baselines, target, draft_models, assistant, **kw):
    out = orig(engine_configs, baselines, target, draft_models, assistant, **kw)
    extra = []
    for c in engine_configs:
        for w in WINDOWS.get(c.method, ()):
            cw = dataclasses.replace(c, drafter_context=w)
            extra.append(SwarmspecMethod(f"{c.method}@{w}", Engine.from_models(cw, target, draft_models), cw.drafters))
    n = len(engine_configs)
    return out[:n] + extra + out[n:]
R.build_contenders = build
cfg = BenchConfig(questions='/work/shared/data/spec_bench_dev.jsonl', categories=tuple(sys.argv[3].split(',')),
                  per_category=int(sys.argv[2]), max_new_tokens=128,
                  methods=("chain", "vote"), baselines=("hf-generate", "hf-assisted", "hf-prompt-lookup"),
                  target="onednn:qwen2.5-coder-1.5b-instruct",
                  drafters=("int8:qwen2.5-coder-0.5b-instruct", "prompt-lookup", "suffix"), out=sys.argv[1])
res = R.run_bench(cfg, "python ab.py " + " ".join(sys.argv[1:]))
print(res.markdown)
