"""The DSI simulator: non-SI, SI and DSI timelines against closed forms and DSI's guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmspec.cli import main
from swarmspec.config import SimulationConfig
from swarmspec.dsi.report import acceptance_from_report, simulate_grid, solve_acceptance
from swarmspec.dsi.simulator import (
    Setting,
    min_targets,
    non_si_latency,
    si_expected_latency,
    simulate_dsi,
    simulate_si,
)
from swarmspec.errors import InvalidRequestError
from swarmspec.profile import CostProfile, device_name

GRID = [(c, a, k) for c in (0.0, 0.05, 0.3, 1.0) for a in (0.0, 0.3, 0.7, 0.95) for k in (1, 3, 6)]


def test_non_si_takes_one_forward_per_token() -> None:
    assert non_si_latency(Setting(0.1, 0.5, 3)) == 1.0
    assert non_si_latency(Setting(0.1, 0.5, 3, verify_cost=lambda rows: 1.0 + 0.5 * (rows - 1))) == 1.0


@pytest.mark.parametrize(("c", "a", "k"), [(0.0, 0.5, 3), (0.1, 0.8, 4), (0.5, 0.3, 1), (0.05, 1.0, 5)])
def test_si_simulation_matches_its_closed_form(c: float, a: float, k: int) -> None:
    setting = Setting(c, a, k)
    assert simulate_si(setting, 40_000, seed=1) == pytest.approx(si_expected_latency(setting), rel=0.02)


def test_si_closed_form_by_hand() -> None:
    # k = 2, a = 0.5: a step costs 2 * 0.1 + 1 = 1.2 forwards and commits 1 + 0.5 + 0.25 tokens.
    assert si_expected_latency(Setting(0.1, 0.5, 2)) == pytest.approx(1.2 / 1.75)
    # every draft accepted: k + 1 tokens per step
    assert si_expected_latency(Setting(0.1, 1.0, 3)) == pytest.approx(1.3 / 4)


@pytest.mark.parametrize(("c", "a", "k"), GRID)
@pytest.mark.parametrize("preemptible", [True, False])
def test_dsi_with_one_target_instance_is_si(c: float, a: float, k: int, preemptible: bool) -> None:
    # One instance waits for k drafts and the drafter for it: nothing is ever in flight to cancel.
    setting = Setting(c, a, k, targets=1, preemptible=preemptible)
    assert simulate_dsi(setting, 2_000, seed=3) == pytest.approx(
        simulate_si(setting, 2_000, seed=3), rel=1e-9
    )


@pytest.mark.parametrize("targets", [2, 3, 8])
@pytest.mark.parametrize("preemptible", [True, False])
def test_dsi_is_never_slower_than_non_si(targets: int, preemptible: bool) -> None:
    # A job on the committed prefix is always in flight: each token is at most one forward away. Without
    # preemption too: the instance whose job just committed is free for the next one.
    for c, a, k in GRID:
        setting = Setting(c, a, k, targets, preemptible=preemptible)
        assert simulate_dsi(setting, 1_000, seed=5) <= 1.0 + 1e-9, (c, a, k)


def test_forwards_that_run_to_their_end_cost_time_that_drafter_instances_win_back() -> None:
    def latency(c: float, a: float, targets: int, drafters: int = 1, preemptible: bool = True) -> float:
        return simulate_dsi(Setting(c, a, 3, targets, drafters=drafters, preemptible=preemptible), 3_000, 1)

    settings = [(c, a, n) for c in (0.05, 0.2, 0.5) for a in (0.3, 0.7, 0.9) for n in (2, 4)]
    for c, a, n in settings:
        # With preemption a restarted drafter never waits, so more drafter instances change nothing.
        assert latency(c, a, n, drafters=3) == latency(c, a, n)
    paper = sum(latency(c, a, n) for c, a, n in settings)
    one_drafter = sum(latency(c, a, n, preemptible=False) for c, a, n in settings)
    two_drafters = sum(latency(c, a, n, drafters=2, preemptible=False) for c, a, n in settings)
    assert paper < two_drafters < one_drafter
    # A fast drafter and two instances: stale jobs hold the spare instance (measured 0.399 vs 0.445).
    assert latency(0.05, 0.7, 2, preemptible=False) > 1.05 * latency(0.05, 0.7, 2)


def test_dsi_is_faster_than_si_given_instances() -> None:
    for c, a, k in GRID:
        setting = Setting(c, a, k, targets=int(min(8, max(2, min_targets(Setting(c, a, k))))))
        assert simulate_dsi(setting, 4_000, seed=7) <= si_expected_latency(setting) * 1.03, (c, a, k)


def test_dsi_with_a_slow_wrong_drafter_is_plain_decoding_where_si_is_slower() -> None:
    setting = Setting(drafter_cost=1.0, acceptance=0.0, lookahead=2, targets=2)
    assert simulate_dsi(setting, 500) == pytest.approx(1.0)
    assert si_expected_latency(setting) == pytest.approx(3.0)


def test_min_targets() -> None:
    assert min_targets(Setting(0.1, 0.5, 2)) == 5
    assert min_targets(Setting(1.0, 0.5, 1)) == 1
    assert min_targets(Setting(0.0, 0.5, 3)) == float("inf")


def test_bad_settings_are_refused() -> None:
    for bad in ({"drafter_cost": -1}, {"acceptance": 1.5}, {"lookahead": 0}, {"targets": 0}, {"drafters": 0}):
        with pytest.raises(ValueError):
            Setting(**{"drafter_cost": 0.1, "acceptance": 0.5, "lookahead": 2, **bad})


def test_grid_speedups_are_at_least_one_against_the_best_of_si_and_non_si() -> None:
    cells = simulate_grid([0.1, 1.0], [0.2, 0.9], targets=4, lookaheads=[1, 2, 4], tokens=1_000)
    assert len(cells) == 4
    for cell in cells:
        assert cell.speedup_over_best >= 0.97 and cell.speedup_over_si >= 0.97


def test_acceptance_is_solved_from_mean_accepted_tokens() -> None:
    a = 0.6
    assert solve_acceptance(a + a**2 + a**3, 3) == pytest.approx(a, abs=1e-6)
    assert solve_acceptance(3.0, 3) == 1.0
    assert solve_acceptance(0.0, 3) == pytest.approx(0.0, abs=1e-6)


def test_acceptance_from_a_bench_report(tmp_path: Path) -> None:
    a, depth = 0.5, 4
    accepted = sum(a**i for i in range(1, depth + 1))
    rows = [
        # half of the forwards drafted: committed per forward = 1 + accepted / 2
        {"contender": "chain", "family": "overall", "mean_accepted_tokens": 1 + accepted / 2,
         "plain_share": 0.5, "mean_draft_depth": depth},
        {"contender": "ar", "family": "overall", "mean_accepted_tokens": 1.0, "plain_share": 1.0,
         "mean_draft_depth": None},
    ]  # fmt: skip
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"rows": rows}))
    assert acceptance_from_report(report, "chain") == pytest.approx(a, abs=1e-6)
    with pytest.raises(InvalidRequestError, match="no drafting contender 'ar'; it has chain"):
        acceptance_from_report(report, "ar")
    with pytest.raises(InvalidRequestError, match="cannot read bench rows"):
        acceptance_from_report(tmp_path / "missing.json", "chain")


def test_simulate_cli_grid_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    args = ["simulate", "--drafter-costs", "0.1,0.5", "--acceptances", "0.5,0.9", "--lookaheads", "1,3"]
    assert main([*args, "--tokens", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speedup over SI" in printed and "| 0.9 |" in printed
    assert "SI speedup over non-SI" in printed and "SI is slower than plain decoding in" in printed
    assert {p.name for p in out.iterdir()} == {"simulate.json", "simulate.md", "dsi-speedup.png"}
    assert len(json.loads((out / "simulate.json").read_text())["cells"]) == 4


def test_simulate_cli_trace_reads_this_machines_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    args = ["simulate", "--target", "llamacpp:big", "--drafter", "llamacpp:small", "--acceptance", "0.7"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "no stored cost profile of llamacpp:big" in capsys.readouterr().err
    CostProfile("llamacpp:big", device_name(), 256, 3, {1: 30.0, 2: 54.0, 4: 95.0, 8: 204.0}).save()
    CostProfile("llamacpp:small", device_name(), 256, 3, {1: 19.0}).save()
    assert main([*args, "--targets", "3", "--tokens", "300", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | 30.0 |" in printed and "| 3 |" in printed
    cells = json.loads((tmp_path / "b" / "simulate.json").read_text())["cells"]
    assert [c["targets"] for c in cells] == [1, 2, 3]
    assert cells[0]["dsi"] == pytest.approx(cells[0]["si"], rel=0.05)  # one instance: SI (simulated)
    assert "a cancelled forward stops at once (the paper's model)" in printed
    extra = ["--drafters", "2", "--no-preemptible", "--tokens", "300", "--out", str(tmp_path / "c")]
    assert main([*args, *extra]) == 0
    assert "DSI with 2 drafter instances, a cancelled forward runs to its end" in capsys.readouterr().out
    meta = json.loads((tmp_path / "c" / "simulate.json").read_text())["meta"]
    assert (meta["drafters"], meta["preemptible"]) == (2, False)


def test_simulation_config_refuses_half_a_trace() -> None:
    with pytest.raises(InvalidRequestError, match="needs both --target and --drafter"):
        SimulationConfig(target="llamacpp:big", acceptance=0.5)
    with pytest.raises(InvalidRequestError, match="one of --acceptance"):
        SimulationConfig(target="a", drafter="b")
    with pytest.raises(InvalidRequestError, match=r"in \[0, 1\]"):
        SimulationConfig(acceptances=(1.2,))
