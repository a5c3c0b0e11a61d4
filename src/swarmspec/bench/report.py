"""The benchmark's arithmetic and its report: JSON (everything), Markdown (tables), PNG (speedup plot).

Pure functions over recorded runs, so the figures can be checked on a fake timing set.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarmspec.metrics import Totals

OVERALL = "overall"
HOW_TO_READ = (
    "tokens/s: new tokens / wall time, prefill included; per question the median over repeats, per "
    "family the total of those. Speedup: tokens/s over the reference's, measured in the same run. Mean "
    "accepted tokens / target forward: committed tokens per target forward, the prefill counted (plain "
    "decoding: 1.00). Drafted tokens / target forward: tokens (tree nodes) verified per forward beside "
    "the target's own, what the accepted ones cost. Acceptance rate: accepted / drafted tokens. Forwards "
    "without drafts: plain decoding steps (the prefill counts as one). Draft depth (size) when drafting: "
    "over the forwards that verified drafted tokens, the mean depth of the verified tree and its nodes. "
    "Runs pipelined (the self-tuning pipeline): the share of its runs it chose to pipeline rather than "
    "take turns."
)


@dataclass(frozen=True)
class RunRecord:
    """One timed generation of one question by one contender."""

    question_id: str
    family: str
    contender: str
    repeat: int
    token_ids: list[int]
    wall_s: float
    target_forwards: int
    drafted_tokens: int
    accepted_tokens: int
    drafting_forwards: int = 0  # forwards that verified at least one drafted token
    drafted_depth: int = 0  # summed over those: the verified tree's depth
    # Accepted tokens per proposing drafter (swarmspec methods only).
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    exit_tokens: int = 0  # sorted drafts: tokens drafted, and the layers they ran
    exit_layers: int = 0
    pipelined: bool | None = None  # the self-tuning pipeline: whether it ran pipelined (else took turns)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def totals(self) -> Totals:
        return Totals(
            self.new_tokens,
            self.target_forwards,
            self.drafted_tokens,
            self.accepted_tokens,
            self.wall_s,
            self.drafting_forwards,
            self.drafted_depth,
            self.exit_tokens,
            self.exit_layers,
        )


@dataclass(frozen=True)
class Row:
    """One contender on one task family (or `overall`)."""

    contender: str
    family: str
    questions: int
    new_tokens: float  # sum over questions of the median over repeats
    wall_s: float  # likewise
    tokens_per_s: float
    speedup: float | None  # tokens/s over the reference's on the same questions; None without reference
    mean_accepted_tokens: float  # tokens committed per target forward, all repeats
    drafted_per_forward: float  # drafted tokens (tree nodes) verified per target forward, all repeats
    acceptance_rate: float | None  # accepted / drafted tokens, all repeats; None when nothing was drafted
    plain_share: float  # share of target forwards that verified no drafted token, all repeats
    mean_draft_depth: float | None  # verified depth over the forwards that drafted; None: none did
    mean_draft_size: float | None  # verified drafted tokens over the forwards that drafted
    mean_exit_depth: float | None  # sorted drafts: layers run per drafted token; None: no sorted draft
    # The self-tuning pipeline: the share of its runs that ran pipelined; None: no such choice.
    pipelined_share: float | None
    identical: bool | None  # every output token-identical to the reference's; None when sampling


def summarize(records: Sequence[RunRecord], reference: str | None, greedy: bool) -> list[Row]:
    """Rows per contender (in first-seen order) and family, then `overall` per contender.

    Per question, wall time and new tokens are medians over repeats; a family's tokens/s is the total of
    those medians (tokens over seconds), so long answers weigh as much as they cost. Speedup divides by
    the reference's tokens/s on the same questions; with greedy decoding every output is compared with
    the reference's output for the same question.
    """
    contenders = list(dict.fromkeys(r.contender for r in records))
    families = list(dict.fromkeys(r.family for r in records))
    reference_ids = {
        r.question_id: r.token_ids for r in records if r.contender == reference and r.repeat == 0
    }

    def row(contender: str, family: str) -> Row | None:
        runs = [r for r in records if r.contender == contender and family in (OVERALL, r.family)]
        if not runs:
            return None
        by_question: dict[str, list[RunRecord]] = {}
        for r in runs:
            by_question.setdefault(r.question_id, []).append(r)
        # Timing: per question the median over repeats; counts: every run. Figures: `metrics.Totals`.
        timing = sum(
            (
                Totals(
                    new_tokens=statistics.median(r.new_tokens for r in rs),
                    wall_s=statistics.median(r.wall_s for r in rs),
                )
                for rs in by_question.values()
            ),
            Totals(),
        )
        counts = sum((r.totals() for r in runs), Totals())
        chosen = [r.pipelined for r in runs if r.pipelined is not None]
        identical = None
        if greedy and reference_ids:
            identical = all(r.token_ids == reference_ids.get(r.question_id) for r in runs)
        return Row(
            contender=contender,
            family=family,
            questions=len(by_question),
            new_tokens=timing.new_tokens,
            wall_s=timing.wall_s,
            tokens_per_s=timing.tokens_per_s,
            speedup=None,
            mean_accepted_tokens=counts.mean_accepted_tokens,
            drafted_per_forward=counts.drafted_per_forward,
            acceptance_rate=counts.acceptance_rate,
            plain_share=counts.plain_share or 0.0,
            mean_draft_depth=counts.mean_draft_depth,
            mean_draft_size=counts.mean_draft_size,
            mean_exit_depth=counts.mean_exit_depth,
            pipelined_share=sum(chosen) / len(chosen) if chosen else None,
            identical=identical,
        )

    rows = [r for f in [*families, OVERALL] for c in contenders if (r := row(c, f)) is not None]
    speed = {(r.contender, r.family): r.tokens_per_s for r in rows}
    return [
        Row(**{**asdict(r), "speedup": r.tokens_per_s / speed[(reference, r.family)]})
        if (reference, r.family) in speed and speed[(reference, r.family)] > 0
        else r
        for r in rows
    ]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_tables(rows: Sequence[Row], reference: str | None) -> str:
    """The overall table, then speedup by task family, then every figure per family."""
    ref = reference or "none"
    yes_no = {True: "yes", False: "**NO**", None: "n/a"}
    # Columns only where they apply: a sorted draft ran, the pipeline chose whether to pipeline.
    exits = any(r.mean_exit_depth is not None for r in rows)
    chose = any(r.pipelined_share is not None for r in rows)
    extra_columns = (" exit depth (layers) |" if exits else "") + (" runs pipelined |" if chose else "")
    header = (
        f"| contender | tokens/s | speedup vs {ref} | mean accepted tokens / target forward "
        f"| drafted tokens / target forward | acceptance rate | forwards without drafts "
        f"| draft depth (size) when drafting |{extra_columns} identical to {ref} |"
        "\n|---|---|---|---|---|---|---|---|" + "---|" * (exits + chose) + "---|"
    )

    def line(r: Row, first: str) -> str:
        return (
            f"| {first} | {r.tokens_per_s:.2f} | {_fmt(r.speedup, '.2f', 'x')} "
            f"| {r.mean_accepted_tokens:.2f} | {r.drafted_per_forward:.2f} "
            f"| {_fmt(None if r.acceptance_rate is None else r.acceptance_rate * 100, '.1f', '%')} "
            f"| {r.plain_share * 100:.0f}% "
            f"| {_fmt(r.mean_draft_depth, '.2f')} ({_fmt(r.mean_draft_size, '.2f')}) "
            + (f"| {_fmt(r.mean_exit_depth, '.1f')} " if exits else "")
            + (
                f"| {_fmt(None if r.pipelined_share is None else r.pipelined_share * 100, '.0f', '%')} "
                if chose
                else ""
            )
            + f"| {yes_no[r.identical]} |"
        )

    overall = [r for r in rows if r.family == OVERALL]
    families = list(dict.fromkeys(r.family for r in rows if r.family != OVERALL))
    contenders = [r.contender for r in overall]
    cell = {(r.contender, r.family): r for r in rows}
    questions = overall[0].questions if overall else 0
    parts = [f"**Overall** ({questions} questions)\n", header, *(line(r, r.contender) for r in overall)]
    parts += [
        f"\n**Speedup vs {ref} by task family** (tokens/s in parentheses)\n",
        "| contender | " + " | ".join(families) + f" | {OVERALL} |",
        "|---" * (len(families) + 2) + "|",
    ]
    for c in contenders:
        cells = [
            f"{_fmt(cell[c, f].speedup, '.2f', 'x')} ({cell[c, f].tokens_per_s:.2f})"
            if (c, f) in cell
            else "-"
            for f in [*families, OVERALL]
        ]
        parts.append(f"| {c} | " + " | ".join(cells) + " |")
    parts += ["\n**Per task family**\n", header.replace("| contender |", "| family / contender |", 1)]
    parts += [line(r, f"{r.family} / {r.contender}") for r in rows if r.family != OVERALL]
    return "\n".join(parts) + "\n"


def report_tables(rows: Sequence[Row], records: Sequence[RunRecord], reference: str | None) -> str:
    """Every table of the report: figures, then who proposed the accepted tokens."""
    shares = drafter_shares_table(records)
    return markdown_tables(rows, reference) + (f"\n{shares}" if shares else "")


def drafter_shares_table(records: Sequence[RunRecord]) -> str:
    """Who proposed the accepted tokens, per contender with several drafters: overall, then per family.
    Empty when no contender has more than one drafter."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        if len(r.accepted_by_drafter) < 2:
            continue
        for family in (OVERALL, r.family):
            counts = totals.setdefault((family, r.contender), dict.fromkeys(r.accepted_by_drafter, 0))
            for drafter, accepted in r.accepted_by_drafter.items():
                counts[drafter] = counts.get(drafter, 0) + accepted
    if not totals:
        return ""
    lines = [
        "**Accepted tokens by proposing drafter** (where several drafters proposed a node, the first "
        "merged is credited)\n",
        "| family / contender | accepted tokens (share) |",
        "|---|---|",
    ]
    for (family, contender), counts in sorted(totals.items(), key=lambda kv: kv[0][0] != OVERALL):
        total = sum(counts.values())
        shares = ", ".join(
            f"{drafter} {n} ({n / total:.0%})" if total else f"{drafter} 0" for drafter, n in counts.items()
        )
        lines.append(f"| {family} / {contender} | {shares} |")
    return "\n".join(lines) + "\n"


def plot_speedups(rows: Sequence[Row], reference: str | None, path: Path) -> None:
    """Grouped bars: speedup vs the reference per task family, one bar per contender."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows))  # families first, `overall` last
    contenders = list(dict.fromkeys(r.contender for r in rows))
    speedup = {(r.contender, r.family): r.speedup or 0.0 for r in rows}
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(families) * len(contenders) + 2), 4.5))
    for i, contender in enumerate(contenders):
        xs = [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(families))]
        ax.bar(xs, [speedup.get((contender, f), 0.0) for f in families], width, label=contender)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(families)), families, rotation=20)
    ax.set_ylabel(f"speedup vs {reference or 'none'} (tokens/s ratio)")
    ax.set_title("swarmspec bench: speedup by task family")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out_dir: Path,
    meta: dict[str, Any],
    records: Sequence[RunRecord],
    rows: Sequence[Row],
    reference: str | None,
) -> dict[str, Path]:
    """bench.json (meta, rows, every run with its tokens), bench.md and speedup.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"json": "bench.json", "markdown": "bench.md", "plot": "speedup.png"}
    paths = {kind: out_dir / name for kind, name in names.items()}
    payload = {
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in records],
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    tables = report_tables(rows, records, reference)
    paths["markdown"].write_text(f"# swarmspec bench\n\n{markdown_meta(meta)}\n{HOW_TO_READ}\n\n{tables}")
    plot_speedups(rows, reference, paths["plot"])
    return paths


def markdown_meta(meta: dict[str, Any]) -> str:
    lines = [f"- {key}: `{value}`" for key, value in meta.items() if not isinstance(value, dict | list)]
    for name, profile in meta.get("cost_profiles", {}).items():
        lines.append(f"- cost profile {name}: {profile}")
    return "\n".join(lines) + "\n"
