"""From k judged answers per prompt to preference pairs: one pure rule per pairing, and hard-negative mining.

Every rule takes the best-scored answer as chosen; they differ in the rejected one. A pair is kept only when
chosen - rejected >= min_score_gap and > 0 (ties never make a pair). Answers the judge failed on are left out
before any rule runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from dpokit.logprobs import PairLogps
from dpokit.online.judges import Score

# Why a prompt yields no pair (the per-round report counts each).
DROP_JUDGE = "judge_failures"  # fewer than two answers the judge could score
DROP_GAP = "tie_or_gap"  # best - rejected is zero or below min_score_gap
DROP_MINING = "hard_negative_mining"  # a clear pair the current policy already separates well

# rule(order, scores, min_gap, rng) -> rejected index; `order` holds the scored answers, best first.
Rule = Callable[[list[int], Sequence[Score], float, random.Random], int]


def _worst(order: list[int], scores: Sequence[Score], min_gap: float, rng: random.Random) -> int:
    return order[-1]


def _second(order: list[int], scores: Sequence[Score], min_gap: float, rng: random.Random) -> int:
    return order[1]


def _random(order: list[int], scores: Sequence[Score], min_gap: float, rng: random.Random) -> int:
    """A random answer among those the gap separates from the best (the worst when none is, so it drops)."""
    best = scores[order[0]]
    eligible = [i for i in order[1:] if best - scores[i] >= min_gap and best > scores[i]]
    return rng.choice(eligible) if eligible else order[-1]


RULES: dict[str, Rule] = {"best_vs_worst": _worst, "best_vs_random": _random, "best_vs_second": _second}


def pick_pair(
    scores: Sequence[Score], rule: str, min_gap: float, rng: random.Random
) -> tuple[int, int] | str:
    """(chosen index, rejected index) among one prompt's answers, or the reason (DROP_*) there is none.

    The best is the highest score, the earliest answer on a tie.
    """
    order = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: -scores[i])
    if len(order) < 2:
        return DROP_JUDGE
    rejected = RULES[rule](order, scores, min_gap, rng)
    gap = scores[order[0]] - scores[rejected]
    if gap <= 0 or gap < min_gap:
        return DROP_GAP
    return order[0], rejected


def implicit_margins(policy: PairLogps, reference: PairLogps, beta: float) -> torch.Tensor:
    """beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected)) per pair, (N,).

    The DPO implicit reward r = beta * log(pi / ref) (Rafailov et al. 2023, eq. 5) of chosen minus rejected:
    small or negative where the policy does not yet prefer the judge's choice.
    """
    return beta * ((policy.chosen - reference.chosen) - (policy.rejected - reference.rejected))


def hard_negatives(margins: torch.Tensor, fraction: float) -> list[int]:
    """Indices of the ceil(fraction * N) pairs with the smallest margins, in their original order.

    Equal margins keep the earlier pair first (a stable sort), so the choice is deterministic.
    """
    keep = math.ceil(fraction * len(margins))
    order = torch.sort(margins, stable=True).indices[:keep]
    return sorted(order.tolist())
