"""`swarmspec bench` end to end on the real packaged models: a tiny run writes a complete report.

Slow: loads the 1.5B target and the 0.5B drafter on llama.cpp (the default) and the 1.5B on PyTorch
for `hf-generate`. Figures are not asserted (timing belongs to the benchmark, not the tests); every
swarmspec method's token identity with `llama-cpp` (plain llama.cpp decoding of the same GGUF) is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmspec.cli import main
from swarmspec.config import LLAMA_CPP_BASELINES, METHODS

pytestmark = pytest.mark.slow


def test_bench_report_complete_and_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    args = ["bench", "--categories", "qa,translation", "--per-category", "1", "--max-new-tokens", "12"]
    variant = ["--variant", "chain-g2:method=chain,gamma=2"]  # one more contender, its own gamma
    assert main([*args, *variant, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "**Overall** (2 questions)" in printed and f"json: {out / 'bench.json'}" in printed

    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["command"].startswith("swarmspec bench --categories qa,translation")
    assert report["meta"]["max_new_tokens"] == 12
    overall = {r["contender"]: r for r in report["rows"] if r["family"] == "overall"}
    assert list(overall) == [*METHODS, "chain-g2", *LLAMA_CPP_BASELINES, "hf-generate"]
    swarmspec = [*METHODS, "chain-g2"]
    assert all(row["identical"] is True for row in report["rows"] if row["contender"] in swarmspec)
    assert report["meta"]["variants"] == "chain-g2:method=chain,gamma=2"
    assert overall["llama-cpp"]["speedup"] == 1.0
    assert {r["family"] for r in report["runs"]} == {"qa", "translation"}
    assert all(0 < len(r["token_ids"]) <= 12 for r in report["runs"])
    assert (out / "speedup.png").stat().st_size > 0
    assert "| contender | translation | qa | overall |" in (out / "bench.md").read_text()  # file order
