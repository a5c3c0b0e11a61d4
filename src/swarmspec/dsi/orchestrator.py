"""DSI on threads: several target instances verify drafts at once, without waiting for each other.

One drafter thread drafts ahead of what is committed (up to `lookahead` tokens per target instance). A
free target instance starts a verification job on the committed tokens plus the drafted ones, up to
`lookahead` beyond what the jobs in flight cover, whenever (a) no job in flight gives the target's token
at the next position (with two instances or more: a plain-decoding lane, which is why DSI is never much
slower than plain decoding), or (b) the drafter has `lookahead` tokens no job in flight covers
(speculation parallelism). With one instance (a) applies only when the drafter cannot give more (no
match, failed, window or length reached), so DSI is ordinary speculative decoding. `dsi.simulator`
models these rules, drafting token by token and cancelling work at once, where here a chunk of drafts
or a forward in progress runs to its end.

Pipelined (Minions' pipeline, `pipeline=True`): the drafter also drafts while every instance is busy, one
`lookahead` further, assuming its drafts are accepted, one token per request (after a rejection it
wastes at most one stale token before it drafts from the target's), and an instance is never left idle:
when no job in flight gives the next position it starts one on whatever is drafted, up to `lookahead`
tokens (none: a plain decoding step, during which the drafter catches up). With one instance, drafting
and verification then overlap. (Waiting for `lookahead` drafts instead, as DSI does, was measured too:
with the fp32 0.5B drafter 0.81x of plain transformers decoding against 0.96x, docs/pipeline.md.)
With a speculation policy (the pipeline's `--gamma auto`) each job verifies the part of the drafts the
policy selects (`SpeculationPolicy.select` on the chain of drafts from the committed position, at most
`lookahead`), and the policy is told every verdict: the drafter drafts ahead on its own core, and what is
worth verifying is chosen from the target's cost curve and the running acceptance (none: a plain
decoding step).

The manager (the generator below, on the caller's thread) alone owns the sequence. When a job finishes
it verifies, from the next position on, the drafted tokens the job's logits cover with the ordinary
chain verifier, and commits the accepted ones and the target's own token. A rejection drops every draft
after it and starts a new epoch: jobs and drafts of an older epoch are stale and dropped when they come
back (a forward in progress cannot be interrupted; its instance is free again when it returns). A draft
that comes back after the target committed its own token where the draft starts is kept if it agrees.
Lossless: every committed token comes out of the verifier, on logits computed for exactly the committed
tokens before it.

Target instances are runners over one copy of the weights (llama.cpp: one model, a context each;
PyTorch: one module, a cache each), each caching what it last verified and rolling back to the longest
prefix it shares with its next job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from swarmspec.decode import check_fits, through_first_stop
from swarmspec.drafters.base import Draft, Drafter
from swarmspec.errors import SwarmspecError
from swarmspec.metrics import DecodeStats
from swarmspec.policy import SpeculationPolicy
from swarmspec.runners.base import ModelRunner
from swarmspec.sampling import SamplingConfig
from swarmspec.speculate import common_prefix_len
from swarmspec.tree import TokenTree
from swarmspec.verify import Verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A verification job: the target's distribution at positions base..end of `tokens`."""

    epoch: int
    base: int  # committed tokens when it started: it gives the target's token at positions base..end
    tokens: list[int]  # the sequence it verifies: committed tokens, then drafted ones
    instance: int
    fresh: bool = False  # the first job of a generation: the instance's cache holds another sequence

    @property
    def end(self) -> int:
        return len(self.tokens)


class TargetInstance(Protocol):
    """Where verification jobs run: a runner in this process (`LocalInstance`) or a Ray actor."""

    max_length: int

    def verify(self, job: Job) -> torch.Tensor:  # [end - base + 1, V] logits
        """Run `job` (blocking); called by one thread at a time."""


class LocalInstance:
    """A target runner in this process that caches what it last verified and rolls back to the longest
    prefix it shares with the next job."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.max_length = runner.max_length
        self.cached: list[int] = []

    def verify(self, job: Job) -> torch.Tensor:
        if job.fresh:  # a new sequence's prompt is processed as a prompt, from an empty cache
            self.runner.reset()
            self.cached = []
        # Feed again at least the token before `base`: its logits give the first row.
        shared = common_prefix_len(self.cached, job.tokens[: job.base - 1])
        self.runner.rollback(shared)
        self.cached = job.tokens
        new = torch.tensor(job.tokens[shared:], dtype=torch.int64)
        return self.runner.forward(new, num_logits=job.end - job.base + 1)


@dataclass(frozen=True)
class _Verified:
    job: Job
    logits: torch.Tensor | None  # [end - base + 1, V]: the target's distribution at positions base..end
    error: BaseException | None = None


@dataclass(frozen=True)
class _Drafted:
    epoch: int
    start: int  # the position of its first token
    asked: int
    draft: Draft | None
    error: BaseException | None = None


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads for the calling thread only (an OpenMP setting per thread), so that a
    PyTorch target and drafter on threads of their own share the cores out instead of oversubscribing
    them; 0: unchanged."""
    if threads:
        torch.set_num_threads(threads)


class _InstanceThread(threading.Thread):
    """Hands one instance its jobs, one at a time, and reports each result to the manager."""

    def __init__(self, instance: TargetInstance, events: queue.Queue, torch_threads: int) -> None:
        super().__init__(daemon=True, name="swarmspec-dsi-target")
        self.instance = instance
        self.events = events
        self.torch_threads = torch_threads
        self.inbox: queue.Queue[Job | None] = queue.Queue()

    def run(self) -> None:
        set_torch_threads(self.torch_threads)
        while (job := self.inbox.get()) is not None:
            try:
                self.events.put(_Verified(job, self.instance.verify(job)))
            except BaseException as err:  # reported to the manager, which fails the request
                self.events.put(_Verified(job, None, err))


@dataclass
class _DraftRequest:
    epoch: int
    context: list[int]
    max_tokens: int
    committed: list[int]  # committed since the last request, for `Drafter.observe`


class _DrafterThread(threading.Thread):
    """Calls the drafter (and only this thread does): begin, observe, propose, end."""

    def __init__(
        self,
        drafter: Drafter,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        generator: torch.Generator,
        events: queue.Queue,
        torch_threads: int,
    ) -> None:
        super().__init__(daemon=True, name="swarmspec-dsi-drafter")
        self.drafter = drafter
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.generator = generator
        self.events = events
        self.torch_threads = torch_threads
        self.inbox: queue.Queue[_DraftRequest | list[int]] = queue.Queue()  # a list: the last commits, stop

    def run(self) -> None:
        set_torch_threads(self.torch_threads)
        failed = False
        try:
            self.drafter.begin(self.prompt_ids)
        except BaseException as err:
            failed = True
            self.events.put(_Drafted(-1, -1, 0, None, err))
        while isinstance(request := self.inbox.get(), _DraftRequest):
            if failed:
                continue
            try:
                self.drafter.observe(request.committed)
                draft = self.drafter.propose(
                    request.context, request.max_tokens, self.sampling, self.generator
                )
                self.events.put(_Drafted(request.epoch, len(request.context), request.max_tokens, draft))
            except BaseException as err:
                failed = True
                self.events.put(_Drafted(request.epoch, len(request.context), request.max_tokens, None, err))
        try:
            if not failed:
                self.drafter.observe(request)
            self.drafter.end()
        except Exception:
            log.exception("the drafter failed while ending its sequence")


@dataclass
class _State:
    """The manager's view: the sequence (prompt, committed, drafted), jobs in flight, the drafter."""

    sequence: list[int]
    committed: int  # sequence[:committed] is committed
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # one [V] row per drafted token (sampling)
    epoch: int = 0
    running: dict[int, Job] = field(default_factory=dict)  # instance -> its job
    drafting: bool = False
    drafter_failed: bool = False
    dry: tuple[int, int] | None = None  # (epoch, length) where the drafter last had nothing more
    reported: int = 0  # committed tokens the drafter has been told about

    @property
    def drafted(self) -> int:
        return len(self.sequence) - self.committed


def dsi_decode(
    instances: Sequence[TargetInstance],
    drafter: Drafter,
    verifier: Verifier,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    lookahead: int,
    sampling: SamplingConfig,
    stop_token_ids: frozenset[int],
    generator: torch.Generator,
    stats: DecodeStats,
    pipeline: bool = False,
    torch_threads: tuple[int, int] = (0, 0),
    policy: SpeculationPolicy | None = None,
) -> Iterator[list[int]]:
    """Yield the tokens each finished verification job commits, until a stop token or `max_new_tokens`.

    `instances`: where the target's verification jobs run (see the module docstring for the schedule and
    `pipeline`). `torch_threads`: PyTorch's intra-op threads on each instance's thread and on the
    drafter's (0: as they are). `policy` (one instance only): how many drafts each job verifies, told
    every verdict; None: as many as there are, up to `lookahead`.
    """
    if lookahead < 1 or not instances:
        raise ValueError(f"need lookahead >= 1 and a target instance, got {lookahead}, {len(instances)}")
    if policy is not None and len(instances) > 1:
        raise ValueError("a speculation policy chooses the jobs of one target instance, not several")
    check_fits(len(prompt_ids), max_new_tokens, instances[0].max_length)
    events: queue.Queue[_Verified | _Drafted] = queue.Queue()
    targets = [_InstanceThread(instance, events, torch_threads[0]) for instance in instances]
    # The drafter samples on its own thread, so from its own generator (seeded from the request's).
    draft_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    drafter_thread = _DrafterThread(drafter, prompt_ids, sampling, draft_generator, events, torch_threads[1])
    state = _State(list(prompt_ids), len(prompt_ids), reported=len(prompt_ids))
    limit = len(prompt_ids) + max_new_tokens  # the sequence never needs a position past this
    # Drafts wait for no more than the instances can take at once (pipelined: one lookahead more).
    window = lookahead * (len(instances) + pipeline)
    # Drafts asked for at once. Pipelined, one: a rejection then wastes at most one drafted token (a
    # drafter's forward cannot be interrupted) before drafting restarts from the target's token.
    chunk = 1 if pipeline else lookahead
    idle = list(range(len(instances)))

    def dispatch() -> None:
        while idle:
            valid = [
                job
                for job in state.running.values()
                if job.epoch == state.epoch and job.end >= state.committed
            ]
            furthest = max((job.end for job in valid), default=state.committed)
            drafter_blocked = not state.drafting and not can_draft()
            plain_lane = not valid and (len(instances) > 1 or drafter_blocked or pipeline)
            if not plain_lane and len(state.sequence) - furthest < lookahead:
                return
            # A job verifies at most `lookahead` drafts beyond what the jobs in flight cover.
            end = min(len(state.sequence), furthest + lookahead)
            if policy is not None:  # one instance, idle: nothing in flight, furthest is the committed end
                end = furthest + len(policy.select(drafted_chain(end))) - 1
            job = Job(state.epoch, state.committed, state.sequence[:end], idle.pop())
            state.running[job.instance] = job
            targets[job.instance].inbox.put(job)

    def drafted_chain(end: int) -> TokenTree:
        """The last committed token, then the drafts up to `end`."""
        first = state.committed
        probs = torch.stack(state.draft_probs[: end - first]) if end > first and not sampling.greedy else None
        drafts = torch.tensor(state.sequence[first:end], dtype=torch.int64)
        return TokenTree.chain(state.sequence[first - 1], drafts, probs)

    def draft_room() -> int:
        return min(chunk, window - state.drafted, limit - 1 - len(state.sequence))

    def can_draft() -> bool:
        return (
            not state.drafter_failed and draft_room() > 0 and state.dry != (state.epoch, len(state.sequence))
        )

    def request_drafts() -> None:
        if state.drafting or not can_draft():
            return
        committed = state.sequence[state.reported : state.committed]
        state.reported = state.committed
        request = _DraftRequest(state.epoch, list(state.sequence), draft_room(), committed)
        drafter_thread.inbox.put(request)
        state.drafting = True

    def on_drafted(event: _Drafted) -> None:
        state.drafting = False
        if event.error is not None:
            state.drafter_failed = True
            log.warning("drafter %s raised %r; going on without drafts", type(drafter).__name__, event.error)
            return
        assert event.draft is not None
        draft = event.draft
        if not sampling.greedy and len(draft) and (draft.probs is None or len(draft.probs) != len(draft)):
            state.drafter_failed = True  # without them speculative sampling cannot stay exact
            log.warning("drafter %s gave no distribution for its sampled draft", type(drafter).__name__)
            return
        if event.epoch != state.epoch:
            return  # drafted after a token that was since rejected
        # The target may have committed its own tokens where this draft starts: keep the draft only if
        # it agrees with them (its later tokens were drafted after the same context).
        tokens, overlap = draft.tokens.tolist()[: event.asked], state.sequence[event.start :]
        if tokens[: len(overlap)] != overlap:
            return
        if len(tokens) < event.asked:
            state.dry = (state.epoch, event.start + len(tokens))
        state.sequence.extend(tokens[len(overlap) :])
        if draft.probs is not None and not sampling.greedy:
            state.draft_probs.extend(draft.probs[len(overlap) : len(tokens)])

    def on_verified(event: _Verified) -> list[int]:
        job = event.job
        del state.running[job.instance]
        idle.append(job.instance)
        if event.error is not None:
            raise SwarmspecError(f"target instance {job.instance} failed: {event.error!r}") from event.error
        assert event.logits is not None
        if job.epoch != state.epoch or job.end < state.committed:
            stats.discarded_forwards += 1  # it verified a rejected draft, or only committed positions
            return []
        first = state.committed  # position of the first token this job decides
        # The job's last row also decides a draft made after the job started, if there is one.
        beyond = len(state.sequence) > job.end
        checked = state.sequence[first : job.end + beyond]
        rows = event.logits[first - job.base :]  # [len(checked) + 1 - beyond, V]
        if beyond:  # a bonus row the verdict cannot use: it is read only if the draft beyond is accepted
            rows = torch.cat([rows, rows[-1:]])
        tree = drafted_chain(job.end + beyond)
        verdict = verifier(tree, rows, generator)
        if policy is not None:
            policy.observe(tree, verdict.path, verdict.next_token)
        verified = len(checked)
        if beyond and verdict.accepted_len == len(checked):
            # The last accepted draft is the target's token at the job's last row (counted as its own,
            # as in greedy, where it equals the target's argmax): the drafts after it stand.
            new_tokens, verified = checked, len(checked) - 1
            del state.draft_probs[: len(new_tokens)]
        else:
            position = first + verdict.accepted_len  # where the target's own token goes
            new_tokens = [*checked[: verdict.accepted_len], verdict.next_token]
            if len(state.sequence) > position:  # a rejection: jobs and drafts after it are stale
                state.epoch += 1
            del state.sequence[position:]
            state.sequence.append(verdict.next_token)
            state.draft_probs.clear()
        # Nothing after a stop token is output, counted or told to the drafter.
        new_tokens = through_first_stop(new_tokens, stop_token_ids)
        state.committed = first + len(new_tokens)
        stats.record_step(verified, len(new_tokens), accepted_by=[0] * (len(new_tokens) - 1))  # one drafter
        return new_tokens

    start = time.perf_counter()
    stats.prompt_tokens = len(prompt_ids)
    if policy is not None:
        policy.begin()
    for target in targets:
        target.start()
    drafter_thread.start()
    try:
        # Every instance processes the prompt (the first to finish commits the first token).
        for instance in idle:
            job = Job(state.epoch, state.committed, list(state.sequence), instance, fresh=True)
            state.running[instance] = job
            targets[instance].inbox.put(job)
        idle.clear()
        produced = 0
        while True:
            request_drafts()
            dispatch()
            event = events.get()
            if isinstance(event, _Drafted):
                on_drafted(event)
                continue
            # Drafts never reach past max_new_tokens, so neither do commits.
            new_tokens = on_verified(event)
            if not new_tokens:
                continue
            stats.wall_s = time.perf_counter() - start
            if produced == 0:
                stats.prefill_s = stats.wall_s
            produced += len(new_tokens)
            yield new_tokens
            if produced >= max_new_tokens or new_tokens[-1] in stop_token_ids:
                return
    finally:
        for target in targets:
            target.inbox.put(None)
        drafter_thread.inbox.put(state.sequence[state.reported : state.committed])
        for thread in [*targets, drafter_thread]:
            thread.join()
        if policy is not None:
            policy.end()
