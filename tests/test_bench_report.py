"""The benchmark's arithmetic on a recorded fake timing set, and the report files it writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from swarmspec.bench.report import (
    OVERALL,
    Row,
    RunRecord,
    drafter_shares_table,
    markdown_tables,
    summarize,
    write_report,
)


def record(
    contender: str,
    question: str,
    family: str,
    wall_s: float,
    tokens: list[int],
    repeat: int = 0,
    forwards: int = 0,
    drafted: int = 0,
    accepted: int = 0,
) -> RunRecord:
    """A chain run: every forward after the prefill verified drafted tokens (if any were drafted)."""
    forwards = forwards or len(tokens)
    drafting = forwards - 1 if drafted else 0
    return RunRecord(
        question, family, contender, repeat, tokens, wall_s, forwards, drafted, accepted, drafting, drafted
    )


TEN = list(range(10))
TWENTY = list(range(20))

# Two families, two repeats. hf-generate: q1 10 tokens in (2, 4) s -> median 3 s; q2 20 tokens in 4 s.
# chain: q1 (1, 1) s; q2 (2, 3) s -> median 2.5 s; q2's second repeat diverges from the reference.
RECORDS = [
    record("hf-generate", "q1", "code", 2.0, TEN),
    record("chain", "q1", "code", 1.0, TEN, forwards=4, drafted=12, accepted=6),
    record("hf-generate", "q1", "code", 4.0, TEN, repeat=1),
    record("chain", "q1", "code", 1.0, TEN, repeat=1, forwards=4, drafted=12, accepted=6),
    record("hf-generate", "q2", "rag", 4.0, TWENTY),
    record("chain", "q2", "rag", 2.0, TWENTY, forwards=5, drafted=16, accepted=15),
    record("hf-generate", "q2", "rag", 4.0, TWENTY, repeat=1),
    record("chain", "q2", "rag", 3.0, [*TWENTY[:19], 99], repeat=1, forwards=5, drafted=16, accepted=15),
]


def rows_by_key(rows: list[Row]) -> dict[tuple[str, str], Row]:
    return {(r.contender, r.family): r for r in rows}


def test_tokens_per_s_speedup_and_acceptance_from_medians() -> None:
    rows = rows_by_key(summarize(RECORDS, reference="hf-generate", greedy=True))
    ref_code, chain_code = rows["hf-generate", "code"], rows["chain", "code"]
    assert ref_code.wall_s == 3.0 and ref_code.tokens_per_s == pytest.approx(10 / 3)
    assert chain_code.tokens_per_s == pytest.approx(10.0)
    assert chain_code.speedup == pytest.approx(3.0)
    assert chain_code.mean_accepted_tokens == pytest.approx(20 / 8)  # 2 repeats x 10 tokens / 8 forwards
    assert chain_code.acceptance_rate == pytest.approx(12 / 24)
    assert chain_code.drafted_per_forward == pytest.approx(24 / 8)  # verified tree nodes per forward
    assert chain_code.identical is True

    chain_rag = rows["chain", "rag"]
    assert chain_rag.tokens_per_s == pytest.approx(20 / 2.5)
    assert chain_rag.speedup == pytest.approx((20 / 2.5) / (20 / 4))
    assert chain_rag.acceptance_rate == pytest.approx(30 / 32)
    assert chain_rag.identical is False  # one differing token in one repeat is enough

    # Overall: totals of per-question medians, not a mean of ratios.
    ref_all, chain_all = rows["hf-generate", OVERALL], rows["chain", OVERALL]
    assert ref_all.questions == 2 and ref_all.new_tokens == 30 and ref_all.wall_s == 7.0
    assert chain_all.tokens_per_s == pytest.approx(30 / 3.5)
    assert chain_all.speedup == pytest.approx((30 / 3.5) / (30 / 7))
    assert chain_all.acceptance_rate == pytest.approx(42 / 56)
    assert chain_all.mean_accepted_tokens == pytest.approx(60 / 18)
    assert chain_all.identical is False
    assert rows["hf-generate", OVERALL].speedup == 1.0
    assert rows["hf-generate", "code"].acceptance_rate is None  # nothing drafted


def test_row_order_families_then_overall() -> None:
    rows = summarize(RECORDS, reference="hf-generate", greedy=True)
    assert [(r.family, r.contender) for r in rows] == [
        ("code", "hf-generate"), ("code", "chain"), ("rag", "hf-generate"), ("rag", "chain"),
        (OVERALL, "hf-generate"), (OVERALL, "chain"),
    ]  # fmt: skip


def test_sampling_and_missing_reference() -> None:
    sampled = summarize(RECORDS, reference="hf-generate", greedy=False)
    assert all(r.identical is None for r in sampled)
    unreferenced = summarize(RECORDS, reference=None, greedy=True)
    assert all(r.speedup is None and r.identical is None for r in unreferenced)


def test_markdown_tables() -> None:
    text = markdown_tables(summarize(RECORDS, reference="hf-generate", greedy=True), "hf-generate")
    assert "**Overall** (2 questions)" in text
    # 56 drafted / 18 forwards; 4 of them (the prefills) plain; 56 deep over the 14 drafting ones.
    assert "| chain | 8.57 | 2.00x | 3.33 | 3.11 | 75.0% | 22% | 4.00 (4.00) | **NO** |" in text
    assert "| hf-generate | 4.29 | 1.00x | 1.00 | 0.00 | n/a | 100% | n/a (n/a) | yes |" in text
    assert "| contender | code | rag | overall |" in text
    assert "| chain | 3.00x (10.00) | 1.60x (8.00) | 2.00x (8.57) |" in text
    assert "| code / chain | 10.00 | 3.00x | 2.50 | 3.00 | 50.0% | 25% | 4.00 (4.00) | yes |" in text


def test_exit_depth_column_only_where_a_sorted_draft_ran() -> None:
    assert "exit depth" not in markdown_tables(summarize(RECORDS, "hf-generate", greedy=True), "hf-generate")
    # A sorted draft drafted 12 tokens running 6 + 6 + ... : 4 at 6 layers, 8 at 12 -> 10 layers each.
    sorted_run = replace(RECORDS[1], contender="sorted", exit_tokens=12, exit_layers=4 * 6 + 8 * 12)
    text = markdown_tables(summarize([*RECORDS, sorted_run], "hf-generate", greedy=True), "hf-generate")
    assert "| draft depth (size) when drafting | exit depth (layers) | identical to hf-generate |" in text
    assert "| sorted | 10.00 | 2.33x | 2.50 | 3.00 | 50.0% | 25% | 4.00 (4.00) | 10.0 | yes |" in text
    assert "| 4.00 (4.00) | n/a | **NO** |" in text  # the chain: no sorted draft


def test_pipelined_column_only_where_the_pipeline_chose() -> None:
    assert "runs pipelined" not in markdown_tables(
        summarize(RECORDS, "hf-generate", greedy=True), "hf-generate"
    )
    # The self-tuning pipeline ran q1 twice, pipelined once; q2 taking turns both times: 1 run in 4.
    runs = [
        replace(r, contender="pipeline", pipelined=r.question_id == "q1" and r.repeat == 0)
        for r in RECORDS
        if r.contender == "chain"
    ]
    rows = rows_by_key(summarize([*RECORDS, *runs], "hf-generate", greedy=True))
    assert (
        rows["pipeline", "overall"].pipelined_share == 0.25
        and rows["pipeline", "code"].pipelined_share == 0.5
    )
    assert rows["chain", "overall"].pipelined_share is None
    text = markdown_tables(list(rows.values()), "hf-generate")
    assert "| draft depth (size) when drafting | runs pipelined | identical to hf-generate |" in text
    assert "| 4.00 (4.00) | 50% | yes |" in text and "| 4.00 (4.00) | n/a | yes |" in text


def test_drafter_shares_sum_per_family_and_overall() -> None:
    tree_runs = [
        replace(record("tree", "q1", "code", 1.0, TEN), accepted_by_drafter={"m": 6, "prompt-lookup": 0}),
        replace(record("tree", "q2", "rag", 1.0, TEN), accepted_by_drafter={"m": 2, "prompt-lookup": 6}),
    ]
    table = drafter_shares_table([*RECORDS, *tree_runs])  # chain and hf-generate record no shares
    assert table.splitlines()[4:] == [
        "| overall / tree | m 8 (57%), prompt-lookup 6 (43%) |",
        "| code / tree | m 6 (100%), prompt-lookup 0 (0%) |",
        "| rag / tree | m 2 (25%), prompt-lookup 6 (75%) |",
    ]
    assert drafter_shares_table(RECORDS) == ""


def test_write_report(tmp_path: Path) -> None:
    rows = summarize(RECORDS, reference="hf-generate", greedy=True)
    meta = {"device": "test cpu", "cost_profiles": {"m": "t(1) 5 ms"}}
    paths = write_report(tmp_path / "out", meta, RECORDS, rows, "hf-generate")
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"]["device"] == "test cpu"
    assert len(payload["runs"]) == len(RECORDS) and payload["runs"][1]["token_ids"] == TEN
    assert payload["rows"][1]["speedup"] == pytest.approx(3.0)
    markdown = paths["markdown"].read_text()
    assert "- device: `test cpu`" in markdown and "cost profile m: t(1) 5 ms" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
