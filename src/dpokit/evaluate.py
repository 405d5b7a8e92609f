"""Preference metrics of a policy on a dataset: the engine of held-out evaluation and `dpokit eval`."""

from __future__ import annotations

from collections.abc import Callable

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
    share: tuple[int, int] | None = None,
    gather: Callable[[list], list] | None = None,
) -> dict[str, float]:
    """Mean preference metrics over all pairs (TRL names), with reference log-probs given per pair in order.

    share, gather: (index, count) and `accelerate.utils.gather_object`, for `count` processes (DDP) that
    evaluate together: each one takes every count-th batch from the index-th, and the sums of all are
    gathered into the same means on every process. Each pair is in the batch it would be in alone.
    """
    stats = PairStats()
    starts = range(0, len(pairs), batch_size)
    if share is not None:
        starts = starts[share[0] :: share[1]]
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for start in progress(starts, desc="evaluating", unit="batch", leave=False):
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
    mine = (stats.names, None if stats.sums is None else stats.sums.tolist())
    return merge_shares(gather([mine]) if gather is not None else [mine])


def merge_shares(shares: list[tuple[list[str], list[float] | None]]) -> dict[str, float]:
    """The means of the processes' PairStats together: (names, sums and count) of each, in process order
    (None for a process that had no batch)."""
    names = next(names for names, sums in shares if sums is not None)
    *sums, count = [sum(column) for column in zip(*(sums for _, sums in shares if sums is not None))]
    return {name: value / count for name, value in zip(names, sums)}
