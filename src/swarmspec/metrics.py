"""Decoding metrics, defined once and shared by the CLI, the benchmark and the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """Counters of one generation. Derived figures are properties, so they can never disagree."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    # Every forward pass of the target, the prefill included: plain decoding makes one per token.
    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafted tokens the target accepted (never its own next token)
    # Accepted tokens per proposing drafter (its index in the method's drafters), where trees record it.
    accepted_by_drafter: dict[int, int] = field(default_factory=dict)
    prefill_s: float = 0.0
    wall_s: float = 0.0

    def record_step(self, drafted: int, accepted: int, accepted_by: Sequence[int] = ()) -> None:
        """One target forward; `accepted_by`: the proposing drafter of each accepted token, if known."""
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        for drafter in accepted_by:
            self.accepted_by_drafter[drafter] = self.accepted_by_drafter.get(drafter, 0) + 1

    def accepted_by(self, drafter_names: Sequence[str]) -> dict[str, int]:
        """Accepted tokens per drafter name (`drafter_names` in the method's drafter order), every name
        listed, a name given twice counted once with both drafters' tokens."""
        counts = dict.fromkeys(drafter_names, 0)
        for index, accepted in self.accepted_by_drafter.items():
            counts[drafter_names[index]] += accepted
        return counts

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per target forward, the target's own token included (plain decoding: 1.0)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of drafted tokens accepted; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    def summary(self) -> str:
        rate = "n/a" if self.acceptance_rate is None else f"{self.acceptance_rate:.1%}"
        return (
            f"new tokens {self.new_tokens} | wall {self.wall_s:.2f} s | {self.tokens_per_s:.2f} tokens/s | "
            f"target forwards {self.target_forwards} | mean accepted tokens per forward "
            f"{self.mean_accepted_tokens:.2f} | acceptance rate {rate}"
        )

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "wall_s": round(self.wall_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "target_forwards": self.target_forwards,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
        }
