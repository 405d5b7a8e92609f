"""Preference metrics of a policy on a dataset: the engine of held-out evaluation and `dpokit eval`."""

from __future__ import annotations

import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import progress
from dpokit.logprobs import LogpsFn, PairLogps, select
from dpokit.losses import LOSSES, LossParams
from dpokit.pair_stats import PairStats


def evaluate_pairs(
    policy: torch.nn.Module,
    pairs: list[TokenizedPair],
    reference: PairLogps | None,
    loss_type: str,
    params: LossParams,
    logps_fn: LogpsFn,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean preference metrics over all pairs (TRL names), with reference log-probs given per pair in order."""
    stats = PairStats()
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for start in progress(range(0, len(pairs), batch_size), desc="evaluating", unit="batch", leave=False):
            index = list(range(start, min(start + batch_size, len(pairs))))
            out = logps_fn(policy, [pairs[i] for i in index])
            out = PairLogps(
                out.chosen.float().cpu(),
                out.rejected.float().cpu(),
                out.chosen_lengths.float().cpu(),
                out.rejected_lengths.float().cpu(),
            )
            ref = select(reference, index) if reference is not None else None
            losses, chosen_rewards, rejected_rewards = LOSSES[loss_type](out, ref, params)
            stats.add(losses, chosen_rewards, rejected_rewards, out, ref)
    policy.train(was_training)
    return stats.means()
