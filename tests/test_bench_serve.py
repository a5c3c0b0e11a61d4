"""The load benchmark end to end on tiny models: real servers, the `openai` client, every speculation
length at every concurrency level, answers compared with each request served alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmspec.bench.load import run_load_bench
from swarmspec.config import AUTO, LoadBenchConfig
from swarmspec.errors import InvalidRequestError

from tiny_models import tiny_loaded


def test_bench_serve_reports_every_length_and_level(tmp_path: Path) -> None:
    target = tiny_loaded("tiny-target", 1)
    target.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}t3"
    config = LoadBenchConfig(
        target=target.spec,
        concurrency=(1, 3),
        gammas=(0, 2, AUTO),
        requests_per_client=2,
        min_requests=2,
        max_tokens=6,
        rounds=2,
        out_dir=str(tmp_path),
    )
    report = run_load_bench(config, target, {})
    # The servers take turns, their order turning each round.
    assert [(r.round, r.concurrency, r.gamma) for r in report.results] == [
        *[(0, level, gamma) for level in (1, 3) for gamma in ("0", "2", "auto")],
        *[(1, level, gamma) for level in (1, 3) for gamma in ("2", "auto", "0")],
    ]
    assert [r.requests for r in report.results] == [2, 2, 2, 6, 6, 6] * 2
    median, rounds = report.throughput(3, "auto")
    assert len(rounds) == 2 and median == pytest.approx(sum(rounds) / 2)
    assert report.best_fixed(3) in ("0", "2")
    by_run = {(r.round, r.concurrency, r.gamma): r.tokens_per_s for r in report.results}
    assert report.paired_ratios(3, "0") == [by_run[(n, 3, "auto")] / by_run[(n, 3, "0")] for n in (0, 1)]
    assert report.mismatches() == []  # every answer equals the request served alone
    assert all(r.completion_tokens > 0 and len(r.latency_s) == r.requests for r in report.results)
    assert all(r.drafted_per_step == 0 for r in report.results if r.gamma == "0")
    paths = report.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["mismatches"] == [] and len(data["results"]) == 12
    markdown = paths["markdown"].read_text()
    assert "**all** of them" in markdown and "| 1 | 3 | auto |" in markdown
    assert paths["plot"].stat().st_size > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concurrency": (0, 2)}, "concurrency levels must be >= 1"),
        ({"gammas": (-1,)}, "gamma must be >= 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"rounds": 0}, "rounds must be >= 1"),
    ],
)
def test_bench_serve_config_errors(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        LoadBenchConfig(**fields)
