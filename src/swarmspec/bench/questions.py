"""Benchmark questions in Spec-Bench's format: one JSON object per line with `question_id`, `category`
and `turns` (only the first turn is asked).

Spec-Bench reports six task families; its multi-turn conversation family (MT-Bench) is spread over
eight categories, which are grouped back into `mt-bench` here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from swarmspec.errors import SwarmspecError

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
BUILTIN = "built-in"


class QuestionFileError(SwarmspecError):
    """A question file that is missing or not in Spec-Bench's format."""


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str  # as written in the file, e.g. "writing"
    family: str  # the task family the report groups by, e.g. "mt-bench"
    prompt: str  # the first turn


def task_family(category: str) -> str:
    return "mt-bench" if category in MT_BENCH_CATEGORIES else category


def parse_questions(lines: Sequence[str], source: str) -> list[Question]:
    """Parse JSON lines; every mistake names `source` and the 1-based line."""
    questions: list[Question] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise QuestionFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise QuestionFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in ("question_id", "category", "turns") if key not in record]
        if missing:
            raise QuestionFileError(f"{where}: missing {', '.join(missing)}")
        turns, category = record["turns"], record["category"]
        if not isinstance(category, str) or not category:
            raise QuestionFileError(f"{where}: 'category' must be a non-empty string")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise QuestionFileError(f"{where}: 'turns' must be a list whose first item is a non-empty string")
        question_id = str(record["question_id"])
        if question_id in seen:
            raise QuestionFileError(f"{where}: duplicate question_id {question_id}")
        seen.add(question_id)
        questions.append(Question(question_id, category, task_family(category), turns[0]))
    if not questions:
        raise QuestionFileError(f"{source}: no questions")
    return questions


def load_questions(path: str | Path | None) -> list[Question]:
    """Questions from a JSONL file, or the built-in set when `path` is None."""
    if path is None:
        text = resources.files("swarmspec.bench").joinpath("builtin_questions.jsonl").read_text("utf-8")
        return parse_questions(text.splitlines(), BUILTIN)
    path = Path(path)
    if not path.is_file():
        raise QuestionFileError(f"question file {path} does not exist")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise QuestionFileError(f"cannot read question file {path}: {err}") from None
    return parse_questions(text.splitlines(), str(path))


def select_questions(
    questions: Sequence[Question], categories: Sequence[str] = (), per_category: int | None = None
) -> list[Question]:
    """The first `per_category` questions of each task family, of the families (or categories) asked for."""
    if per_category is not None and per_category < 1:
        raise QuestionFileError(f"--per-category must be >= 1, got {per_category}")
    known = {q.family for q in questions} | {q.category for q in questions}
    unknown = sorted(set(categories) - known)
    if unknown:
        raise QuestionFileError(
            f"unknown categories {', '.join(unknown)}; the questions have: {', '.join(sorted(known))}"
        )
    wanted = set(categories)
    taken: dict[str, int] = {}
    selected = []
    for question in questions:
        if wanted and question.family not in wanted and question.category not in wanted:
            continue
        if per_category is not None and taken.get(question.family, 0) >= per_category:
            continue
        taken[question.family] = taken.get(question.family, 0) + 1
        selected.append(question)
    return selected
