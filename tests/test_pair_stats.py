"""PairStats: per-pair metric means worked by hand, and sums that stay on the device until read."""

from __future__ import annotations

import pytest
import torch

from dpokit.logprobs import PairLogps
from dpokit.pair_stats import PairStats


def test_means_over_two_batches_are_per_pair_means():
    """Batch 1: two pairs, batch 2: one pair. Rewards (c, r): (1, 0), (0, 2), (3, 1) -> accuracy 2/3,
    margins (1 - 2 + 2) / 3 = 1/3; loss (0.5 + 1.5 + 0.1) / 3 = 0.7; kl from log-ratios:
    pair 1 ((-1 - -2) + (-3 - -3)) / 2 = 0.5, pair 2 ((-2 - -2) + (-4 - -5)) / 2 = 0.5, pair 3 0 -> 1/3."""
    stats = PairStats()
    stats.add(
        torch.tensor([0.5, 1.5]),
        torch.tensor([1.0, 0.0]),
        torch.tensor([0.0, 2.0]),
        PairLogps(
            torch.tensor([-1.0, -2.0]),
            torch.tensor([-3.0, -4.0]),
            torch.tensor([4.0, 2.0]),
            torch.tensor([6.0, 8.0]),
        ),
        PairLogps(
            torch.tensor([-2.0, -2.0]),
            torch.tensor([-3.0, -5.0]),
            torch.tensor([4.0, 2.0]),
            torch.tensor([6.0, 8.0]),
        ),
    )
    stats.add(
        torch.tensor([0.1]),
        torch.tensor([3.0]),
        torch.tensor([1.0]),
        PairLogps(torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([3.0]), torch.tensor([1.0])),
        PairLogps(torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([3.0]), torch.tensor([1.0])),
    )
    means = stats.means()
    assert means["loss"] == pytest.approx(0.7)
    assert means["rewards/accuracies"] == pytest.approx(2 / 3)
    assert means["rewards/margins"] == pytest.approx(1 / 3)
    assert means["rewards/chosen"] == pytest.approx(4 / 3)
    assert means["logps/chosen"] == pytest.approx(-8 / 3)
    assert means["lengths/rejected"] == pytest.approx(5.0)
    assert means["kl"] == pytest.approx(1 / 3)
    # Reduced across processes, the totals of two identical processes give the same means.
    assert stats.means(stats.totals() * 2) == pytest.approx(means)


def test_sums_stay_on_the_inputs_device_as_one_tensor():
    """No per-metric Python floats: one (metrics + 1,) float64 tensor beside the inputs, the count last."""
    stats = PairStats()
    logps = PairLogps(*(torch.zeros(4) for _ in range(4)))
    stats.add(torch.ones(4), torch.zeros(4), torch.zeros(4), logps, None)
    assert stats.totals().dtype == torch.float64 and stats.totals().shape == (10,)
    assert stats.totals()[-1].item() == 4
