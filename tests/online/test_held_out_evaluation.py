"""The held-out win rate: from scores with a pointwise judge, from direct A/B comparisons with a pairwise one
(order alternating, failures counted, no reward), on hand-made answers and through a one-round run."""

from __future__ import annotations

import pytest
from test_loop import iterate_config

from dpokit.online import loop as online_loop
from dpokit.online.evaluation import (
    PAIRWISE_NOTE,
    compare_with_reference,
    is_pairwise,
    judge_held_out,
    outcomes_from_scores,
    summarize,
)


class FakePairwiseJudge:
    """Prefers the longer answer (then the later in sort order: whatever the position); 'always_a' makes it pick whatever is shown first (pure position bias);
    an answer containing 'fail' makes the comparison fail. Records what it was shown."""

    pairwise = True

    def __init__(self, always_a: bool = False) -> None:
        self.always_a = always_a
        self.shown: list[tuple[str, str]] = []

    def compare(self, prompts, answers_a, answers_b):
        self.shown += list(zip(answers_a, answers_b))
        return [
            None if "fail" in a + b else 1.0 if self.always_a or (len(a), a) > (len(b), b) else 0.0
            for a, b in zip(answers_a, answers_b)
        ]

    def score(self, prompts, answers):  # the round robin of the training stage, reduced to length
        return [float(len(a)) for a in answers]


POLICY = ["a long answer", "short", "another long one", "tiny", "fail here", "same"]
REFERENCE = ["short", "a long answer", "x", "a much longer answer", "anything", "same"]


def test_pairwise_outcomes_against_the_reference() -> None:
    """Per prompt: 1 where the judge prefers the policy's answer, 0 where the reference's, None where the
    comparison failed, 0.5 without asking where both are the same text; the policy's answer is shown
    first in every other comparison."""
    judge = FakePairwiseJudge()
    outcomes = compare_with_reference(judge, ["p"] * 6, POLICY, REFERENCE)
    assert outcomes == [1.0, 0.0, 1.0, 0.0, None, 0.5]
    assert judge.shown == [  # prompts 0-4 asked (5 is the same text), A/B order alternating
        ("a long answer", "short"),
        ("a long answer", "short"),
        ("another long one", "x"),
        ("a much longer answer", "tiny"),
        ("fail here", "anything"),
    ]
    record = summarize(3, None, [4, 2, 6, 1, 3, 1], 0.25, outcomes)
    assert record["win_rate_vs_reference"] == pytest.approx((1 + 0 + 1 + 0 + 0.5) / 5)
    assert record["judge_failures"] == 1  # the failed comparison
    assert record["reward_mean"] is None and record["reward_std"] is None
    assert record["reward_note"] == PAIRWISE_NOTE


def test_position_bias_cancels() -> None:
    """A judge that always picks answer A wins the policy exactly half of the comparisons."""
    policy = [f"answer {i}" for i in range(8)]
    reference = [f"other {i}" for i in range(8)]
    outcomes = compare_with_reference(FakePairwiseJudge(always_a=True), ["p"] * 8, policy, reference)
    assert outcomes == [1.0, 0.0] * 4
    assert summarize(1, None, [1] * 8, 0.0, outcomes)["win_rate_vs_reference"] == 0.5


def test_pointwise_outcomes_and_record() -> None:
    """Pointwise: the higher score wins, a tie is half, a failed score on either side leaves the prompt out."""
    outcomes = outcomes_from_scores([3.0, 1.0, 2.0, None, 5.0], [1.0, 2.0, 2.0, 1.0, None])
    assert outcomes == [1.0, 0.0, 0.5, None, None]
    record = summarize(1, [3.0, 1.0, 2.0, None, 5.0], [1, 2, 3, 4, 5], 0.1, outcomes)
    assert record["win_rate_vs_reference"] == 0.5 and record["judge_failures"] == 1
    assert record["reward_mean"] == pytest.approx(11 / 4) and "reward_note" not in record


def test_judge_held_out_picks_the_mode() -> None:
    judge = FakePairwiseJudge()
    reference = [{"text": t, "score": None} for t in REFERENCE]
    assert judge_held_out(judge, ["p"] * 6, POLICY, reference) == (None, [1.0, 0.0, 1.0, 0.0, None, 0.5])
    assert judge_held_out(judge, ["p"] * 6, POLICY, None) == (None, [0.5] * 6)  # round 0: its own reference
    assert judge.shown[5:] == []  # round 0 asks nothing
    judge.pairwise = False  # the same object as a pointwise judge: scores, compared
    scores, outcomes = judge_held_out(judge, ["p"] * 2, ["abc", "a"], [{"text": "", "score": 2.0}] * 2)
    assert scores == [3.0, 1.0] and outcomes == [1.0, 0.0]
    assert is_pairwise(FakePairwiseJudge()) and not is_pairwise(object())


def test_pairwise_judge_in_a_run(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """A one-round run with a pairwise judge: rounds.jsonl has no reward, a note, and a win rate that is the
    share of held-out prompts where the fake judge prefers round 1's answer to round 0's."""
    judge = FakePairwiseJudge()
    monkeypatch.setattr(online_loop, "build_judge", lambda spec, device: judge)
    run_dir = online_loop.iterate(iterate_config(tmp_path, tiny_model_dir, "rounds=1"))
    rounds = online_loop.read_jsonl(run_dir / "rounds.jsonl")
    assert [(r["reward_mean"], r["reward_note"]) for r in rounds] == [(None, PAIRWISE_NOTE)] * 2
    assert rounds[0]["win_rate_vs_reference"] == 0.5 and rounds[0]["judge_failures"] == 0
    start, after = (online_loop.read_jsonl(run_dir / f"round-{n}" / "eval_samples.jsonl") for n in (0, 1))
    expected = [
        0.5 if a["text"] == s["text"] else float((len(a["text"]), a["text"]) > (len(s["text"]), s["text"]))
        for a, s in zip(after, start)
    ]
    assert [r["vs_reference"] for r in after] == expected
    assert rounds[1]["win_rate_vs_reference"] == pytest.approx(sum(expected) / len(expected))
