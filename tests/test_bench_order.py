"""The contenders' running order: a balanced Latin square (Williams design)."""

import itertools
from collections import Counter

import pytest

from swarmspec.bench.order import balanced_cycle, balanced_order


@pytest.mark.parametrize("contenders", [1, 2, 3, 4, 5, 6, 7])
def test_every_contender_runs_in_every_place_and_after_every_other_equally_often(contenders: int) -> None:
    cycle = balanced_cycle(contenders)
    assert cycle == (contenders if contenders % 2 == 0 else 2 * contenders)
    orders = [balanced_order(contenders, r) for r in range(cycle)]
    assert all(sorted(order) == list(range(contenders)) for order in orders)
    places = Counter((place, c) for order in orders for place, c in enumerate(order))
    assert set(places.values()) == {cycle // contenders}
    follows = Counter(pair for order in orders for pair in itertools.pairwise(order))
    if contenders > 1:
        assert len(follows) == contenders * (contenders - 1)  # every ordered pair occurs ...
        assert len(set(follows.values())) == 1  # ... equally often
    assert balanced_order(contenders, cycle) == orders[0]  # the rounds cycle


def test_three_contenders_turn_then_run_reversed() -> None:
    # Turning alone (the first three rounds) keeps who follows whom; the reversed rounds balance it.
    assert [balanced_order(3, r) for r in range(6)] == [
        [0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0], [0, 2, 1], [1, 0, 2],
    ]  # fmt: skip


def test_no_contenders_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one contender"):
        balanced_order(0, 0)
