"""Pairing rules and hard-negative selection on hand-worked scores and log-probs."""

from __future__ import annotations

import random

import pytest
import torch

from dpokit.logprobs import PairLogps
from dpokit.online.pairs import DROP_GAP, DROP_JUDGE, hard_negatives, implicit_margins, pick_pair


def rng() -> random.Random:
    return random.Random(0)


def test_best_vs_worst_picks_the_extremes() -> None:
    # scores 0.2, 0.9, -0.5, 0.4: best is answer 1 (0.9), worst answer 2 (-0.5), gap 1.4.
    assert pick_pair([0.2, 0.9, -0.5, 0.4], "best_vs_worst", 0.0, rng()) == (1, 2)


def test_best_vs_second_picks_the_runner_up() -> None:
    # best 0.9 (answer 1), second 0.4 (answer 3): gap 0.5.
    assert pick_pair([0.2, 0.9, -0.5, 0.4], "best_vs_second", 0.0, rng()) == (1, 3)
    # gap 0.5 < 0.6: dropped even though the worst would clear it.
    assert pick_pair([0.2, 0.9, -0.5, 0.4], "best_vs_second", 0.6, rng()) == DROP_GAP


def test_best_vs_random_only_draws_answers_the_gap_separates() -> None:
    # best 0.9; with min gap 0.6 only 0.2 (answer 0, gap 0.7) and -0.5 (answer 2, gap 1.4) are eligible.
    drawn = {pick_pair([0.2, 0.9, -0.5, 0.4], "best_vs_random", 0.6, random.Random(s))[1] for s in range(20)}
    assert drawn == {0, 2}
    # Nothing 0.3 below 0.5: dropped.
    assert pick_pair([0.5, 0.4, 0.3], "best_vs_random", 0.3, rng()) == DROP_GAP


def test_ties_and_small_gaps_are_dropped() -> None:
    assert pick_pair([0.5, 0.5, 0.5], "best_vs_worst", 0.0, rng()) == DROP_GAP  # all tied: gap 0
    assert pick_pair([0.5, 0.3], "best_vs_worst", 0.25, rng()) == DROP_GAP  # gap 0.2 < 0.25
    assert pick_pair([0.5, 0.25], "best_vs_worst", 0.25, rng()) == (0, 1)  # gap 0.25 >= 0.25


def test_judge_failures_never_enter_a_pair() -> None:
    # Answer 1 would be the worst (it failed, None): the pair is best 0 (0.8) vs 2 (0.1).
    assert pick_pair([0.8, None, 0.1], "best_vs_worst", 0.0, rng()) == (0, 2)
    assert pick_pair([None, 0.3, None], "best_vs_worst", 0.0, rng()) == DROP_JUDGE


def test_implicit_margins_by_hand() -> None:
    """beta = 0.5. Pair 0: policy (-10, -12), reference (-11, -11): (1 - (-1)) * 0.5 = 1.0.
    Pair 1: policy (-5, -5), reference (-4, -6): (-1 - 1) * 0.5 = -1.0."""
    lengths = torch.ones(2)
    policy = PairLogps(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0]), lengths, lengths)
    reference = PairLogps(torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -6.0]), lengths, lengths)
    torch.testing.assert_close(implicit_margins(policy, reference, 0.5), torch.tensor([1.0, -1.0]))


def test_hard_negatives_keep_the_smallest_margins_in_order() -> None:
    margins = torch.tensor([0.3, -0.2, 1.5, 0.0, 0.3])
    # ceil(0.4 * 5) = 2: margins -0.2 (index 1) and 0.0 (index 3).
    assert hard_negatives(margins, 0.4) == [1, 3]
    # ceil(0.5 * 5) = 3: adds the first 0.3 (index 0, stable on the tie with index 4).
    assert hard_negatives(margins, 0.5) == [0, 1, 3]
    assert hard_negatives(margins, 1.0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("fraction", [0.01, 0.2])
def test_hard_negatives_keep_at_least_one(fraction: float) -> None:
    assert hard_negatives(torch.tensor([2.0, 1.0, 3.0]), fraction) == [1]
