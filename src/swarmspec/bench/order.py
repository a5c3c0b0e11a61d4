"""The order in which interleaved contenders run, round after round: a balanced Latin square.

On a shared machine a run is slowed by what ran just before it (the previous contender's threads
winding down, its memory being freed, caches holding another model's weights), not only by its place
in the round. Turning a fixed order each round moves every contender through every place, but keeps
who follows whom: the contender after the slowest one is always the same, and pays for it every round.
A Williams design fixes both: over a cycle of n rounds (2n for an odd number n of contenders) every
contender runs in every place equally often and right after every other contender equally often.
"""

from __future__ import annotations


def balanced_cycle(contenders: int) -> int:
    """The rounds after which every place and every predecessor has come round equally often."""
    return contenders if contenders % 2 == 0 else 2 * contenders


def balanced_order(contenders: int, round_: int) -> list[int]:
    """The contenders' indices in the order they run in round `round_` (the rounds cycle)."""
    if contenders < 1:
        raise ValueError(f"need at least one contender, got {contenders}")
    # The first row: 0, 1, n-1, 2, n-2, ...; row r adds r to every entry (mod n). With n odd the rows
    # reversed follow, since n rows alone cannot balance who follows whom.
    first = [0]
    for step in range(1, contenders):
        first.append((step + 1) // 2 if step % 2 else contenders - step // 2)
    row = round_ % balanced_cycle(contenders)
    order = [(entry + row) % contenders for entry in first]
    return order[::-1] if row >= contenders else order
