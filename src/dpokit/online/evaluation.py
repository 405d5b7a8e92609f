"""A round's held-out evaluation: judge reward, KL to the starting model, answer length, win rate.

One sampled answer per held-out prompt, drawn with the same seed every round, so rounds differ by the policy
only. Round 0 is the starting policy, whose answers are also the reference side of the win rate: with a
pointwise judge, per prompt, whose score is higher; with a pairwise judge, which of the two answers it
prefers when shown both (order alternating), and no reward_mean, since it scores no single answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from dpokit.data.rows import Text
from dpokit.models.loading import reference_context
from dpokit.online.judges import Judge, Score
from dpokit.online.models import answer_logps

PAIRWISE_NOTE = (
    "pairwise judge: no per-answer reward; win_rate_vs_reference comes from A/B comparisons of each answer "
    "with round 0's answer to the same prompt"
)


@runtime_checkable
class PairwiseJudge(Protocol):
    """A judge that can compare two answers directly; `pairwise` says whether it judges that way."""

    pairwise: bool

    def compare(
        self, prompts: Sequence[Text], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[Score]:
        """1.0 where it prefers answer A, 0.0 where B, None where it failed."""
        ...


def is_pairwise(judge: object) -> bool:
    return isinstance(judge, PairwiseJudge) and judge.pairwise


def outcomes_from_scores(policy: Sequence[Score], reference: Sequence[Score]) -> list[Score]:
    """Per prompt: 1.0 where the policy's answer scores above the reference's, 0.5 on a tie, 0.0 below, None
    where either score failed."""
    return [
        None if p is None or r is None else 1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy, reference)
    ]


def compare_with_reference(
    judge: PairwiseJudge,
    prompts: Sequence[Text],
    policy_answers: Sequence[str],
    reference_answers: Sequence[str],
) -> list[Score]:
    """Per prompt: 1.0 where the pairwise judge prefers the policy's answer, 0.0 the reference's, None where the
    comparison failed; 0.5, without asking, where both answers are the same text.

    The policy's answer is shown first (A) in every other comparison and second (B) in the rest, so a judge
    that always picks the same position wins exactly half: the position bias cancels in the win rate.
    """
    asked = [i for i, (p, r) in enumerate(zip(policy_answers, reference_answers)) if p != r]
    first = [j % 2 == 0 for j in range(len(asked))]  # policy shown as A
    results = judge.compare(
        [prompts[i] for i in asked],
        [policy_answers[i] if a else reference_answers[i] for i, a in zip(asked, first)],
        [reference_answers[i] if a else policy_answers[i] for i, a in zip(asked, first)],
    )
    outcomes: list[Score] = [0.5] * len(prompts)
    for i, policy_first, a_won in zip(asked, first, results):
        outcomes[i] = None if a_won is None else a_won if policy_first else 1.0 - a_won
    return outcomes


def judge_held_out(
    judge: Judge, prompts: Sequence[Text], answers: Sequence[str], reference: Sequence[dict] | None
) -> tuple[list[Score] | None, list[Score]]:
    """The judge's scores of the held-out answers (None for a pairwise judge) and, per prompt, the outcome
    against the reference's answer. reference: round 0's eval_samples.jsonl records; None in round 0,
    which is its own reference."""
    if is_pairwise(judge):
        reference_answers = answers if reference is None else [r["text"] for r in reference]
        return None, compare_with_reference(judge, prompts, answers, reference_answers)
    scores = judge.score(prompts, answers)
    return scores, outcomes_from_scores(
        scores, scores if reference is None else [r["score"] for r in reference]
    )


def summarize(
    round_number: int,
    scores: Sequence[Score] | None,
    lengths: Sequence[int],
    kl: float,
    outcomes: Sequence[Score],
) -> dict[str, Any]:
    """The rounds.jsonl record of one evaluation. scores None: a pairwise judge, which scores no single
    answer; its failures are the comparisons that failed. outcomes: per prompt against the reference."""
    decided = [o for o in outcomes if o is not None]
    valid = [s for s in scores if s is not None] if scores is not None else []
    record = {
        "round": round_number,
        "reward_mean": statistics.fmean(valid) if valid else None,
        "reward_std": statistics.pstdev(valid) if valid else None,
        "kl": kl,
        "length_mean": statistics.fmean(lengths),
        "win_rate_vs_reference": statistics.fmean(decided) if decided else None,
        "judge_failures": len(outcomes) - len(decided) if scores is None else len(scores) - len(valid),
    }
    if scores is None:
        record["reward_note"] = PAIRWISE_NOTE
    return record


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
    policy_logps = answer_logps(policy, tokenizer, prompts, answers, batch_size)  # (N,)
    with reference_context(policy, reference) as model:
        reference_logps = answer_logps(model, tokenizer, prompts, answers, batch_size)  # (N,)
    return (policy_logps - reference_logps).mean().item()
