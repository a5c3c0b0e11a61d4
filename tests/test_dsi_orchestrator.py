"""DSI on threads and the pipeline: the output equals plain decoding for any drafter and any number of
target instances, stale work is never committed, sampling stays exact, the pipelined drafter drafts while
the target verifies, and threads end with the generation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from swarmspec.drafters.base import Draft, Drafter
from swarmspec.drafters.lookup import PromptLookupDrafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.dsi.orchestrator import LocalInstance, dsi_decode
from swarmspec.errors import SwarmspecError
from swarmspec.metrics import DecodeStats
from swarmspec.policy import CostModelPolicy, SpeculationPolicy, StepCosts
from swarmspec.runners.base import ModelRunner
from swarmspec.runners.hf import HFRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.verify import Verifier, make_verifier

from test_decode_greedy import greedy_accepting_one_extra, prompt_for
from test_sampling_exact import (
    NEW_TOKENS,
    PROMPT,
    SAMPLING_CONFIGS,
    VOCAB,
    broken,
    exact_distribution,
    p_value,
    trigram_target,
)
from tiny_models import TrigramLM, run_decode, tiny_qwen2


def run_dsi(
    instances: list[ModelRunner],
    drafter: Drafter,
    prompt: list[int],
    max_new_tokens: int,
    lookahead: int = 3,
    sampling: SamplingConfig | None = None,
    verifier: Verifier | None = None,
    seed: int = 0,
    stop_token_ids: frozenset[int] = frozenset(),
    pipeline: bool = False,
    policy: SpeculationPolicy | None = None,
) -> tuple[list[int], DecodeStats]:
    sampling = sampling or SamplingConfig()
    stats = DecodeStats()
    chunks = dsi_decode(
        [LocalInstance(runner) for runner in instances], drafter, verifier or make_verifier(sampling), prompt,
        max_new_tokens=max_new_tokens, lookahead=lookahead, sampling=sampling,
        stop_token_ids=stop_token_ids, generator=torch.Generator().manual_seed(seed), stats=stats,
        pipeline=pipeline, policy=policy,
    )  # fmt: skip
    return [t for chunk in chunks for t in chunk], stats


class ReferenceDrafter(Drafter):
    """Proposes the target's own greedy continuation, wrong at chosen absolute output positions (a
    position is wrong every time it is drafted), or always wrong."""

    def __init__(self, reference: list[int], prompt_len: int, wrong: set[int] | None = None) -> None:
        self.reference, self.prompt_len = reference, prompt_len
        self.wrong = set(range(len(reference))) if wrong is None else wrong

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        start = len(context) - self.prompt_len
        tokens = []
        for i, token in enumerate(self.reference[start : start + max_tokens], start):
            # Past a wrong token the context is not the target's any more: what follows is wrong too.
            if i in self.wrong or context[self.prompt_len :] != self.reference[:start]:
                token = (token + 1) % 96
            tokens.append(token)
        return Draft.of(tokens)


class SlowRunner(HFRunner):
    """An HF runner that takes at least `delay` seconds per forward, so jobs overlap."""

    def __init__(self, model, delay: float) -> None:
        super().__init__(model)
        self.delay = delay

    def forward(self, input_ids, num_logits, tree_mask=None):
        time.sleep(self.delay)
        return super().forward(input_ids, num_logits, tree_mask)


def dsi_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("swarmspec-dsi")]


# (target instances, pipelined): DSI, and the pipeline on one instance (the engine's) or on several.
LAYOUTS = [(1, False), (2, False), (3, False), (1, True), (2, True)]
LAYOUT_IDS = [f"{n}{'-pipelined' if pipelined else ''}" for n, pipelined in LAYOUTS]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("targets", "pipeline"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("lookahead", [1, 3])
def test_random_drafter_matches_plain_decoding(
    seed: int, targets: int, pipeline: bool, lookahead: int
) -> None:
    target, other = tiny_qwen2(seed), tiny_qwen2(seed + 100)
    prompt = prompt_for(seed, 3 + seed * 5)
    reference, _ = run_decode(target, None, prompt, 40)
    instances = [HFRunner(target) for _ in range(targets)]
    output, stats = run_dsi(
        instances, ModelDrafter(HFRunner(other)), prompt, 40, lookahead, pipeline=pipeline
    )
    assert output == reference
    assert stats.new_tokens == 40
    # With more instances, or pipelined, the target decodes on while this drafter (as slow as the target
    # here) drafts, and commits before the drafts are back; slow targets: the test below.
    if targets == 1 and not pipeline:
        assert stats.drafted_tokens > 0


@pytest.mark.parametrize(("targets", "pipeline"), [(1, False), (2, False), (4, False), (1, True)])
@pytest.mark.parametrize("wrong", [None, set(), {0, 5, 6, 17}, set(range(3, 40, 4))], ids=str)
def test_scripted_drafters_match_plain_decoding(targets: int, pipeline: bool, wrong: set[int] | None) -> None:
    target = tiny_qwen2(7)
    prompt = prompt_for(7, 5)
    reference, _ = run_decode(target, None, prompt, 40)
    drafter = ReferenceDrafter(reference, len(prompt), wrong)
    instances = [HFRunner(target) for _ in range(targets)]
    output, stats = run_dsi(instances, drafter, prompt, 40, lookahead=3, pipeline=pipeline)
    assert output == reference
    if wrong is None:  # always wrong: one token per job, as plain decoding
        assert stats.accepted_tokens == 0
    elif not wrong:  # always right
        assert stats.acceptance_rate == 1.0 and stats.target_forwards < 40 // 2


class BusyRunner(SlowRunner):
    """A slow runner that says when it is in a forward."""

    def __init__(self, model, delay: float) -> None:
        super().__init__(model, delay)
        self.busy = threading.Event()

    def forward(self, input_ids, num_logits, tree_mask=None):
        self.busy.set()
        try:
            return super().forward(input_ids, num_logits, tree_mask)
        finally:
            self.busy.clear()


class WatchingDrafter(ReferenceDrafter):
    """Counts the drafts it starts while the target is in a forward."""

    def __init__(self, target: BusyRunner, reference: list[int], prompt_len: int, wrong: set[int]) -> None:
        super().__init__(reference, prompt_len, wrong)
        self.target, self.while_verifying = target, 0

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        self.while_verifying += self.target.busy.is_set()
        time.sleep(0.005)  # a drafter takes time too
        return super().propose(context, max_tokens, sampling, generator)


@pytest.mark.parametrize("pipeline", [False, True])
def test_the_pipelined_drafter_drafts_while_the_target_verifies(pipeline: bool) -> None:
    target = tiny_qwen2(6)
    prompt = prompt_for(6, 5)
    reference, _ = run_decode(target, None, prompt, 40)
    runner = BusyRunner(target, 0.03)
    drafter = WatchingDrafter(runner, reference, len(prompt), wrong={7, 19, 30})
    output, stats = run_dsi([runner], drafter, prompt, 40, lookahead=3, pipeline=pipeline)
    assert output == reference
    if pipeline:
        assert drafter.while_verifying > 10
        assert stats.accepted_tokens > 20
    else:  # one instance without the pipeline takes turns: the drafter waits for every verification
        assert drafter.while_verifying <= 1  # (it may start during the prompt's forward)


# The pipeline's `--gamma auto`: drafting is overlapped, so only the target's cost curve counts.
FLAT = {1: 10.0, 2: 10.5, 4: 11.0, 8: 12.0, 16: 14.0}  # GPU-like: rows are nearly free
MODERATE = {1: 10.0, 2: 13.0, 4: 19.0, 8: 31.0, 16: 55.0}
STEEP = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0}  # every row as dear as a forward: speculation cannot pay


def pipeline_policy(curve: dict[int, float], max_depth: int = 8) -> CostModelPolicy:
    return CostModelPolicy(StepCosts(curve, (0.0,)), max_depth)


class RowCountingRunner(SlowRunner):
    """A slow runner that records how many drafted tokens each forward verifies (its rows but the
    first, which gives the token after the committed ones; the prompt's forward is not recorded)."""

    def __init__(self, model, delay: float) -> None:
        super().__init__(model, delay)
        self.drafted_rows: list[int] = []

    def forward(self, input_ids, num_logits, tree_mask=None):
        if self.cached_len:
            self.drafted_rows.append(num_logits - 1)
        return super().forward(input_ids, num_logits, tree_mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("curve", [FLAT, MODERATE, STEEP], ids=["flat", "moderate", "steep"])
def test_the_self_tuning_pipeline_matches_plain_decoding(seed: int, curve: dict[int, float]) -> None:
    target, other = tiny_qwen2(seed), tiny_qwen2(seed + 100)
    prompt = prompt_for(seed, 3 + seed * 5)
    reference, _ = run_decode(target, None, prompt, 40)
    for drafter in (ModelDrafter(HFRunner(other)), ReferenceDrafter(reference, len(prompt), {3, 4, 20})):
        runner = SlowRunner(target, 0.01)  # drafts pile up while the target verifies
        policy = pipeline_policy(curve)
        output, stats = run_dsi([runner], drafter, prompt, 40, 8, pipeline=True, policy=policy)
        assert output == reference
        assert stats.new_tokens == 40


def test_the_self_tuning_pipeline_verifies_deep_on_a_flat_curve_and_nothing_on_a_steep_one() -> None:
    target = tiny_qwen2(6)
    prompt = prompt_for(6, 5)
    reference, _ = run_decode(target, None, prompt, 40)
    forwards = {}
    for name, curve in (("flat", FLAT), ("steep", STEEP)):
        drafter = ReferenceDrafter(reference, len(prompt), wrong=set())  # always right
        runner, policy = RowCountingRunner(target, 0.03), pipeline_policy(curve)
        output, stats = run_dsi([runner], drafter, prompt, 40, 8, pipeline=True, policy=policy)
        assert output == reference
        forwards[name] = stats.target_forwards
        if name == "steep":  # not even a draft the target accepts would pay: plain decoding
            assert set(runner.drafted_rows) == {0}
        else:
            assert max(runner.drafted_rows) == 8
    # Steep: one token a forward, but for the drafts made during a forward, which its last row checks.
    assert forwards["flat"] <= 40 // 3 < 40 // 2 <= forwards["steep"]


def test_a_policy_chooses_the_jobs_of_one_instance_only() -> None:
    target = tiny_qwen2(1)
    with pytest.raises(ValueError, match="one target instance"):
        run_dsi([HFRunner(target)] * 2, PromptLookupDrafter(96), [1, 2, 3], 5, policy=pipeline_policy(FLAT))


def test_prompt_lookup_drafter_matches_plain_decoding() -> None:
    target = tiny_qwen2(2)
    prompt = prompt_for(2, 8) * 3  # repetitive: lookup finds matches
    reference, _ = run_decode(target, None, prompt, 50)
    output, _ = run_dsi(
        [HFRunner(target) for _ in range(2)], PromptLookupDrafter(96), prompt, 50, lookahead=4
    )
    assert output == reference


def test_a_rejection_cancels_the_jobs_in_flight_after_it() -> None:
    target = tiny_qwen2(5)
    prompt = prompt_for(5, 6)
    reference, _ = run_decode(target, None, prompt, 30)
    drafter = ReferenceDrafter(reference, len(prompt), wrong={4, 13, 14, 22})
    instances: list[ModelRunner] = [SlowRunner(target, 0.02) for _ in range(4)]
    output, stats = run_dsi(instances, drafter, prompt, 30, lookahead=2)
    assert output == reference  # nothing stale was committed
    assert stats.discarded_forwards > len(instances) - 1  # beyond the other instances' prefills
    assert stats.new_tokens == sum(step.committed for step in stats.steps) == 30


def test_broken_verifier_is_caught() -> None:
    target = tiny_qwen2(0)
    prompt = prompt_for(0, 8)
    reference, _ = run_decode(target, None, prompt, 40)
    drafter = ReferenceDrafter(reference, len(prompt), wrong={3, 10, 25})
    output, _ = run_dsi(
        [HFRunner(target) for _ in range(2)], drafter, prompt, 40, verifier=greedy_accepting_one_extra
    )
    assert output != reference


def test_stops_at_a_stop_token() -> None:
    target = tiny_qwen2(3)
    prompt = prompt_for(3, 4)
    reference, _ = run_decode(target, None, prompt, 60)
    stop = reference[17]
    expected = reference[: reference.index(stop) + 1]
    drafter = ReferenceDrafter(reference, len(prompt), wrong={9})
    output, stats = run_dsi([HFRunner(target)] * 1 + [HFRunner(target)], drafter, prompt, 60, lookahead=4,
                            stop_token_ids=frozenset([stop]))  # fmt: skip
    assert output == expected and stats.new_tokens == len(expected)


class CrashingDrafter(Drafter):
    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def propose(self, context, max_tokens, sampling, generator) -> Draft:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("drafter bug")
        return Draft.of([0] * max_tokens)


def test_a_crashing_drafter_leaves_plain_decoding(caplog: pytest.LogCaptureFixture) -> None:
    target = tiny_qwen2(4)
    prompt = prompt_for(4, 6)
    reference, _ = run_decode(target, None, prompt, 30)
    for targets, pipeline in ((1, False), (2, False), (1, True)):
        instances = [HFRunner(target) for _ in range(targets)]
        output, _ = run_dsi(instances, CrashingDrafter(2), prompt, 30, pipeline=pipeline)
        assert output == reference
    assert "drafter bug" in caplog.text


class BrokenRunner(HFRunner):
    def forward(self, input_ids, num_logits, tree_mask=None):
        raise RuntimeError("device lost")


def test_a_failing_target_instance_fails_the_request_and_stops_every_thread() -> None:
    target = tiny_qwen2(4)
    prompt = prompt_for(4, 6)
    with pytest.raises(SwarmspecError, match=r"target instance .* failed.*device lost"):
        run_dsi([HFRunner(target), BrokenRunner(target)], ModelDrafter(HFRunner(tiny_qwen2(9))), prompt, 30)
    assert dsi_threads() == []


@pytest.mark.parametrize(("targets", "pipeline"), [(2, False), (1, True)])
def test_threads_end_when_the_consumer_stops_early(targets: int, pipeline: bool) -> None:
    target = tiny_qwen2(4)
    greedy = SamplingConfig()
    chunks = dsi_decode(
        [LocalInstance(HFRunner(target)) for _ in range(targets)], ModelDrafter(HFRunner(tiny_qwen2(9))),
        make_verifier(greedy),
        prompt_for(4, 6), max_new_tokens=50, lookahead=2, sampling=greedy, stop_token_ids=frozenset(),
        generator=torch.Generator().manual_seed(0), stats=DecodeStats(), pipeline=pipeline,
    )  # fmt: skip
    next(chunks)
    assert dsi_threads()
    chunks.close()
    assert dsi_threads() == []


class PacedTrigramLM(TrigramLM):
    def forward(self, input_ids, num_logits, tree_mask=None):
        time.sleep(0.001)
        return super().forward(input_ids, num_logits, tree_mask)


def dsi_sampled_counts(
    verifier: Verifier, sampling: SamplingConfig, samples: int, pipeline: str = ""
) -> torch.Tensor:
    """The first NEW_TOKENS tokens of `samples` generations (trigram target): DSI on 2 instances, or
    pipelined on one ("fixed": every draft up to the lookahead; "auto": what a policy selects)."""
    generator = torch.Generator().manual_seed(4321)
    counts = torch.zeros(VOCAB**NEW_TOKENS, dtype=torch.float64)
    # A forward takes a millisecond, so that the drafter, on its own thread, has drafts ready to verify.
    instances = [LocalInstance(PacedTrigramLM(seed=1, vocab_size=VOCAB)) for _ in range(1 if pipeline else 2)]
    drafter = ModelDrafter(TrigramLM(seed=2, vocab_size=VOCAB))
    for _ in range(samples):
        tokens = dsi_decode(
            instances, drafter, verifier, PROMPT, max_new_tokens=NEW_TOKENS + 1, lookahead=2,
            sampling=sampling, stop_token_ids=frozenset(), generator=generator, stats=DecodeStats(),
            pipeline=bool(pipeline), policy=pipeline_policy(MODERATE, 2) if pipeline == "auto" else None,
        )  # fmt: skip
        t1, t2, t3, _ = (t for chunk in tokens for t in chunk)
        counts[(t1 * VOCAB + t2) * VOCAB + t3] += 1
    return counts


@pytest.mark.parametrize("pipeline", ["", "fixed", "auto"], ids=["dsi", "pipeline", "pipeline-auto"])
@pytest.mark.parametrize("sampling", SAMPLING_CONFIGS, ids=["t1.0", "t1.3-topk4-topp0.95"])
def test_sampling_through_dsi_matches_the_target_distribution(
    sampling: SamplingConfig, pipeline: str
) -> None:
    counts = dsi_sampled_counts(make_verifier(sampling), sampling, 3_000, pipeline)
    assert p_value(counts, exact_distribution(trigram_target().next_logits, sampling)) > 1e-3


@pytest.mark.parametrize("pipeline", ["", "fixed", "auto"], ids=["dsi", "pipeline", "pipeline-auto"])
def test_broken_sampling_verifier_fails_through_dsi(pipeline: str) -> None:
    sampling = SAMPLING_CONFIGS[0]
    counts = dsi_sampled_counts(broken("target_instead_of_residual", sampling), sampling, 3_000, pipeline)
    assert p_value(counts, exact_distribution(trigram_target().next_logits, sampling)) < 1e-6


def test_refuses_bad_settings() -> None:
    target = tiny_qwen2(1)
    with pytest.raises(ValueError, match="lookahead"):
        run_dsi([HFRunner(target)], PromptLookupDrafter(96), [1, 2, 3], 5, lookahead=0)
