"""Judges: one small interface, `score(prompts, answers) -> list[float | None]`, None where the judge failed.

Built from the config's `judge` string by `build_judge`: vader, length, regex:PATTERN, keywords:a,b,
python:module:function, reward-model:DIR, or from a `judge:` mapping: the LLM judge over HTTP
(http_judge.py). A failed score (None, NaN, or a value that is not a number) is
counted by the loop, and that answer never enters a pair.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dpokit.data.rows import Text
from dpokit.distributed import progress
from dpokit.errors import DpokitError
from dpokit.judges import vader_score
from dpokit.online.config import LLMJudgeConfig

Score = float | None

REWARD_MODEL_BATCH = 16  # answers per reward-model forward pass


class Judge(Protocol):
    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        """One score per (prompt, answer), higher is better; None where the judge could not score it."""
        ...


def clean_score(value: Any) -> Score:
    """A judge's raw output as a finite float, or None (the judge failed on this answer)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class FunctionJudge:
    """A judge from a function of (prompts, answers) returning one raw score per answer."""

    function: Callable[[Sequence[Text], Sequence[str]], Sequence[Any]]
    name: str

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        try:
            raw = list(self.function(prompts, answers))
        except Exception as error:  # the user's code: one line, and --resume judges the round again
            message = " ".join(str(error).split())
            raise DpokitError(f"judge {self.name}: raised {type(error).__name__}: {message}") from None
        if len(raw) != len(answers):
            raise DpokitError(f"judge {self.name}: returned {len(raw)} scores for {len(answers)} answers")
        return [clean_score(value) for value in raw]


def _vader(prompts: Sequence[Text], answers: Sequence[str]) -> list[float]:
    return vader_score(list(answers))


def _length(prompts: Sequence[Text], answers: Sequence[str]) -> list[int]:
    return [len(answer) for answer in answers]


def _regex(pattern: re.Pattern) -> Callable[[Sequence[Text], Sequence[str]], list[int]]:
    return lambda prompts, answers: [len(pattern.findall(answer)) for answer in answers]


def _keywords(words: list[str]) -> Callable[[Sequence[Text], Sequence[str]], list[int]]:
    return lambda prompts, answers: [sum(answer.lower().count(w) for w in words) for answer in answers]


def _python(target: str) -> Callable:
    module_name, _, function_name = target.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise DpokitError(f"judge python:{target}: cannot import ({error})") from None
    if not callable(function):
        raise DpokitError(f"judge python:{target}: not callable")
    return function


@dataclass
class RewardModelJudge:
    """A sequence-classification reward model: the score is its first logit on prompt + answer.

    The text is the chat template of [user prompt, assistant answer] when the tokenizer has one (the format
    reward models are trained on), else prompt + answer. Batched, right-padded; transformers' classifier
    reads the last non-pad token.
    """

    model: torch.nn.Module
    tokenizer: Any

    @classmethod
    def load(cls, path: str, device: torch.device) -> RewardModelJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise DpokitError(f"judge reward-model:{path}: no such directory")
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer)

    def _text(self, prompt: Text, answer: str) -> str:
        if not self.tokenizer.chat_template:
            return (prompt if isinstance(prompt, str) else prompt[-1]["content"]) + answer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        scores: list[Score] = []
        batches = range(0, len(answers), REWARD_MODEL_BATCH)
        for start in progress(batches, desc="judging", unit="batch", leave=False):
            texts = [
                self._text(p, a)
                for p, a in zip(
                    prompts[start : start + REWARD_MODEL_BATCH], answers[start : start + REWARD_MODEL_BATCH]
                )
            ]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = self.model(**batch.to(self.model.device)).logits[:, 0]  # (B,)
            scores += [clean_score(value) for value in logits.float().tolist()]
        return scores


def build_judge(spec: str | LLMJudgeConfig, device: torch.device) -> Judge:
    """The judge a config's `judge` string names, or the LLM judge its mapping configures."""
    if isinstance(spec, LLMJudgeConfig):
        from dpokit.online.http_judge import LLMJudge  # imports this module's Score

        return LLMJudge.load(spec)
    kind, _, argument = spec.partition(":")
    if kind == "vader" and not argument:
        return FunctionJudge(_vader, spec)
    if kind == "length" and not argument:
        return FunctionJudge(_length, spec)
    if kind == "regex" and argument:
        try:
            return FunctionJudge(_regex(re.compile(argument)), spec)
        except re.error as error:
            raise DpokitError(f"judge {spec}: invalid regular expression ({error})") from None
    if kind == "keywords" and argument:
        return FunctionJudge(_keywords([w.strip().lower() for w in argument.split(",") if w.strip()]), spec)
    if kind == "python" and ":" in argument:
        return FunctionJudge(_python(argument), spec)
    if kind == "reward-model" and argument:
        return RewardModelJudge.load(argument, device)
    raise DpokitError(
        f"judge {spec!r}: unknown judge (use vader, length, regex:PATTERN, keywords:a,b, "
        "python:module:function or reward-model:DIR)"
    )
