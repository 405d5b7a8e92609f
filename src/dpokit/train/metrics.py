"""Preference metrics under TRL's names, summed over pairs then averaged, and the metrics.jsonl writer."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

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


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            # Drop records written after the checkpoint we resume from, so the curve continues exactly.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def is_finite(record: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))
