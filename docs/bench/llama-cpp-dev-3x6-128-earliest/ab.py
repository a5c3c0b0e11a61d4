"""A/B harness (not committed), llama.cpp: chain on prompt lookup latest vs earliest, tree/vote with both."""
import dataclasses, sys
from swarmspec.bench import run as R
from swarmspec.bench.contenders import SwarmspecMethod
from swarmspec.config import BenchConfig
from swarmspec.engine import Engine

orig = R.build_contenders
def build(engine_configs, baselines, target, draft_models, assistant, **kw):
    out = orig(engine_configs, baselines, target, draft_models, assistant, **kw)
    extra = []
    for c in engine_configs:
        if c.method == "chain":
            c2 = dataclasses.replace(c, drafters=("prompt-lookup-earliest",))
            extra.append(SwarmspecMethod("chain+earliest", Engine.from_models(c2, target, draft_models), c2.drafters))
        if c.method in ("tree", "vote"):
            d = list(c.drafters); d.insert(d.index("prompt-lookup") + 1, "prompt-lookup-earliest")
            c4 = dataclasses.replace(c, drafters=tuple(d))
            extra.append(SwarmspecMethod(c.method + "+earliest", Engine.from_models(c4, target, draft_models), c4.drafters))
    n = len(engine_configs)
    return out[:n] + extra + out[n:]
R.build_contenders = build
cfg = BenchConfig(questions='/work/shared/data/spec_bench_dev.jsonl', per_category=int(sys.argv[2]), max_new_tokens=128,
                  methods=tuple(sys.argv[3].split(',')), baselines=("llama-cpp",),
                  drafters=("prompt-lookup", "suffix"), out=sys.argv[1])
res = R.run_bench(cfg, "bench_ab_llama " + " ".join(sys.argv[1:]))
print(res.markdown)
