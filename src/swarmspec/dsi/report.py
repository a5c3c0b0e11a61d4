"""What the simulator says, as tables and heatmaps: DSI against SI and plain decoding over a grid of
drafter costs and acceptance rates, or for this machine's measured costs (trace-driven).

Each contender gets its best lookahead from the list given: SI from its closed form, DSI by simulation.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swarmspec.config import MODEL_FREE_DRAFTERS, SimulationConfig
from swarmspec.dsi.simulator import (
    Setting,
    flat_cost,
    min_targets,
    non_si_latency,
    si_expected_latency,
    simulate_dsi,
)
from swarmspec.errors import InvalidRequestError
from swarmspec.policy import StepCosts
from swarmspec.profile import CostProfile, device_name, profile_key


@dataclass(frozen=True)
class Cell:
    """One (drafter cost, acceptance) setting: latency per token of each contender, in target forwards
    (the grid) or milliseconds (a trace), each at its best lookahead."""

    drafter_cost: float
    acceptance: float
    targets: int
    non_si: float
    si: float
    si_lookahead: int
    dsi: float
    dsi_lookahead: int

    @property
    def si_speedup(self) -> float:
        """SI against plain decoding: below 1 where speculation loses."""
        return self.non_si / self.si

    @property
    def speedup_over_si(self) -> float:
        return self.si / self.dsi

    @property
    def speedup_over_best(self) -> float:
        """DSI against the faster of SI and plain decoding."""
        return min(self.si, self.non_si) / self.dsi


def best_cell(
    drafter_cost: float,
    acceptance: float,
    targets: int,
    lookaheads: Sequence[int],
    tokens: int,
    seed: int,
    verify_ms: StepCosts | None = None,
    drafters: int = 1,
    preemptible: bool = True,
) -> Cell:
    """Simulate one setting at every lookahead; keep each contender's best. With `verify_ms` the costs
    are this machine's (milliseconds; `drafter_cost` in ms too), else the paper's units. `drafters` and
    `preemptible` apply to DSI (see dsi.simulator)."""
    unit = verify_ms.verify(1) if verify_ms else 1.0
    cost = (lambda rows: verify_ms.verify(rows) / unit) if verify_ms else flat_cost

    def setting(k: int, instances: int) -> Setting:
        return Setting(drafter_cost / unit, acceptance, k, instances, cost, drafters, preemptible)

    si = min((si_expected_latency(setting(k, 1)), k) for k in lookaheads)
    dsi = min((simulate_dsi(setting(k, targets), tokens, seed), k) for k in lookaheads)
    return Cell(
        drafter_cost,
        acceptance,
        targets,
        non_si_latency(setting(1, 1)) * unit,
        si[0] * unit,
        si[1],
        dsi[0] * unit,
        dsi[1],
    )


def simulate_grid(
    drafter_costs: Sequence[float],
    acceptances: Sequence[float],
    targets: int,
    lookaheads: Sequence[int],
    tokens: int,
    seed: int = 0,
    progress: bool = False,
    drafters: int = 1,
    preemptible: bool = True,
) -> list[Cell]:
    cells = []
    for i, c in enumerate(drafter_costs):
        cells.extend(
            best_cell(c, a, targets, lookaheads, tokens, seed, None, drafters, preemptible)
            for a in acceptances
        )
        if progress:
            print(f"  drafter cost {c}: {i + 1}/{len(drafter_costs)} done", file=sys.stderr, flush=True)
    return cells


def _panels(targets: int) -> list[tuple[str, str]]:
    """(title, Cell property) of each table and heatmap of the grid."""
    return [
        ("SI speedup over non-SI (below 1: SI is slower than plain decoding)", "si_speedup"),
        (f"DSI ({targets} target instances) speedup over the faster of SI and non-SI", "speedup_over_best"),
        (f"DSI ({targets} target instances) speedup over SI", "speedup_over_si"),
    ]


def _grid(cells: Sequence[Cell], value: str) -> tuple[list[float], list[float], list[list[float]]]:
    """Drafter costs, acceptance rates, and `value` per [rate][cost]."""
    costs = sorted({c.drafter_cost for c in cells})
    rates = sorted({c.acceptance for c in cells})
    by_key = {(c.drafter_cost, c.acceptance): c for c in cells}
    return costs, rates, [[getattr(by_key[c, a], value) for c in costs] for a in rates]


def grid_tables(cells: Sequence[Cell]) -> str:
    """Markdown, acceptance rows x drafter-cost columns: SI against non-SI, then DSI's speedups."""
    parts = []
    for title, value in _panels(cells[0].targets):
        costs, rates, grid = _grid(cells, value)
        header = "| a \\ c | " + " | ".join(f"{c:g}" for c in costs) + " |"
        lines = [f"### {title}", "", header, "|" + "---|" * (len(costs) + 1)]
        for a, row in zip(rates, grid, strict=True):
            lines.append(f"| {a:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        parts.append("\n".join(lines))
    worst = min(c.speedup_over_best for c in cells)
    slower = sum(c.si_speedup < 1 for c in cells)
    parts.append(
        f"DSI against the faster of SI and non-SI: {worst:.2f}x at worst over the {len(cells)} settings; "
        f"SI is slower than plain decoding in {slower} of them."
    )
    costs = sorted({c.drafter_cost for c in cells})
    needed = ", ".join(f"c={c:g}: {min_targets(Setting(c, 0.5, 1))}" for c in costs)
    parts.append(f"Target instances DSI needs at lookahead 1 so the drafter never waits, ceil(1/c): {needed}")
    return "\n\n".join(parts) + "\n"


def plot_grid(cells: Sequence[Cell], path: Path) -> None:
    """Heatmaps over (drafter cost, acceptance): SI over non-SI, DSI over min(SI, non-SI), DSI over SI;
    the red line bounds the region where SI is slower than plain decoding."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    _, _, si_grid = _grid(cells, "si_speedup")
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, (title, value) in zip(axes, _panels(cells[0].targets), strict=True):
        costs, rates, grid = _grid(cells, value)
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=7)
        if min(map(min, si_grid)) < 1 < max(map(max, si_grid)):
            ax.contour(si_grid, levels=[1.0], colors="red", linewidths=1.5)
        ax.set_xticks(range(len(costs)), [f"{c:g}" for c in costs])
        ax.set_yticks(range(len(rates)), [f"{a:g}" for a in rates])
        ax.set_xlabel("drafter cost c (target forwards per drafted token)")
        ax.set_ylabel("acceptance rate a")
        ax.set_title(textwrap.fill(title, 50), fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_table(cells: Sequence[Cell]) -> str:
    """Markdown: predicted milliseconds per token for each number of target instances."""
    lines = [
        "| target instances | non-SI ms/token | SI ms/token (best k) | DSI ms/token (best k) | "
        "DSI over SI | DSI over non-SI |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        si, dsi = f"{c.si:.1f} ({c.si_lookahead})", f"{c.dsi:.1f} ({c.dsi_lookahead})"
        speedups = f"{c.speedup_over_si:.2f}x | {c.non_si / c.dsi:.2f}x"
        lines.append(f"| {c.targets} | {c.non_si:.1f} | {si} | {dsi} | {speedups} |")
    return "\n".join(lines) + "\n"


def acceptance_from_report(path: Path, contender: str) -> float:
    """The i.i.d. acceptance rate a that explains a bench contender's overall figures: with drafts of
    mean depth d, a forward that drafts accepts a + a^2 + ... + a^d tokens in expectation; solved for a.
    An estimate: the real rate varies with depth and position."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise InvalidRequestError(f"cannot read bench rows from {path}: {err}") from None
    row = next((r for r in rows if r["contender"] == contender and r["family"] == "overall"), None)
    if row is None or not row.get("mean_draft_depth"):
        names = sorted({r["contender"] for r in rows if r.get("mean_draft_depth")})
        raise InvalidRequestError(
            f"{path} has no drafting contender {contender!r}; it has {', '.join(names)}"
        )
    depth = row["mean_draft_depth"]
    accepted = (row["mean_accepted_tokens"] - 1) / (1 - row["plain_share"])
    return solve_acceptance(accepted, depth)


def solve_acceptance(accepted: float, depth: float) -> float:
    """The a in [0, 1] with a + a^2 + ... + a^depth = accepted (depth may be fractional), by bisection."""
    if accepted >= depth:
        return 1.0

    def expected(a: float) -> float:
        return a * (1 - a**depth) / (1 - a) if a < 1 else depth

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < accepted else (low, mid)
    return (low + high) / 2


def write_json(path: Path, meta: dict, cells: Sequence[Cell]) -> None:
    path.write_text(json.dumps({"meta": meta, "cells": [asdict(c) for c in cells]}, indent=1))


@dataclass(frozen=True)
class SimulationResult:
    markdown: str
    paths: dict[str, Path]


def run_simulation(config: SimulationConfig, command_line: str = "") -> SimulationResult:
    """The grid (default) or a trace of this machine's profiles; writes simulate.json, simulate.md and,
    for the grid, dsi-speedup.png."""
    out = Path(config.out or f"simulate-results/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": command_line, **asdict(config)}
    paths = {"json": out / "simulate.json", "markdown": out / "simulate.md"}
    if config.trace:
        costs, draft_ms = stored_costs(config)
        acceptance = (
            config.acceptance
            if config.acceptance is not None
            else acceptance_from_report(Path(config.report or ""), config.contender)
        )
        meta |= {"device": device_name(), "verify_ms": costs.verify_ms, "draft_token_ms": draft_ms}
        meta["acceptance_used"] = round(acceptance, 4)
        cells = [
            best_cell(
                draft_ms,
                acceptance,
                n,
                config.lookaheads,
                config.tokens,
                config.seed,
                costs,
                config.drafters,
                config.preemptible,
            )
            for n in range(1, config.targets + 1)
        ]
        title = (
            f"Trace: {config.target} verified, {config.drafter} drafting ({draft_ms:.1f} ms/token), "
            f"acceptance {acceptance:.2f}, t(1) {costs.verify(1):.1f} ms; {_dsi_forwards(config)}"
        )
        tables = trace_table(cells)
    else:
        cells = simulate_grid(
            config.drafter_costs,
            config.acceptances,
            config.targets,
            config.lookaheads,
            config.tokens,
            config.seed,
            progress=True,
            drafters=config.drafters,
            preemptible=config.preemptible,
        )
        paths["plot"] = out / "dsi-speedup.png"
        plot_grid(cells, paths["plot"])
        title = (
            "Grid: time in target forwards, i.i.d. acceptance, verification costs 1 forward; "
            + _dsi_forwards(config)
        )
        tables = grid_tables(cells)
    write_json(paths["json"], meta, cells)
    markdown = f"# swarmspec simulate\n\n{title}\n\n{tables}"
    paths["markdown"].write_text(markdown)
    return SimulationResult(markdown, paths)


def _dsi_forwards(config: SimulationConfig) -> str:
    drafters = f"{config.drafters} drafter instance{'s' if config.drafters > 1 else ''}"
    if config.preemptible:
        return f"DSI with {drafters}, a cancelled forward stops at once (the paper's model)"
    return f"DSI with {drafters}, a cancelled forward runs to its end (swarmspec's orchestrator)"


def stored_costs(config: SimulationConfig) -> tuple[StepCosts, float]:
    """This machine's stored profile of the target (t(k) in ms) and the drafter's ms per token (0 for
    a model-free drafter)."""

    def profile(spec: str, threads: int) -> dict[int, float]:
        key = profile_key(spec, threads)
        stored = CostProfile.load(key)
        if stored is None:
            raise InvalidRequestError(
                f"no stored cost profile of {key} on this machine ({device_name()}); measure it with "
                f"`swarmspec profile --target {spec} --target-threads {threads}`"
            )
        return stored.latency_ms

    assert config.target and config.drafter
    verify_ms = profile(config.target, config.target_threads)
    draft_ms = (
        0.0 if config.drafter in MODEL_FREE_DRAFTERS else profile(config.drafter, config.drafter_threads)[1]
    )
    return StepCosts(verify_ms, (draft_ms,)), draft_ms
