"""Decode counters are exact: cut at a stop token before counting, one definition for every figure.

Invariant over every generation: new tokens = target forwards + accepted tokens, the output holds at
most one stop token (last), and accepted tokens per drafter add up to the accepted tokens.
"""

from __future__ import annotations

import pytest
import torch

from swarmspec.drafters.lookup import PromptLookupDrafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.metrics import DecodeStats
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import ChainSpeculation, MergedTree

from tiny_models import run_decode, tiny_qwen2

STOPS = frozenset({3, 7, 11, 42, 60, 77})


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)], ids=["greedy", "t1"]
)
@pytest.mark.parametrize("method", ["chain", "tree"])
def test_counters_add_up_at_stop_tokens(method: str, sampling: SamplingConfig) -> None:
    stopped = 0
    for seed in range(30):
        target = tiny_qwen2(seed, init_std=0.1)  # flatter logits: stop tokens turn up
        agreeing = ModelDrafter(HFRunner(target))  # long accepted paths, stop tokens inside them
        if method == "chain":
            speculation = ChainSpeculation(agreeing)
        else:
            speculation = MergedTree([agreeing, PromptLookupDrafter(target.config.vocab_size)])
        prompt = torch.randint(96, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        tokens, stats = run_decode(
            target, speculation, prompt, max_new_tokens=40, gamma=5, sampling=sampling, seed=seed,
            stop_token_ids=STOPS,
        )  # fmt: skip
        stop_positions = [i for i, t in enumerate(tokens) if t in STOPS]
        assert stop_positions in ([], [len(tokens) - 1])
        stopped += bool(stop_positions)
        assert stats.new_tokens == len(tokens) == stats.target_forwards + stats.accepted_tokens
        totals = stats.totals()
        assert all((s.drafted == 0) == (s.depth == 0) and s.depth <= s.drafted for s in stats.steps)
        assert totals.drafting_forwards == sum(1 for s in stats.steps if s.drafted)
        if method == "chain":  # a chain's depth is its length
            assert totals.drafted_depth == totals.drafted_tokens
        assert 0 <= stats.accepted_tokens <= stats.drafted_tokens
        assert sum(stats.accepted_by_drafter.values()) == stats.accepted_tokens
    assert stopped >= 5  # the stop cases were exercised


def test_truncating_at_a_stop_string_keeps_counters_consistent() -> None:
    stats = DecodeStats()
    for drafted, committed in [(0, 1), (4, 5), (4, 1), (4, 3)]:
        stats.record_step(drafted, committed, accepted_by=[0] * (committed - 1))
    stats.truncate(7)  # the first two steps whole (6 tokens), one token of the third
    assert (stats.new_tokens, stats.target_forwards, stats.accepted_tokens) == (7, 3, 4)
    assert stats.new_tokens == stats.target_forwards + stats.accepted_tokens
    assert stats.accepted_by_drafter == {0: 4}
