"""Token-budget grouping of pairs into forward passes."""

from __future__ import annotations

from dpokit.data.batching import token_batches


def test_groups_fill_the_budget_in_order_and_never_split_an_item():
    """Budget 10: 4+5 fit (9), +3 would be 12 -> new group; 3+7 = 10 fits exactly; 12 is over the budget
    alone and still gets its own group; 1 follows in a fresh group."""
    assert token_batches([4, 5, 3, 7, 12, 1], 10) == [[0, 1], [2, 3], [4], [5]]


def test_a_budget_of_one_token_gives_one_item_per_group_and_a_huge_one_a_single_group():
    sizes = [30, 2, 17, 5]
    assert token_batches(sizes, 1) == [[0], [1], [2], [3]]
    assert token_batches(sizes, 10_000) == [[0, 1, 2, 3]]
    assert token_batches([], 10) == []
