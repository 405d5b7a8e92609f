"""A round's held-out evaluation: judge reward, KL to the starting model, answer length, win rate.

One sampled answer per held-out prompt, drawn with the same seed every round, so rounds differ by the policy
only. Round 0 is the starting policy, whose answers are also the reference side of the win rate.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpokit.data.rows import Text
from dpokit.models.loading import reference_context
from dpokit.online.judges import Score
from dpokit.online.models import preference_row, row_logps


def win_rate(policy: Sequence[Score], reference: Sequence[Score]) -> float | None:
    """Share of prompts where the judge scores the policy's answer above the reference's (a tie counts half);
    prompts where either score failed are left out. None when none is left."""
    both = [(p, r) for p, r in zip(policy, reference) if p is not None and r is not None]
    if not both:
        return None
    return sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in both) / len(both)


def summarize(
    round_number: int,
    scores: Sequence[Score],
    lengths: Sequence[int],
    kl: float,
    reference_scores: Sequence[Score],
) -> dict[str, Any]:
    """The rounds.jsonl record of one evaluation."""
    valid = [s for s in scores if s is not None]
    return {
        "round": round_number,
        "reward_mean": statistics.fmean(valid) if valid else None,
        "reward_std": statistics.pstdev(valid) if valid else None,
        "kl": kl,
        "length_mean": statistics.fmean(lengths),
        "win_rate_vs_reference": win_rate(scores, reference_scores),
        "judge_failures": len(scores) - len(valid),
    }


def kl_estimate(
    policy,
    reference,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Text],
    answers: Sequence[str],
    batch_size: int,
) -> float:
    """Monte-Carlo KL(policy || reference) per answer, in nats: the mean of log pi(y|x) - log ref(y|x) over
    answers y sampled from the policy. reference None: the policy with its LoRA adapters disabled."""
    if policy is reference:
        return 0.0
    # Each row scores its answer twice (chosen = rejected); only the chosen side is read.
    rows = [preference_row(p, a, a, tokenizer) for p, a in zip(prompts, answers)]
    policy_logps = row_logps(policy, tokenizer, rows, batch_size).chosen  # (N,)
    with reference_context(policy, reference) as model:
        reference_logps = row_logps(model, tokenizer, rows, batch_size).chosen  # (N,)
    return (policy_logps - reference_logps).mean().item()
