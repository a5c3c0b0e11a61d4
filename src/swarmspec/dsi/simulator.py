"""The DSI simulator: latency per generated token of plain decoding (non-SI), speculative inference (SI)
and distributed speculative inference (DSI), by playing out their event timelines.

The model is the DSI paper's: time is counted in target forwards of one token; a drafted token costs the
drafter `c` of that; each drafted token is the target's own with probability `a`, independently (i.i.d.
acceptance); the drafter proposes `k` tokens (the lookahead) before a verification job is sent. A target
forward costs 1 however many rows it verifies (the paper's GPU-like assumption) unless a measured cost
curve says otherwise (`verify_cost`: rows -> forwards, e.g. this CPU's t(k) / t(1)).

- non-SI: one forward per token.
- SI: draft k, verify them in one forward, repeat; the drafter and the target take turns.
- DSI: `targets` target instances. The drafter keeps drafting ahead (up to k tokens per instance
  beyond what is committed). A free target instance starts a job on the committed prefix plus every
  drafted token so far whenever (a) no job in flight gives the target's token at the next position
  (with two instances or more), or (b) the drafter has k tokens that no job in flight covers. With one
  instance only (b) applies, and DSI is SI. A job that finishes commits, from the next position on,
  the drafted tokens the target agrees with and then the target's own token; a rejection drops every
  draft after it, cancels every job that depended on them and restarts the drafter from the corrected
  token. The target's own token after the last drafted one only costs the drafter the token it was
  drafting for that position. Rule (a) keeps a job on the committed prefix always in flight, which is
  why DSI is never slower than non-SI (with a flat cost curve); rule (b) is the speculation parallelism.

Preemption: in the paper's model (`preemptible`, the default) a cancelled job frees its target instance at
once and a restarted drafter starts at once. swarmspec's orchestrator cannot stop a forward midway (a
llama.cpp or PyTorch call runs to its end), so with `preemptible=False` a cancelled job holds its instance
until its forward ends, and a draft forward in flight holds its drafter instance likewise. Drafting one
sequence is sequential, so `drafters` (drafter instances) only matter then: after a rejection the drafter
restarts at once on another free drafter instance instead of waiting for the stale forward to end.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


def flat_cost(rows: int) -> float:
    """The paper's verification cost: one forward, however many rows."""
    return 1.0


@dataclass(frozen=True)
class Setting:
    drafter_cost: float  # c: one drafted token, in target forwards of one token
    acceptance: float  # a: P(a drafted token is the target's), i.i.d.
    lookahead: int  # k: drafted tokens per verification job (SI: per step)
    targets: int = 1  # DSI's target instances (the speculation-parallelism degree)
    verify_cost: Callable[[int], float] = flat_cost  # rows -> target forwards; verify_cost(1) is 1
    drafters: int = 1  # DSI's drafter instances
    preemptible: bool = True  # a cancelled forward stops at once (else it runs to its end)

    def __post_init__(self) -> None:
        if self.drafter_cost < 0:
            raise ValueError(f"drafter cost must be >= 0, got {self.drafter_cost}")
        if not 0 <= self.acceptance <= 1:
            raise ValueError(f"acceptance rate must be in [0, 1], got {self.acceptance}")
        if min(self.lookahead, self.targets, self.drafters) < 1:
            raise ValueError(
                f"lookahead, targets and drafters must be >= 1, got {self.lookahead}, {self.targets}, "
                f"{self.drafters}"
            )


def non_si_latency(setting: Setting) -> float:
    """Forwards per token of plain decoding."""
    return setting.verify_cost(1)


def si_expected_latency(setting: Setting) -> float:
    """SI's forwards per token in closed form: a step costs k*c + t(k+1) and commits
    (1 - a^(k+1)) / (1 - a) tokens in expectation (accepted drafts, then the target's own)."""
    a, k = setting.acceptance, setting.lookahead
    tokens = k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)
    return (k * setting.drafter_cost + setting.verify_cost(k + 1)) / tokens


def min_targets(setting: Setting) -> float:
    """Target instances DSI needs so that the drafter never waits for one: a job lasts one forward and
    the drafter fills one every k*c, so about ceil(1 / (k*c)) jobs are in flight (inf for a free drafter)."""
    chunk = setting.lookahead * setting.drafter_cost
    return max(1, math.ceil(1 / chunk)) if chunk > 0 else math.inf


def simulate_si(setting: Setting, tokens: int, seed: int = 0) -> float:
    """SI's forwards per token, played out for `tokens` tokens."""
    draws = _Draws(setting.acceptance, seed)
    k, elapsed, committed = setting.lookahead, 0.0, 0
    while committed < tokens:
        accepted = 0
        flags = [draws.next() for _ in range(k)]  # every drafted token gets its draw, used or not
        while accepted < k and flags[accepted]:
            accepted += 1
        elapsed += k * setting.drafter_cost + setting.verify_cost(k + 1)
        committed += accepted + 1
    return elapsed / committed


@dataclass
class _Job:
    base: int  # committed tokens when it started: it gives the target's token at positions base..end
    tokens: list[int]  # the sequence it verifies (token ids of this simulation), committed + drafted
    instance: int

    @property
    def end(self) -> int:
        return len(self.tokens)


@dataclass(order=True)
class _Event:
    time: float
    order: int
    kind: str = field(compare=False)  # "job", "draft", or "cancelled" (preempted: its instance is free)
    job: _Job | None = field(compare=False, default=None)
    position: int = field(compare=False, default=0)  # where a drafted token goes


class _Draws:
    """The i.i.d. acceptance draws, in drafting order: SI and DSI given one seed see the same ones."""

    def __init__(self, acceptance: float, seed: int) -> None:
        self.acceptance = acceptance
        self.rng = random.Random(seed)

    def next(self) -> bool:
        return self.rng.random() < self.acceptance


def simulate_dsi(setting: Setting, tokens: int, seed: int = 0) -> float:
    """DSI's forwards per token, played out for `tokens` tokens (see the module docstring)."""
    return _DsiTimeline(setting, seed).run(tokens)


class _DsiTimeline:
    def __init__(self, setting: Setting, seed: int) -> None:
        self.setting = setting
        self.draws = _Draws(setting.acceptance, seed)
        self.ids = itertools.count()
        # The sequence: committed tokens, then drafted ones. A token is an id; `right[id]` says whether a
        # drafted token is the target's (committed ones are by definition).
        self.sequence: list[int] = []
        self.right: dict[int, bool] = {}
        self.committed = 0
        self.now = 0.0
        self.events: list[_Event] = []
        self.order = itertools.count()
        self.free = list(range(setting.targets))
        self.running: list[_Job] = []
        self.stale: list[_Job] = []  # cancelled jobs whose forwards still run (not preemptible)
        self.draft: _Event | None = None  # the drafter's forward in flight for the current sequence
        self.busy_drafters = 0  # drafter instances in a forward, stale ones included
        self.window = setting.lookahead * setting.targets  # drafted tokens ahead of the committed ones

    def run(self, tokens: int) -> float:
        self._dispatch()
        while self.committed < tokens:
            event = heapq.heappop(self.events)
            self.now = event.time
            if event.kind == "draft":
                self.busy_drafters -= 1
                if event is self.draft:
                    self.draft = None
                    self._add_draft(event.position)
            elif event.kind == "job":
                assert event.job is not None
                if event.job in self.running:
                    self._finish(event.job)
                elif event.job in self.stale:  # cancelled but not preemptible: its forward is over
                    self.stale.remove(event.job)
                    self.free.append(event.job.instance)
            self._dispatch()
        return self.now / self.committed

    def _push(self, delay: float, kind: str, job: _Job | None = None) -> _Event:
        event = _Event(self.now + delay, next(self.order), kind, job, len(self.sequence))
        heapq.heappush(self.events, event)
        return event

    def _add_draft(self, position: int) -> None:
        if position < len(self.sequence):
            return  # the target's own token took its place meanwhile: the drafter goes on after it
        token = next(self.ids)
        self.right[token] = self.draws.next()
        self.sequence.append(token)

    def _draft_more(self) -> None:
        """Keep the drafter busy while it is less than `window` tokens ahead."""
        while (
            self.draft is None
            and self.busy_drafters < self.setting.drafters
            and len(self.sequence) - self.committed < self.window
        ):
            if self.setting.drafter_cost == 0:
                self._add_draft(len(self.sequence))
            else:
                self.busy_drafters += 1
                self.draft = self._push(self.setting.drafter_cost, "draft")

    def _restart_drafter(self) -> None:
        """A rejection: the draft in flight is stale; its instance is free now only if preemptible."""
        if self.draft is not None and self.setting.preemptible:
            self.draft.kind = "cancelled"
            self.busy_drafters -= 1
        self.draft = None

    def _dispatch(self) -> None:
        self._draft_more()
        while self.free:
            # With one instance there is no lane to spare: it waits for k drafts, as SI does.
            plain_lane = self.setting.targets > 1 and not any(
                job.end >= self.committed for job in self.running
            )
            furthest = max((job.end for job in self.running), default=self.committed)
            if not plain_lane and len(self.sequence) - furthest < self.setting.lookahead:
                return
            job = _Job(self.committed, list(self.sequence), self.free.pop())
            self.running.append(job)
            self._push(self.setting.verify_cost(job.end - job.base + 1), "job", job)

    def _finish(self, job: _Job) -> None:
        self._release(job)
        position = self.committed
        while position <= job.end:
            drafted = position < len(self.sequence)
            if drafted and self.right[self.sequence[position]]:
                self.committed = position + 1  # the target agrees with the drafted token
                position += 1
                continue
            # The target's own token: a correction, or the token after the last drafted one.
            if drafted:  # a rejection: the drafter's work after it is lost
                self._restart_drafter()
            del self.sequence[position:]
            token = next(self.ids)
            self.right[token] = True
            self.sequence.append(token)
            self.committed = position + 1
            for other in list(self.running):  # each verifies a dropped draft or ends before `position`
                self._cancel(other)
            return
        for done in [job for job in self.running if job.end < self.committed]:
            self._cancel(done)  # it covers only committed positions now

    def _release(self, job: _Job) -> None:
        self.running.remove(job)
        self.free.append(job.instance)

    def _cancel(self, job: _Job) -> None:
        if self.setting.preemptible:
            self._release(job)
        else:
            self.running.remove(job)
            self.stale.append(job)
