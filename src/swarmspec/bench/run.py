"""Run the benchmark: load the models once, time every contender on every question, interleaved, and
write the report.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from swarmspec.bench.contenders import Contender, build_contenders
from swarmspec.bench.order import balanced_order
from swarmspec.bench.questions import Question, load_questions, select_questions
from swarmspec.bench.report import Row, RunRecord, report_tables, summarize, write_report
from swarmspec.config import BenchConfig, EngineConfig
from swarmspec.engine import encode_prompt
from swarmspec.errors import InvalidRequestError
from swarmspec.models.loading import LoadedModel, check_spec, load_model
from swarmspec.profile import CostProfile, device_name
from swarmspec.sampling import SamplingConfig

WARMUP_TOKENS = 8


@dataclass(frozen=True)
class BenchResult:
    rows: list[Row]
    markdown: str
    paths: dict[str, Path]


def time_contenders(
    contenders: Sequence[Contender],
    questions: Sequence[tuple[Question, list[int]]],
    *,
    repeats: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> list[RunRecord]:
    """Time every contender on every (question, prompt ids), interleaved: each repeat of each question
    runs every contender once, in an order that changes from one to the next (`balanced_order`).

    Interleaving spreads machine drift (other jobs, thermal state) over all contenders alike, and the
    changing order spreads what one run leaves to the next. Each contender first generates a few tokens
    untimed, so one-time set-up costs stay out of the figures.
    """
    first_prompt = questions[0][1]
    for contender in contenders:
        contender.generate(first_prompt, WARMUP_TOKENS, sampling, seed)
    records: list[RunRecord] = []
    total = len(questions) * repeats * len(contenders)
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not progress) as bar:
        for index, (question, prompt_ids) in enumerate(questions):
            for repeat in range(repeats):
                round_records: dict[int, RunRecord] = {}
                for i in balanced_order(len(contenders), index * repeats + repeat):
                    contender = contenders[i]
                    bar.set_postfix_str(f"{question.family} #{question.question_id} {contender.name}")
                    outcome = contender.generate(prompt_ids, max_new_tokens, sampling, seed + index)
                    run = {"question_id": question.question_id, "family": question.family, "repeat": repeat}
                    # An outcome's fields are the record's, by name.
                    round_records[i] = RunRecord(**run, contender=contender.name, **asdict(outcome))
                    bar.update()
                records.extend(round_records[i] for i in range(len(contenders)))  # in the contenders' order
    return records


def reference_contender(names: Sequence[str]) -> str | None:
    """Speedups and token identity are against plain decoding by the tool users would pick on the
    target's backend: `llama-cpp` (same GGUF), else `hf-generate`, else swarmspec's own `ar`."""
    return next((name for name in ("llama-cpp", "hf-generate", "ar") if name in names), None)


def run_bench(config: BenchConfig, command_line: str | None = None) -> BenchResult:
    questions = select_questions(load_questions(config.questions), config.categories, config.per_category)
    for spec in (config.target, *config.model_drafters):  # fail on a bad name before loading weights
        check_spec(spec)
    out_dir = Path(config.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")

    specs = [config.target, *config.model_drafters, *([config.hf_target] if config.hf_target else [])]
    print(f"loading {', '.join(specs)} ...", file=sys.stderr, flush=True)
    target = load_model(config.target)
    draft_models = {spec: load_model(spec) for spec in config.model_drafters}
    hf_target = load_model(config.hf_target) if config.hf_target else None
    prompts = [(q, encode_prompt(target.tokenizer, q.prompt, chat=True)) for q in questions]
    limit = target.max_length
    for question, ids in prompts:
        if len(ids) + config.max_new_tokens > limit:
            raise InvalidRequestError(
                f"question {question.question_id}: prompt ({len(ids)} tokens) + max_new_tokens "
                f"({config.max_new_tokens}) exceeds the target's context of {limit} tokens"
            )
    engine_configs = config.contender_configs()
    assistant = draft_models.get(config.assistant)
    assert config.baselines is not None
    contenders = build_contenders(
        engine_configs,
        config.baselines,
        target,
        draft_models,
        assistant,
        hf_target=hf_target,
        threads=config.target_threads or None,
    )
    names = [c.name for c in contenders]
    families = sorted({q.family for q in questions})
    print(
        f"{len(questions)} questions ({', '.join(families)}) x {len(contenders)} contenders "
        f"({', '.join(names)}) x {config.repeats} repeats, {config.max_new_tokens} new tokens",
        file=sys.stderr,
        flush=True,
    )
    started = time.time()
    records = time_contenders(
        contenders,
        prompts,
        repeats=config.repeats,
        max_new_tokens=config.max_new_tokens,
        sampling=config.sampling,
        seed=config.seed,
    )
    reference = reference_contender(names)
    rows = summarize(records, reference, greedy=config.sampling.greedy)
    meta = run_metadata(config, engine_configs, target, draft_models, command_line, time.time() - started)
    paths = write_report(out_dir, meta, records, rows, reference)
    return BenchResult(rows, report_tables(rows, records, reference), paths)


def tree_description(config: EngineConfig) -> str:
    shape = config.tree_shape
    if shape is None:
        return "every drafter's chain merged into one trie"
    return f"{shape} grown from the first model drafter, the other drafters' chains merged in"


def run_metadata(
    config: BenchConfig,
    engine_configs: Sequence[tuple[str, EngineConfig]],
    target: LoadedModel,
    draft_models: dict[str, LoadedModel],
    command_line: str | None,
    elapsed_s: float,
) -> dict[str, Any]:
    """Everything needed to reproduce the run and read its figures."""
    device = device_name()
    profiles: dict[str, str] = {}
    for model in (target, *draft_models.values()):
        profile = CostProfile.load(model.spec, device)
        if profile is None:
            profiles[model.spec] = f"not measured here (run: swarmspec profile --target {model.spec})"
            continue
        ks = [k for k in (1, 2, 4, 8, 16, 32) if k in profile.latency_ms]
        cells = ", ".join(f"t({k}) {profile.latency_ms[k]:.0f} ms" for k in sorted(set(ks)))
        profiles[model.spec] = f"{cells} ({profile.context_len} cached tokens, median of {profile.repeats})"
    return {
        "command": command_line or shlex.join(sys.argv),
        "device": device,
        "target": target.spec,
        "drafters": "; ".join(f"{name}: {', '.join(c.drafters)}" for name, c in engine_configs if c.drafters),
        "tree": "; ".join(f"{n}: {tree_description(c)}" for n, c in engine_configs if c.method == "tree")
        or "-",
        "variants": "; ".join(config.variants) or "-",
        "hf-assisted assistant": config.assistant if "hf-assisted" in config.baselines else "-",
        "swarmspec": importlib.metadata.version("swarmspec"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "elapsed_s": round(elapsed_s, 1),
        "max_new_tokens": config.max_new_tokens,
        "repeats": config.repeats,
        "gamma": config.gamma,
        "sampling": "greedy" if config.sampling.greedy else str(config.sampling),
        "config": asdict(config),
        "cost_profiles": profiles,
    }
