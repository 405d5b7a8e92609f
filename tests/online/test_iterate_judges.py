"""Judges: exact scores for the rule judges, a callable, failures, and a tiny random reward model."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from dpokit.errors import DpokitError
from dpokit.online import judges
from dpokit.online.judges import build_judge, clean_score
from tiny_models import TINY_SIZES

CPU = torch.device("cpu")


def test_length_regex_and_keywords_are_exact() -> None:
    answers = ["great, great film", "bad", ""]
    prompts = ["p"] * 3
    assert build_judge("length", CPU).score(prompts, answers) == [17.0, 3.0, 0.0]
    assert build_judge("regex:gr[a-z]+", CPU).score(prompts, answers) == [2.0, 0.0, 0.0]
    assert build_judge("keywords:Great,film", CPU).score(prompts, answers) == [3.0, 0.0, 0.0]


def test_vader_orders_sentiment() -> None:
    good, bad = build_judge("vader", CPU).score(["p", "p"], ["A wonderful, lovely film.", "A horrible film."])
    assert good > 0 > bad


@pytest.fixture
def judge_module(monkeypatch) -> str:
    module = types.ModuleType("my_judges")
    module.word_count = lambda prompts, answers: [len(a.split()) for a in answers]
    # Fails on answers containing "?" in three ways: None, NaN, and a string.
    module.flaky = lambda prompts, answers: [
        [None, math.nan, "oops"][i % 3] if "?" in a else 1.0 for i, a in enumerate(answers)
    ]
    module.short = lambda prompts, answers: [1.0]

    def broken(prompts, answers):
        raise ValueError("no score\nfor this")

    module.broken = broken
    monkeypatch.setitem(sys.modules, "my_judges", module)
    return "my_judges"


def test_python_callable_judge(judge_module: str) -> None:
    judge = build_judge(f"python:{judge_module}:word_count", CPU)
    assert judge.score(["p", "p"], ["one two three", "four"]) == [3.0, 1.0]


def test_failed_scores_become_none(judge_module: str) -> None:
    judge = build_judge(f"python:{judge_module}:flaky", CPU)
    assert judge.score(["p"] * 4, ["a?", "b?", "c?", "fine"]) == [None, None, None, 1.0]
    assert clean_score(True) is None and clean_score(math.inf) is None and clean_score(2) == 2.0


def test_bad_judge_specs_are_one_line_errors(judge_module: str) -> None:
    for spec, needle in [
        ("nope", "unknown judge"),
        ("regex:(", "invalid regular expression"),
        ("python:no_such_module:f", "cannot import"),
        ("reward-model:/no/such/dir", "no such directory"),
    ]:
        with pytest.raises(DpokitError, match=needle):
            build_judge(spec, CPU)
    with pytest.raises(DpokitError, match="returned 1 scores for 2 answers"):
        build_judge(f"python:{judge_module}:short", CPU).score(["p", "p"], ["a", "b"])
    # A judge that raises stops the round in one line naming it (not a traceback); nothing is scored.
    with pytest.raises(
        DpokitError, match="judge python:my_judges:broken: raised ValueError: no score for this"
    ) as error:
        build_judge(f"python:{judge_module}:broken", CPU).score(["p"], ["a"])
    assert "\n" not in str(error.value)


def test_reward_model_judge_batches_like_one_at_a_time(tmp_path, tiny_tokenizer, monkeypatch) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), num_labels=1, **TINY_SIZES)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    judge = build_judge(f"reward-model:{tmp_path}", CPU)
    prompts = ["The movie was", [{"role": "user", "content": "Hello there,"}], "What color is the sky?"]
    answers = ["wonderful.", "how are you today? I am fine, thanks.", "blue"]
    batched = judge.score(prompts, answers)
    single = [judge.score([p], [a])[0] for p, a in zip(prompts, answers)]
    assert all(isinstance(s, float) for s in batched)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=1e-4, atol=1e-5)
    assert len(set(batched)) == 3
    # Progress per batch of REWARD_MODEL_BATCH = 16 answers: 40 answers are 3 batches (16, 16, 8).
    bars = []
    monkeypatch.setattr(judges, "progress", lambda batches, **kwargs: bars.append(len(batches)) or batches)
    assert len(judge.score(["p"] * 40, ["an answer"] * 40)) == 40 and bars == [3]
