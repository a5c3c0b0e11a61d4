"""Decoding metrics, defined once and shared by the CLI, the benchmark and the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Totals:
    """Counts over one or more generations and the figures derived from them, defined once here for
    the CLI, the benchmark and the server."""

    new_tokens: float = 0  # float: the benchmark sums medians over repeats
    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    wall_s: float = 0.0
    drafting_forwards: int = 0  # target forwards that verified at least one drafted token
    drafted_depth: int = 0  # over those forwards: the depth of the verified tree (a chain's length)
    exit_tokens: int = 0  # tokens drafted by sorted drafts' early exits
    exit_layers: int = 0  # summed over those: the layers each token ran (its exit's depth)

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Totals)))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per target forward, the target's own token included (plain decoding: 1.0)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def drafted_per_forward(self) -> float:
        """Drafted tokens (tree nodes) verified per target forward: beside `mean_accepted_tokens`, what a
        tree's extra acceptance cost in verified nodes compared with a chain's."""
        return self.drafted_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of drafted tokens accepted; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def plain_share(self) -> float | None:
        """Share of target forwards that verified no drafted token (plain decoding steps)."""
        if not self.target_forwards:
            return None
        return 1 - self.drafting_forwards / self.target_forwards

    @property
    def mean_draft_depth(self) -> float | None:
        """Depth of the verified tree (chain length), averaged over the forwards that verified one."""
        return self.drafted_depth / self.drafting_forwards if self.drafting_forwards else None

    @property
    def mean_draft_size(self) -> float | None:
        """Drafted tokens (tree nodes) verified, averaged over the forwards that verified any."""
        return self.drafted_tokens / self.drafting_forwards if self.drafting_forwards else None

    @property
    def mean_exit_depth(self) -> float | None:
        """Layers a sorted draft ran per drafted token (its exits' depths); None without one."""
        return self.exit_layers / self.exit_tokens if self.exit_tokens else None


@dataclass(frozen=True)
class Step:
    """One target forward: what it verified and what it committed."""

    drafted: int  # drafted tokens (tree nodes below the root) it verified
    committed: int  # tokens it committed: the accepted drafted ones, then the target's own
    # The proposing drafter (index in the method's drafters) of each accepted drafted token, if known.
    accepted_by: tuple[int, ...] = ()
    depth: int = 0  # of the verified tree below the root (a chain: `drafted`)

    @property
    def accepted(self) -> int:
        """Drafted tokens committed before the target's own token. Where a step ends at a stop token the
        target accepted, that token is the target's own: it is what the target itself would produce."""
        return self.committed - 1


@dataclass
class DecodeStats:
    """Counters of one generation, kept per target forward; every total is derived from the steps, so
    the figures never disagree (new tokens = target forwards + accepted tokens, always)."""

    prompt_tokens: int = 0
    # Every forward pass of the target, the prefill (which commits the first token) included.
    steps: list[Step] = field(default_factory=list)
    prefill_s: float = 0.0
    wall_s: float = 0.0
    # Target forwards whose logits nothing used (DSI: a job on a rejected draft, or one that another
    # instance overtook); not among `steps`.
    discarded_forwards: int = 0
    # Sorted drafts: tokens drafted and the layers they ran (see Totals.mean_exit_depth).
    exit_tokens: int = 0
    exit_layers: int = 0
    # The self-tuning pipeline: whether this generation ran pipelined or taking turns (None: no choice).
    pipelined: bool | None = None

    def record_step(
        self, drafted: int, committed: int, accepted_by: Sequence[int] = (), depth: int | None = None
    ) -> None:
        """One target forward; `depth` of the verified tree defaults to a chain's (`drafted`)."""
        depth = drafted if depth is None else depth
        self.steps.append(Step(drafted, committed, tuple(accepted_by[: committed - 1]), depth))

    def truncate(self, new_tokens: int) -> None:
        """Keep only the first `new_tokens` committed tokens (text cut at a stop string): later steps go,
        the last one kept commits only what is kept."""
        kept: list[Step] = []
        for step in self.steps:
            left = new_tokens - sum(s.committed for s in kept)
            if left <= 0:
                break
            if step.committed > left:
                step = Step(step.drafted, left, step.accepted_by[: left - 1], step.depth)
            kept.append(step)
        self.steps = kept

    @property
    def new_tokens(self) -> int:
        return sum(step.committed for step in self.steps)

    @property
    def target_forwards(self) -> int:
        """Plain decoding makes one per token."""
        return len(self.steps)

    @property
    def drafted_tokens(self) -> int:
        return sum(step.drafted for step in self.steps)

    @property
    def accepted_tokens(self) -> int:
        """Drafted tokens the target accepted (never its own next token)."""
        return sum(step.accepted for step in self.steps)

    @property
    def accepted_by_drafter(self) -> dict[int, int]:
        """Accepted tokens per proposing drafter index, where trees record it."""
        counts: dict[int, int] = {}
        for step in self.steps:
            for drafter in step.accepted_by:
                counts[drafter] = counts.get(drafter, 0) + 1
        return counts

    def accepted_by(self, drafter_names: Sequence[str]) -> dict[str, int]:
        """Accepted tokens per drafter name (`drafter_names` in the method's drafter order), every name
        listed, a name given twice counted once with both drafters' tokens."""
        counts = dict.fromkeys(drafter_names, 0)
        for index, accepted in self.accepted_by_drafter.items():
            counts[drafter_names[index]] += accepted
        return counts

    def totals(self) -> Totals:
        return Totals(
            self.new_tokens,
            self.target_forwards,
            self.drafted_tokens,
            self.accepted_tokens,
            self.wall_s,
            drafting_forwards=sum(1 for step in self.steps if step.drafted),
            drafted_depth=sum(step.depth for step in self.steps),
            exit_tokens=self.exit_tokens,
            exit_layers=self.exit_layers,
        )

    @property
    def tokens_per_s(self) -> float:
        return self.totals().tokens_per_s

    @property
    def mean_accepted_tokens(self) -> float:
        return self.totals().mean_accepted_tokens

    @property
    def acceptance_rate(self) -> float | None:
        return self.totals().acceptance_rate

    def summary(self) -> str:
        rate = "n/a" if self.acceptance_rate is None else f"{self.acceptance_rate:.1%}"
        return (
            f"new tokens {self.new_tokens} | wall {self.wall_s:.2f} s | {self.tokens_per_s:.2f} tokens/s | "
            f"target forwards {self.target_forwards} | mean accepted tokens per forward "
            f"{self.mean_accepted_tokens:.2f} | acceptance rate {rate}"
            + ("" if self.pipelined is None else f" | pipelined {'yes' if self.pipelined else 'no'}")
        )

    def to_dict(self) -> dict[str, float | int | None]:
        totals = self.totals()
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "wall_s": round(self.wall_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "target_forwards": self.target_forwards,
            "discarded_forwards": self.discarded_forwards,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
            "plain_share": _rounded(totals.plain_share),
            "mean_draft_depth": _rounded(totals.mean_draft_depth),
            "mean_draft_size": _rounded(totals.mean_draft_size),
            "mean_exit_depth": _rounded(totals.mean_exit_depth),
            "pipelined": self.pipelined,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
