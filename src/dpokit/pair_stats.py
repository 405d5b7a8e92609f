"""Preference metrics of a batch under TRL's names, summed over pairs then averaged: one definition that
training steps and held-out evaluation both report with."""

from __future__ import annotations

import torch

from dpokit.logprobs import PairLogps


class PairStats:
    """Running sums of per-pair metrics, kept on the device of the inputs: adding a micro-batch never waits
    for the device (no host sync); `means()` reads everything once."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None  # (K + 1,) float64: one sum per metric, then the pair count

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
            "loss": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy.chosen,
            "logps/rejected": policy.rejected,
            "lengths/chosen": policy.chosen_lengths,
            "lengths/rejected": policy.rejected_lengths,
        }
        if reference is not None:
            # Sequence-level estimate of KL(pi || pi_ref) on the data: mean log-ratio of both answers.
            values["kl"] = ((policy.chosen - reference.chosen) + (policy.rejected - reference.rejected)) / 2
        count = torch.full((), len(losses), dtype=torch.float64, device=losses.device)  # a fill, not a copy
        batch = torch.stack([v.detach().to(torch.float64).sum() for v in values.values()] + [count])
        self.names = list(values)
        self.sums = batch if self.sums is None else self.sums + batch

    def totals(self) -> torch.Tensor:
        """Sums and count as one device tensor (K + 1,), for reducing across processes."""
        return self.sums

    def means(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        """Mean of each metric over every pair added (of `totals`, when reduced across processes)."""
        *sums, count = (self.sums if totals is None else totals).tolist()  # the one read from the device
        return {name: value / count for name, value in zip(self.names, sums)}
