"""Question files in Spec-Bench's format: parsing, selection, and errors that name the line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from swarmspec.bench.questions import (
    QuestionFileError,
    load_questions,
    select_questions,
)


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def q(question_id: object, category: str, text: str = "Say hi.") -> dict:
    return {"question_id": question_id, "category": category, "turns": [text, "second turn, ignored"]}


def test_parses_first_turn_and_groups_mt_bench(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "q.jsonl", q(81, "writing", "Write a poem."), "", q(82, "coding"), q(7, "rag")
    )
    questions = load_questions(path)
    assert [(x.question_id, x.category, x.family) for x in questions] == [
        ("81", "writing", "mt-bench"), ("82", "coding", "mt-bench"), ("7", "rag", "rag"),
    ]  # fmt: skip
    assert questions[0].prompt == "Write a poem."


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError, match=r"question file .*nope\.jsonl does not exist"):
        load_questions(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question_id": 2, "category": "qa", "turns": ["x"]', r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        (json.dumps({"question_id": 2, "turns": ["x"]}), r"line 2: missing category"),
        (json.dumps({"question_id": 2, "category": "qa", "turns": []}), r"line 2: 'turns' must be a list"),
        (json.dumps({"question_id": 2, "category": "qa", "turns": "x"}), r"line 2: 'turns' must be a list"),
        (json.dumps({"question_id": 2, "category": "", "turns": ["x"]}), r"line 2: 'category' must be"),
        (json.dumps(q(1, "qa")), r"line 2: duplicate question_id 1"),
    ],
)
def test_bad_line_is_named(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "q.jsonl", q(1, "qa"), bad_line, q(3, "qa"))
    with pytest.raises(QuestionFileError, match=rf"q\.jsonl, {message}"):
        load_questions(path)


def test_empty_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(QuestionFileError, match="no questions"):
        load_questions(write_lines(tmp_path / "empty.jsonl", ""))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(QuestionFileError, match="cannot read question file"):
        load_questions(binary)


def test_select_by_family_category_and_count(tmp_path: Path) -> None:
    questions = load_questions(
        write_lines(tmp_path / "q.jsonl", q(1, "writing"), q(2, "math"), q(3, "rag"), q(4, "rag"), q(5, "qa"))
    )
    assert [x.question_id for x in select_questions(questions, ["mt-bench", "rag"], 1)] == ["1", "3"]
    assert [x.question_id for x in select_questions(questions, ["math"])] == ["2"]
    assert [x.question_id for x in select_questions(questions, (), 1)] == ["1", "3", "5"]
    with pytest.raises(QuestionFileError, match="unknown categories translation; the questions have: "):
        select_questions(questions, ["translation"])
    with pytest.raises(QuestionFileError, match="--per-category must be >= 1"):
        select_questions(questions, (), 0)


def test_builtin_set_covers_six_task_kinds() -> None:
    counts = Counter(x.family for x in load_questions(None))
    assert set(counts) == {"code", "explanation", "summarization", "translation", "math_reasoning", "qa"}
    assert min(counts.values()) >= 3
