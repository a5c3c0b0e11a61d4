"""A/B harness: chain (int8 draft model) self-tuning against fixed deep gammas, in summarization."""
import dataclasses, sys
from swarmspec.bench import run as R
from swarmspec.bench.contenders import SwarmspecMethod
from swarmspec.config import BenchConfig
from swarmspec.engine import Engine

GAMMAS = (6, 10)
orig = R.build_contenders
def build(engine_configs, baselines, target, draft_models, assistant, **kw):
    out = orig(engine_configs, baselines, target, draft_models, assistant, **kw)
    extra = []
    for c in engine_configs:
        for g in GAMMAS:
            cg = dataclasses.replace(c, gamma=g)
            extra.append(SwarmspecMethod(f"{c.method}-g{g}", Engine.from_models(cg, target, draft_models), cg.drafters))
    n = len(engine_configs)
    return out[:n] + extra + out[n:]
R.build_contenders = build
cfg = BenchConfig(questions='/work/shared/data/spec_bench_dev.jsonl', categories=tuple(sys.argv[3].split(',')),
                  per_category=int(sys.argv[2]), max_new_tokens=128,
                  methods=("chain",), baselines=("hf-generate", "hf-assisted"),
                  target="onednn:qwen2.5-coder-1.5b-instruct",
                  drafters=("int8:qwen2.5-coder-0.5b-instruct",), out=sys.argv[1])
res = R.run_bench(cfg, "python ab.py " + " ".join(sys.argv[1:]))
print(res.markdown)
