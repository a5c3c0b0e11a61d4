"""Continuous batching (runners/batch.py): sequences decoded concurrently, their target forwards run as
one batched forward, give each the tokens it gets alone; sequences join and leave every step; the
batch-aware policy turns speculation down as the batch grows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from swarmspec.config import EngineConfig
from swarmspec.drafters.lookup import PromptLookupDrafter
from swarmspec.drafters.model import ModelDrafter
from swarmspec.errors import InvalidRequestError
from swarmspec.policy import BatchPeers, CostModelPolicy, StepCosts
from swarmspec.runners.batch import PREFILL_CHUNK, BatchSlot, Forward, TorchBatchedTarget
from swarmspec.runners.hf import HFRunner
from swarmspec.speculate import MergedTree, NoSpeculation, Speculation

from tiny_models import VOCAB, run_decode, tiny_qwen2

TARGET, DRAFT = tiny_qwen2(0), tiny_qwen2(1)


def prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (count,), generator=generator).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def speculation(kind: str) -> Speculation:
    if kind == "ar":
        return NoSpeculation()
    if kind == "tree":
        return MergedTree([ModelDrafter(HFRunner(DRAFT)), PromptLookupDrafter(VOCAB)])
    return MergedTree([ModelDrafter(HFRunner(DRAFT))])  # a chain


def concurrently(jobs: list[Callable[[], list[int]]]) -> list[list[int]]:
    results: list[list[int] | BaseException] = [[] for _ in jobs]

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # handed to the test's thread
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("seed", range(4))
def test_batched_sequences_equal_each_alone(seed: int) -> None:
    """Chains, trees and plain decoding of different gammas and lengths, batched, give each sequence's
    tokens alone; sequences join and leave while others run (with odd seeds, their prompts a few tokens
    per step)."""
    batch = prompts(10, seed)
    kinds = ["chain", "tree", "ar"]
    plans = [(p, kinds[i % 3], 1 + (i + seed) % 4, 8 + 5 * (i % 4)) for i, p in enumerate(batch)]
    alone = [run_decode(TARGET, speculation(kind), p, new, gamma=gamma)[0] for p, kind, gamma, new in plans]
    batched = TorchBatchedTarget(TARGET, prefill_chunk=7 if seed % 2 else PREFILL_CHUNK)
    together = concurrently(
        [
            lambda p=p, kind=kind, gamma=gamma, new=new: run_decode(
                TARGET, speculation(kind), p, new, gamma=gamma, runner=batched.slot()
            )[0]
            for p, kind, gamma, new in plans
        ]
    )
    assert together == alone
    assert batched.steps < sum(len(t) for t in alone) / 2  # forwards were shared
    assert not batched.rows and batched.cache is None  # everyone left


def test_long_prompt_joins_a_part_per_step_while_the_batch_decodes() -> None:
    """Chunked prefill: a 30-token prompt joins in parts of 8 while a running sequence decodes a token
    in each of those steps; both get the logits they get alone, the prompt's rows asked for across two
    parts included."""
    short, long = (
        prompts(1, 21)[0][:6],
        torch.randint(2, VOCAB, (30,), generator=torch.Generator().manual_seed(4)),
    )
    runner = HFRunner(TARGET)
    short_rows = [runner.forward(torch.tensor(short), 1)[0]]
    for _ in range(4):
        short_rows.append(runner.forward(short_rows[-1].argmax()[None], 1)[0])
    long_alone = HFRunner(TARGET).forward(long, 10)
    batched = TorchBatchedTarget(TARGET, prefill_chunk=8)
    short_slot, long_slot = batched.slot(), batched.slot()
    batched.run({short_slot: (joined := Forward(torch.tensor(short), 1, None))})
    assert torch.allclose(joined.logits[0], short_rows[0], atol=1e-5)
    prompt, parts = Forward(long, 10, None), 0
    while prompt.logits is None:
        step = Forward(short_rows[parts].argmax()[None], 1, None)
        batched.run({short_slot: step, long_slot: prompt})
        parts += 1
        assert torch.allclose(step.logits[0], short_rows[parts], atol=1e-5)  # the running one went on
        assert batched.cached_len(long_slot) == (30 if prompt.logits is not None else 0)
    assert parts == 4 and torch.allclose(prompt.logits, long_alone, atol=1e-5)
    assert not batched.joining


def test_a_prompt_abandoned_while_joining_leaves_nothing_behind() -> None:
    """A sequence that leaves (or resets) with its prompt partly prefilled drops that part: the slot's
    next prompt starts afresh."""
    batched = TorchBatchedTarget(TARGET, prefill_chunk=4)
    slot = batched.slot()
    first, second = prompts(2, 9)
    batched.run({slot: (partial := Forward(torch.tensor(first + first), 1, None))})
    assert partial.logits is None and slot in batched.joining
    slot.reset()
    assert not batched.joining and batched.size == 0
    assert run_decode(TARGET, None, second, 8, runner=slot)[0] == run_decode(TARGET, None, second, 8)[0]


def test_prefill_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prefill_chunk must be at least 1"):
        TorchBatchedTarget(TARGET, prefill_chunk=0)


def test_rejected_drafts_are_compacted_away() -> None:
    """Padding and rejected drafts grow the cache's rows; compaction keeps them near the longest
    sequence, and the output is unchanged by it."""
    batched = TorchBatchedTarget(TARGET)
    longest_physical = 0
    slot_a, slot_b = batched.slot(), batched.slot()

    def watch() -> None:
        nonlocal longest_physical
        longest_physical = max(longest_physical, batched.physical_len)

    (p, q) = prompts(2, 11)
    alone = [run_decode(TARGET, speculation("chain"), x, 150, gamma=6)[0] for x in (p, q)]

    def decode_watching(slot: BatchSlot, prompt: list[int]) -> list[int]:
        tokens = run_decode(TARGET, speculation("chain"), prompt, 150, gamma=6, runner=slot)[0]
        watch()
        return tokens

    together = concurrently([lambda: decode_watching(slot_a, p), lambda: decode_watching(slot_b, q)])
    assert together == alone
    assert batched.steps > 30
    assert longest_physical <= 2 * (max(len(p), len(q)) + 150 + 7) + 64


def test_a_slow_sequence_does_not_hold_the_others_back() -> None:
    """A sequence that does not post its forward within wait_s is not waited for: the others go on, and
    it joins a later step, with the same tokens."""

    class SlowDrafter(ModelDrafter):
        def propose(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(0.3)
            return super().propose(*args, **kwargs)

    batched = TorchBatchedTarget(TARGET, wait_s=0.02)
    fast, slow = prompts(2, 3)
    alone = [run_decode(TARGET, speculation("chain"), x, 12, gamma=2)[0] for x in (fast, slow)]
    finished: dict[str, float] = {}

    def run(name: str, prompt: list[int], drafter: ModelDrafter) -> list[int]:
        tokens = run_decode(TARGET, drafter, prompt, 12, gamma=2, runner=batched.slot())[0]
        finished[name] = time.monotonic()
        return tokens

    start = time.monotonic()
    together = concurrently(
        [
            lambda: run("fast", fast, ModelDrafter(HFRunner(DRAFT))),
            lambda: run("slow", slow, SlowDrafter(HFRunner(DRAFT))),
        ]
    )
    assert together == alone
    assert finished["fast"] - start < 0.3 * 4  # it did not wait out the slow drafter's every step


def test_a_failing_step_fails_its_sequences_and_the_batch_goes_on() -> None:
    batched = TorchBatchedTarget(TARGET)
    slot = batched.slot()
    with pytest.raises(ValueError, match="must be a chain"):  # a prompt given as a tree
        slot.forward(torch.tensor([3, 4, 5]), 1, tree_mask=torch.ones(3, 3, dtype=torch.bool).tril())
    slot.end()
    (p,) = prompts(1, 5)
    assert (
        run_decode(TARGET, speculation("chain"), p, 10, runner=batched.slot())[0]
        == (run_decode(TARGET, speculation("chain"), p, 10)[0])
    )


def test_abandoned_generation_leaves_the_batch() -> None:
    """A consumer that stops early (a client that disconnects) closes its decode loop, which leaves the
    batch: the others are not held up by it."""
    from swarmspec.decode import decode
    from swarmspec.metrics import DecodeStats
    from swarmspec.policy import FixedDepth
    from swarmspec.sampling import SamplingConfig
    from swarmspec.verify import make_verifier

    batched = TorchBatchedTarget(TARGET, wait_s=30)  # only leaving can release the others in time
    p, q = prompts(2, 8)
    slot = batched.slot()
    chunks = decode(
        slot,
        NoSpeculation(),
        make_verifier(SamplingConfig()),
        p,
        max_new_tokens=50,
        policy=FixedDepth(0, 0),
        sampling=SamplingConfig(),
        stop_token_ids=frozenset(),
        generator=None,
        stats=DecodeStats(),
    )
    next(chunks)
    assert batched.size == 1
    chunks.close()
    assert batched.size == 0 and slot.cached_len == 0
    start = time.monotonic()
    assert run_decode(TARGET, None, q, 10, runner=batched.slot())[0] == run_decode(TARGET, None, q, 10)[0]
    assert time.monotonic() - start < 30


# A CPU-like batched cost curve (ms): one sequence's rows are nearly free up to 8 (memory-bound), while
# 16 sequences make every extra row cost about what a sequence's own token does (compute-bound).
SINGLE = {1: 30.0, 2: 31.0, 4: 33.0, 8: 38.0}
BATCHED = {16: {1: 120.0, 2: 240.0, 4: 480.0, 8: 960.0}}


def sure(p: float = 0.9, rows: int = 9) -> list[float]:
    """Expected committed tokens with 1..rows rows of a sequence whose drafts are accepted w.p. p each."""
    return [sum(p**d for d in range(r)) for r in range(1, rows + 1)]


def peers_of(curves: list[list[float]], size: int | None = None) -> BatchPeers:
    peers = BatchPeers(lambda: size or len(curves))
    for member, curve in enumerate(curves):
        peers.publish(member, curve)
    return peers


def test_step_costs_interpolate_between_batch_sizes() -> None:
    costs = StepCosts(SINGLE, (0.0,), BATCHED)
    assert costs.verify(2) == 31.0 and costs.verify(2, batch=1) == 31.0
    assert costs.verify(2, batch=16) == 240.0
    # Between b = 1 and 16: linear, (240 - 31) * 7 / 15 above the single sequence's 31 at b = 8.
    assert costs.verify(2, batch=8) == pytest.approx(31.0 + (240.0 - 31.0) * 7 / 15)
    assert costs.verify(2, batch=32) == 480.0  # proportional beyond the largest measured batch


def test_the_batch_picks_its_rows_from_every_sequences_gain() -> None:
    """By hand, drafts accepted w.p. 0.9. Alone the flat curve pays for all 8 rows; two sequences pay
    for 7 (2 * 5.22 / t_2(7) = 10.43 / 90.3 = 0.116 against 11.39 / 99.5 = 0.114 for 8 and 2 / 36 =
    0.056 for 1; t_2 is linear between the measured b = 1 and 16). In a batch of 16 a row
    costs what a token does: 16 * 1.9 / 240 < 16 / 120, so one row. At b = 4 (t_4(1) = 48, t_4(2) =
    72.8) four drafting sequences pay for a second row (4 * 1.9 / 72.8 = 0.104 > 4 / 48 = 0.083), but
    one copying sequence among three with nothing to draft does not ((3 + 1.9) / 72.8 = 0.067)."""
    costs = StepCosts(SINGLE, (0.0,), BATCHED)
    assert peers_of([sure()]).best_rows(costs, 8) == 8
    assert peers_of([sure(), sure()]).best_rows(costs, 8) == 7
    assert peers_of([sure()] * 16).best_rows(costs, 8) == 1
    assert peers_of([sure()] * 4).best_rows(costs, 8) >= 2
    assert peers_of([sure(), [1.0] * 9, [1.0] * 9, [1.0] * 9]).best_rows(costs, 8) == 1
    # Sequences that have not published count as one token per step: the same as nothing to draft.
    assert peers_of([sure()], size=4).best_rows(costs, 8) == 1


def test_policies_in_a_batch_draft_and_verify_the_batchs_rows() -> None:
    """Through the policy: each sequence publishes its gains from its running acceptance, drafts and
    verifies as many rows as the batch chose, and leaves the batch when its generation ends."""
    from swarmspec.tree import TokenTree

    costs = StepCosts(SINGLE, (0.0,), BATCHED)
    members = 1
    peers = BatchPeers(lambda: members)
    policies = [CostModelPolicy(costs, max_depth=8, peers=peers) for _ in range(16)]
    for policy in policies:  # learn nearly sure drafts
        for _ in range(40):
            policy.draft_depths(8)
            policy.observe(TokenTree.chain(0, torch.arange(1, 5)), [1, 2, 3, 4], 5)

    def verified(policy: CostModelPolicy) -> int:
        depth = policy.draft_depths(8)[0]
        return len(policy.select(TokenTree.chain(0, torch.arange(1, 1 + depth)))) - 1

    assert verified(policies[0]) == 8  # alone: its own choice
    members = 2
    assert [verified(p) for p in policies[:2]] == [8, 8]  # the batch pays for them
    members = 16
    assert {verified(p) for p in policies} == {0}
    for policy in policies:
        policy.end()
    assert not peers._gains


def test_max_batch_refuses_what_it_cannot_batch() -> None:
    for method in ("ar", "chain", "tree", "vote"):  # trees too: llama.cpp verifies them branch by branch
        EngineConfig(target="llamacpp:qwen2.5-coder-1.5b-instruct", method=method, max_batch=4)
    with pytest.raises(InvalidRequestError, match="max-batch"):
        EngineConfig(target="qwen2.5-coder-1.5b-instruct", max_batch=0)
    with pytest.raises(InvalidRequestError, match="continuous batching"):
        EngineConfig(target="qwen2.5-coder-1.5b-instruct", method="dsi", max_batch=2)
