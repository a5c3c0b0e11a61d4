"""How much to speculate each step, chosen from measured costs and the running acceptance.

Each step the decode loop asks the policy how deep every drafter may propose (`draft_depths`), then
which of the proposed nodes the target verifies (`select`), and after the target forward tells it what
was accepted (`observe`). Dropping nodes never changes what is output: the verifier decides, always. In
sampling mode whether a node is kept depends only on the nodes ranked above it (their depths and
proposers), never on its own drawn token or on anything decided after it was drawn, so every kept node
is still a draw from the distribution stored with it.

`CostModelPolicy` maximizes expected committed tokens per second of the step,

    (1 + sum of P(node accepted) over the verified nodes) / (drafting time + t(verified rows))

where 1 is the target's own token, P(node accepted) is the product along the node's path of each
proposer's running acceptance rate at that depth (given its parent was accepted), t(k) is the target's
measured forward over k rows and drafting time is the draft models' measured per-token cost. Model-free
drafters cost nothing: they propose as far as their match goes (up to `max_depth`) and the policy keeps
only the part worth verifying. When no draft pays for itself the tree is the root alone: plain
decoding through the same loop.

What the target was not asked still teaches (greedy): a proposed node left unverified right below the
last accepted node would have been accepted exactly if it is the target's own next token. So a
model-free drafter's acceptance, and whether it is inside a copy, stay current while it is not
verified, and it needs no probes; a draft model not run is probed now and then instead.

With continuous batching (b sequences verified in one forward, each padded to the most rows one of
them verifies) the batch chooses one row count R per step (the fifth seed's rule, with each sequence's
own acceptance instead of one average): the R that maximizes

    (sum over the b sequences of their expected committed tokens with R rows) / t_b(R)

where t_b(R) is the measured forward of b sequences of R rows each (`BatchPeers`). Each sequence then
verifies at most R rows. One sequence copying a passage among sequences that are not cannot make the
whole batch pay for its rows; many sequences that all draft well can.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from swarmspec.tree import TokenTree


class SpeculationPolicy(ABC):
    """Chooses the speculation of every step; one instance per generation (it may keep running state)."""

    def begin(self) -> None:  # noqa: B027 - fixed policies keep no state
        """A new generation starts."""

    def end(self) -> None:  # noqa: B027
        """The generation is finished or abandoned."""

    @abstractmethod
    def draft_depths(self, limit: int) -> list[int]:
        """How many tokens deep each drafter may propose this step, none beyond `limit`."""

    def select(self, tree: TokenTree) -> TokenTree:
        """The part of the proposed tree the target verifies (its root always)."""
        return tree

    def observe(self, tree: TokenTree, path: list[int], next_token: int) -> None:  # noqa: B027
        """The target verified `tree`, accepted the nodes `path` (a root-to-node path) and added
        `next_token` of its own after them."""


@dataclass
class FixedDepth(SpeculationPolicy):
    """Every drafter proposes `gamma` tokens (fewer at the end of the generation); all are verified."""

    gamma: int
    drafters: int

    def draft_depths(self, limit: int) -> list[int]:
        return [min(self.gamma, limit)] * self.drafters


@dataclass(frozen=True)
class StepCosts:
    """Measured milliseconds: the target's forward over k rows (piecewise linear between the measured k,
    extrapolated beyond the largest), and one drafted token of each drafter (0 for model-free ones).

    With continuous batching a step is one forward over every running sequence, each padded to the
    most rows one of them verifies: `batch_verify_ms[b][k]` is that forward for b sequences of k rows
    (linear between measured batch sizes, proportional to b beyond the largest)."""

    verify_ms: dict[int, float]
    draft_token_ms: tuple[float, ...]
    batch_verify_ms: dict[int, dict[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for curve in [self.verify_ms, *self.batch_verify_ms.values()]:
            if 1 not in curve or len(curve) < 2:
                raise ValueError(f"need the target's cost at k = 1 and one more k, got {sorted(curve)}")
        # A forward over more rows, or more sequences, never costs less; measured on a busy machine a
        # curve may say so, and a policy believing it would verify rows for nothing. Each curve is
        # replaced by its least-squares non-decreasing fit (in rows, then in batch size at each k).
        batched = {1: self.verify_ms, **self.batch_verify_ms}
        batched = {b: non_decreasing(curve) for b, curve in batched.items()}
        for k in set.intersection(*(set(curve) for curve in batched.values())):
            column = non_decreasing({b: batched[b][k] for b in batched})
            for b in batched:
                batched[b][k] = column[b]
        object.__setattr__(self, "verify_ms", non_decreasing(batched.pop(1)))
        object.__setattr__(self, "batch_verify_ms", {b: non_decreasing(c) for b, c in batched.items()})

    def verify(self, rows: int, batch: int = 1) -> float:
        """The step's forward: `batch` sequences verifying `rows` rows each."""
        if batch <= 1 or not self.batch_verify_ms:
            return _interpolate(self.verify_ms, rows)
        curves = {1: self.verify_ms, **self.batch_verify_ms}
        sizes = sorted(curves)
        if batch >= sizes[-1]:
            return _interpolate(curves[sizes[-1]], rows) * batch / sizes[-1]
        i = bisect.bisect_left(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        t_lo, t_hi = _interpolate(curves[lo], rows), _interpolate(curves[hi], rows)
        return t_lo + (t_hi - t_lo) * (batch - lo) / (hi - lo)


def non_decreasing(curve: dict[int, float]) -> dict[int, float]:
    """The least-squares non-decreasing fit of `curve` over its sorted keys (pool adjacent violators:
    a run of points that decreases is replaced by its mean)."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for x in sorted(curve):
        blocks.append([curve[x], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [total / count for total, count in blocks for _ in range(int(count))]
    return dict(zip(sorted(curve), fitted, strict=True))


def _interpolate(curve: dict[int, float], x: int) -> float:
    """Piecewise linear through the measured points, extrapolated from the last two."""
    xs = sorted(curve)
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    lo, hi = xs[i - 1], xs[i]
    return curve[lo] + (curve[hi] - curve[lo]) / (hi - lo) * (x - lo)


@dataclass
class AcceptanceStats:
    """P(node accepted | its parent accepted) per source (a drafter, or a drafter in a given state) and
    depth, from exponentially decayed counts: each step a source's nodes are verified, its older counts
    weigh `decay` less (a source not verified keeps what it knew). Each depth's estimate is shrunk
    towards the source's rate over all depths, so a depth not verified yet inherits it: a source that
    does well gets to try deeper."""

    sources: int
    decay: float = 0.95
    shrink: float = 4.0  # pseudo-observations of the drafter's overall rate behind each depth's estimate
    accepted: list[dict[int, float]] = field(default_factory=list)
    offered: list[dict[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted = self.accepted or [{} for _ in range(self.sources)]
        self.offered = self.offered or [{} for _ in range(self.sources)]

    @classmethod
    def after_chains(cls, rates: Sequence[float], depth: int = 16, steps: int = 400) -> AcceptanceStats:
        """The statistics after `steps` chains of `depth` tokens from sources accepting each token
        (given its parent) at rates[i]: deterministic, every depth accepted in the right proportion.
        For analyses and tests of the policy's choices on known acceptance rates."""
        stats = cls(len(rates))
        for step in range(steps):
            stats.record(
                [
                    (source, d, (step * 7919 + d * 104729) % 1000 < rate * 1000)
                    for source, rate in enumerate(rates)
                    for d in range(1, depth + 1)
                ]
            )
        return stats

    def copy(self) -> AcceptanceStats:
        return AcceptanceStats(
            self.sources,
            self.decay,
            self.shrink,
            [dict(a) for a in self.accepted],
            [dict(o) for o in self.offered],
        )

    def rate(self, source: int, depth: int) -> float:
        accepted, offered = self.accepted[source], self.offered[source]
        overall = self.overall_rate([source])
        return (accepted.get(depth, 0.0) + self.shrink * overall) / (offered.get(depth, 0.0) + self.shrink)

    def overall_rate(self, sources: Sequence[int]) -> float:
        """The acceptance of `sources` together over all depths. Optimistic about a source with little
        data (prior mean 0.9, worth 2 observations): it gets verified and so measured; one with data
        soon stands on its own."""
        accepted = sum(sum(self.accepted[s].values()) for s in sources)
        offered = sum(sum(self.offered[s].values()) for s in sources)
        return (accepted + 1.8) / (offered + 2)

    def record(self, outcomes: Sequence[tuple[int, int, bool]]) -> None:
        """One step's verified nodes whose parent was accepted: (source, depth, accepted)."""
        for source in {source for source, _, _ in outcomes}:
            for counts in (self.accepted[source], self.offered[source]):
                for depth in counts:
                    counts[depth] *= self.decay
        for source, depth, accepted in outcomes:
            self.offered[source][depth] = self.offered[source].get(depth, 0.0) + 1
            if accepted:
                self.accepted[source][depth] = self.accepted[source].get(depth, 0.0) + 1


def expected_committed(rate: float, depth: int) -> float:
    """Expected tokens one step commits with a chain of `depth` drafts each accepted at `rate` (given
    the ones before it): the target's own token plus every accepted prefix."""
    return sum(rate**i for i in range(depth + 1))


def chain_rate(costs: StepCosts, rate: float, max_depth: int, overlapped: bool) -> float:
    """Committed tokens per millisecond of one drafter's chain at its best depth (0: plain decoding).

    Taking turns a step drafts `depth` tokens, then the target verifies them. Overlapped (the
    pipeline) the drafter drafts the next step's tokens while the target verifies, each on its own
    cores, so a step takes the longer of the two. (After a rejection the pipeline's next step has no
    drafts ready: this is the pipeline at its best.)"""
    (draft_ms,) = costs.draft_token_ms
    best = 0.0
    for depth in range(max_depth + 1):
        verify, draft = costs.verify(depth + 1), depth * draft_ms
        step_ms = max(verify, draft) if overlapped else verify + draft
        best = max(best, expected_committed(rate, depth) / step_ms)
    return best


def pipelining_pays(turns: StepCosts, pipelined: StepCosts, rate: float, max_depth: int) -> bool:
    """Whether drafting beside verification (`pipelined`: each model's costs on its share of the cores)
    commits more tokens per second than taking turns (`turns`: each with every core), for a drafter
    whose tokens are accepted at `rate`. On a CPU whose every verified row costs most of a forward
    the target's lost cores weigh more than the hidden drafting; on a flat curve they do not."""
    return chain_rate(pipelined, rate, max_depth, True) > chain_rate(turns, rate, max_depth, False)


class AcceptancePrior:
    """The acceptance statistics the engine's generations leave behind: each generation starts from
    them and hands its own back when it ends (the last to end wins), so a new request does not start
    from scratch."""

    def __init__(self) -> None:
        self.stats: AcceptanceStats | None = None

    def stats_for(self, sources: int) -> AcceptanceStats:
        if self.stats is not None and self.stats.sources == sources:
            return self.stats.copy()
        return AcceptanceStats(sources)


class BatchPeers:
    """The sequences of one continuously batched target and what each would commit per step with R
    rows: from these and the batched cost curve the batch's row count R is chosen each step. Each
    policy publishes its curve as it decides; a sequence that has not published yet counts as one
    token per step whatever R is."""

    def __init__(self, size: Callable[[], int]) -> None:
        self.size = size  # sequences sharing the forward now
        self._gains: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def publish(self, member: object, gains: list[float]) -> None:
        with self._lock:
            self._gains[id(member)] = gains

    def leave(self, member: object) -> None:
        with self._lock:
            self._gains.pop(id(member), None)

    def best_rows(self, costs: StepCosts, limit: int, draft_token_ms: float = 0.0) -> int:
        """The rows per sequence, 1..limit, that maximize the batch's committed tokens per second."""
        batch = self.size()
        with self._lock:
            curves = list(self._gains.values())[:batch]
        silent = batch - len(curves)
        best, best_rate = 1, 0.0
        for rows in range(1, limit + 1):
            tokens = silent + sum(curve[min(rows, len(curve)) - 1] for curve in curves)
            rate = tokens / (costs.verify(rows, batch) + (rows - 1) * draft_token_ms)
            if rate > best_rate:
                best, best_rate = rows, rate
        return best


class CostModelPolicy(SpeculationPolicy):
    """Self-tuning speculation: the depth and the verified nodes that maximize expected committed tokens
    per second, from `costs` and the running acceptance (see the module docstring).

    Acceptance is kept per drafter and per its state: whether everything of its last verified draft was
    accepted (a copy in progress: prompt lookup inside a quoted passage) or not, since the two differ
    most. A drafter whose drafts do not pay for themselves is not drafted (a draft model) or not verified (a
    model-free drafter). While even a fully accepted token could pay, such a drafter is probed: one
    token is verified after `probe_every` idle steps, and the wait doubles after every rejected probe
    (up to `max_probe_every`), so a useless drafter costs ever less while a drafter whose text starts to
    match (a summary reaching a quoted passage) is found again.
    """

    def __init__(
        self,
        costs: StepCosts,
        max_depth: int,
        prior: AcceptancePrior | None = None,
        probe_every: int = 4,
        max_probe_every: int = 64,
        peers: BatchPeers | None = None,
        cost_shares: Sequence[Callable[[], float]] = (),
    ) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.costs = costs
        # Per drafter, what a drafted token costs now as a share of its profiled one (`Drafter.cost_share`:
        # a sorted draft stopping at shallow exits pays less than its whole model).
        self.cost_shares = cost_shares
        self.peers = peers  # the sequences verified in the same forwards (continuous batching)
        self._rows: int | None = None  # the batch's row count this step; None: deciding alone
        self.max_depth = max_depth
        self.prior = prior or AcceptancePrior()
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.drafters = len(costs.draft_token_ms)
        self.begin()

    def begin(self) -> None:
        self.stats = self.prior.stats_for(2 * self.drafters)
        self._streak = [0] * self.drafters  # 1: the drafter's last verified nodes were all accepted
        self._probe_wait = [self.probe_every] * self.drafters  # idle steps left before the next probe
        self._probe_interval = [self.probe_every] * self.drafters
        self._probing: set[int] = set()
        self._draft_ms = 0.0
        # The last proposed tree, the nodes of it kept and the tree they made (`select`), for `observe`.
        self._proposal: tuple[TokenTree, list[int], TokenTree] | None = None

    def end(self) -> None:
        self.prior.stats = self.stats.copy()
        if self.peers is not None:
            self.peers.leave(self)

    def draft_depths(self, limit: int) -> list[int]:
        limit = min(limit, self.max_depth)
        self._rows = None
        if self.peers is not None:
            self.peers.publish(self, self._gains(limit))
            if self.peers.size() > 1:
                draft_ms = [self._draft_token_ms(i) for i in range(self.drafters)]
                self._rows = self.peers.best_rows(self.costs, limit + 1, max(draft_ms, default=0))
                depths = [min(limit, self._rows - 1)] * self.drafters
                self._draft_ms = sum(d * c for d, c in zip(depths, draft_ms, strict=True))
                return depths
        depths = [self._depth(i, limit) for i in range(self.drafters)]
        self._draft_ms = sum(d * self._draft_token_ms(i) for i, d in enumerate(depths))
        return depths

    def _draft_token_ms(self, drafter: int) -> float:
        share = self.cost_shares[drafter]() if self.cost_shares else 1.0
        return self.costs.draft_token_ms[drafter] * share

    def _depth(self, drafter: int, limit: int) -> int:
        cost = self._draft_token_ms(drafter)
        if cost == 0 or limit == 0:
            return limit  # free: propose all the match has, `select` keeps what is worth verifying
        best, best_rate = 0, 1 / self._verify(1)
        reach = 1.0  # P(the whole chain so far is accepted)
        expected = 1.0
        for depth in range(1, limit + 1):
            reach *= self.stats.rate(self._source(drafter), depth)
            expected += reach
            rate = expected / (depth * cost + self._verify(depth + 1))
            if rate > best_rate:
                best, best_rate = depth, rate
        if best == 0 and self._probe_due(drafter, cost):
            return 1
        return best

    def _probe_due(self, drafter: int, cost: float) -> bool:
        """Count one idle step of `drafter`; True when it is to be probed now."""
        if 2 / (cost + self._verify(2)) <= 1 / self._verify(1):
            return False  # even a draft the target accepts would lose to plain decoding
        self._probe_wait[drafter] -= 1
        if self._probe_wait[drafter] > 0:
            return False
        self._probe_wait[drafter] = self._probe_interval[drafter]
        self._probing.add(drafter)
        return True

    def _verify(self, rows: int) -> float:
        return self.costs.verify(rows)

    def _gains(self, limit: int) -> list[float]:
        """Expected committed tokens if this sequence verifies r = 1..limit + 1 rows: its best
        drafter's chain of r - 1 tokens (the product of its running acceptance along the chain)."""
        gains = [1.0] * (limit + 1)
        for drafter in range(self.drafters):
            reach, expected = 1.0, 1.0
            for depth in range(1, limit + 1):
                reach *= self.stats.rate(self._source(drafter), depth)
                expected += reach
                gains[depth] = max(gains[depth], expected)
        return gains

    def _source(self, drafter: int) -> int:
        return 2 * drafter + self._streak[drafter]

    def node_values(self, tree: TokenTree) -> list[float]:
        """P(node accepted) estimated for every node (the root: 1). Siblings are exclusive outcomes: where
        their estimates add up to more than 1 they are scaled down to 1."""
        proposers = tree.proposers or (-1, *[0] * (len(tree) - 1))
        depth = tree_depths(tree)
        given_parent = [1.0] * len(tree)
        for node in range(1, len(tree)):
            given_parent[node] = self.stats.rate(self._source(proposers[node]), depth[node])
        children: dict[int, list[int]] = {}
        for node in range(1, len(tree)):
            children.setdefault(tree.parents[node], []).append(node)
        for siblings in children.values():
            total = sum(given_parent[n] for n in siblings)
            if total > 1:
                for n in siblings:
                    given_parent[n] /= total
        values = [1.0] * len(tree)
        for node in range(1, len(tree)):
            values[node] = values[tree.parents[node]] * given_parent[node]
        return values

    def select(self, tree: TokenTree) -> TokenTree:
        """The most valuable nodes, as many as maximize the step's rate.

        In sampling mode the count stops at the first node that does not raise the rate, so whether a
        node is verified depends only on the nodes ranked above it: never on its own children, whose
        number a tree shape may have chosen after seeing the node's drawn token (`NodeBudget`).
        """
        values = self.node_values(tree)
        # Most valuable first; a node never outranks its parent (values shrink along a path, ties go to
        # the earlier node, and parents come first), so every prefix of the ranking is a tree.
        ranked = sorted(range(1, len(tree)), key=lambda n: (-values[n], n))
        if self._rows is not None:  # in a batch: the rows the batch chose
            return self._keep(tree, ranked[: self._rows - 1])
        best_count, best_rate = 0, 1 / (self._draft_ms + self._verify(1))
        expected = 1.0
        for count, node in enumerate(ranked, start=1):
            expected += values[node]
            rate = expected / (self._draft_ms + self._verify(count + 1))
            if rate > best_rate:
                best_count, best_rate = count, rate
            elif tree.draft_probs is not None:
                break
        kept = ranked[:best_count]
        proposers = tree.proposers or (-1, *[0] * (len(tree) - 1))
        if not kept and ranked:
            # A probe a draft model paid for is verified (its one token hangs from the root); else the
            # top node's drafter counts an idle step and may be due for a probe.
            paid = [n for n in ranked if proposers[n] in self._probing and tree.parents[n] == 0]
            top = proposers[ranked[0]]
            # A free drafter's greedy acceptance is measured unverified (`_unverified_outcomes`): no probes.
            shadowed = tree.draft_probs is None and self._draft_token_ms(top) == 0
            if paid:
                kept = paid[:1]
            elif not shadowed and self._probe_due(top, self._draft_token_ms(top)):
                kept = ranked[:1]
        return self._keep(tree, kept)

    def _keep(self, tree: TokenTree, nodes: list[int]) -> TokenTree:
        kept_nodes = sorted([0, *nodes])
        kept = tree.keep(kept_nodes)
        self._proposal = (tree, kept_nodes, kept)
        return kept

    def observe(self, tree: TokenTree, path: list[int], next_token: int) -> None:
        accepted = {0, *path}
        proposers = tree.proposers or (-1, *[0] * (len(tree) - 1))
        depth = tree_depths(tree)
        verified_outcomes = [
            (proposers[node], depth[node], node in accepted)
            for node in range(1, len(tree))
            if tree.parents[node] in accepted
        ]
        outcomes = verified_outcomes + self._unverified_outcomes(tree, path, next_token)
        self.stats.record([(self._source(d), depth, ok) for d, depth, ok in outcomes])
        for drafter in {d for d, _, _ in outcomes}:
            self._streak[drafter] = int(all(ok for d, _, ok in outcomes if d == drafter))
        for drafter in self._probing:
            verified = [ok for d, _, ok in verified_outcomes if d == drafter]
            if not verified:  # its probe did not make it into the tree (another drafter's node did)
                continue
            interval = self.probe_every if any(verified) else 2 * self._probe_interval[drafter]
            self._probe_interval[drafter] = min(interval, self.max_probe_every)
            self._probe_wait[drafter] = self._probe_interval[drafter]
        self._probing.clear()

    def _unverified_outcomes(
        self, tree: TokenTree, path: list[int], next_token: int
    ) -> list[tuple[int, int, bool]]:
        """Greedy: the proposed nodes `select` left out right below the last accepted node, and whether
        each is the target's own next token, i.e. whether verifying it would have accepted it. Known for
        free, so a drafter the policy does not verify (a model-free drafter below its break-even) keeps
        its acceptance, and its copy-in-progress state, current without paying for probes."""
        proposal, self._proposal = self._proposal, None
        if proposal is None or proposal[2] is not tree or tree.draft_probs is not None:
            return []  # not this step's tree (the pipeline's jobs), or sampling (a residual draw)
        proposed, kept_nodes, _ = proposal
        last = kept_nodes[path[-1]] if path else 0  # the deepest accepted node, in the proposed tree
        verified = set(kept_nodes)
        proposers = proposed.proposers or (-1, *[0] * (len(proposed) - 1))
        depth = tree_depths(proposed)[last] + 1
        return [
            (proposers[node], depth, int(proposed.tokens[node]) == next_token)
            for node in range(1, len(proposed))
            if proposed.parents[node] == last and node not in verified
        ]


def tree_depths(tree: TokenTree) -> list[int]:
    """Every node's depth (the root: 0); parents come before their children."""
    depth = [0] * len(tree)
    for node in range(1, len(tree)):
        depth[node] = depth[tree.parents[node]] + 1
    return depth
