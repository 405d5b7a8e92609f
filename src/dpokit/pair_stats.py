"""Preference metrics of a batch under TRL's names, summed over pairs then averaged: one definition that
training steps and held-out evaluation both report with."""

from __future__ import annotations

from collections import defaultdict

import torch

from dpokit.logprobs import PairLogps


class PairStats:
    """Running sums of per-pair metrics; `means()` gives the mean over every pair added."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def add(
        self,
        losses: torch.Tensor,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        policy: PairLogps,
        reference: PairLogps | None,
    ) -> None:
        """Add a batch: every argument is (B,) per pair (or PairLogps of (B,) tensors)."""
        values = {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
            "lengths/chosen": policy.chosen_lengths,
            "lengths/rejected": policy.rejected_lengths,
        }
        if reference is not None:
            # Sequence-level estimate of KL(pi || pi_ref) on the data: mean log-ratio of both answers.
            values["kl"] = (
                (policy.chosen - reference.chosen) + (policy.rejected - reference.rejected)
            ).detach() / 2
        for name, value in values.items():
            self.sums[name] += float(value.float().sum())
        self.count += len(losses)

    def totals(self) -> torch.Tensor:
        """Sums and count as one tensor, for reducing across processes."""
        return torch.tensor([*self.sums.values(), float(self.count)], dtype=torch.float64)

    def means(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        totals = self.totals() if totals is None else totals
        count = float(totals[-1])
        return {name: float(value) / count for name, value in zip(self.sums, totals[:-1])}
