"""Cost profiles: measured per k, stored per model and device, read back by the adaptive policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmspec.profile import CostProfile, format_table, measure_forward_latency

from tiny_models import TrigramLM


def test_measure_save_load_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMSPEC_CACHE", str(tmp_path))
    runner = TrigramLM(seed=0)
    latency = measure_forward_latency(runner, ks=[1, 2, 4], context_len=16, repeats=2)
    assert sorted(latency) == [1, 2, 4] and all(ms > 0 for ms in latency.values())
    assert runner.cached_len == 16  # every timed forward was rolled back

    profile = CostProfile("int8:some-model", "test cpu x2 threads", 16, 2, latency)
    path = profile.save()
    assert path.is_relative_to(tmp_path)
    assert CostProfile.load("int8:some-model", "test cpu x2 threads") == profile
    assert CostProfile.load("int8:some-model", "another device") is None
    assert profile.ratio(1) == 1.0
    table = format_table([profile])
    assert "int8:some-model" in table and len(table.splitlines()) == 3 + 3
