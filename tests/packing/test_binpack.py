"""Bin packing: every item placed once, rows within capacity, rows balanced."""

from __future__ import annotations

import random

from dpokit.packing.binpack import pack_rows


def test_every_item_once_and_rows_within_budget() -> None:
    rng = random.Random(0)
    sizes = [int(rng.lognormvariate(4, 1)) + 1 for _ in range(200)]
    budget = 1024
    rows = pack_rows(sizes, budget)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    capacity = max(budget, max(sizes))
    loads = [sum(sizes[i] for i in row) for row in rows]
    assert max(loads) <= capacity
    # Balanced: the rows a forward pass pads to the longest one waste little.
    assert sum(max(loads) - load for load in loads) < 0.1 * sum(loads)


def test_item_over_budget_gets_its_own_row() -> None:
    rows = pack_rows([10, 300, 20, 30], token_budget=100)
    assert [1] in rows
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]


def test_worked_example() -> None:
    """sizes 5,4,3,3,1 (16 tokens), budget 8: 2 rows; longest first into the emptier row:
    5 -> A; 4 -> B; 3 -> B (4 < 5); 3 -> A (5 < 7); 1 -> B (7 < 8): A = 5+3 = 8, B = 4+3+1 = 8."""
    assert pack_rows([5, 4, 3, 3, 1], token_budget=8) == [[0, 3], [1, 2, 4]]


def test_empty() -> None:
    assert pack_rows([], token_budget=8) == []
