"""An LLM judge over an OpenAI-compatible chat-completions API, pointwise (a score) or pairwise (A/B).

    judge:                               # in a `dpokit iterate` config
      url: http://127.0.0.1:8080/v1      # llama.cpp server, vLLM, OpenAI, ...
      model: judge-model
      mode: pointwise                    # or pairwise
      api_key_env: OPENAI_API_KEY        # the key's variable name; the key itself is never logged or saved

Requests run in a thread pool of `concurrency`; each has a timeout and is retried with exponential backoff
after a timeout, a connection error, a 429 or a 5xx (never after another 4xx: the request itself is wrong;
see openai_http.py, shared with the `openai` generation backend). A reply that cannot be parsed, or a request that still fails after its retries, is a None score: a judge
failure the loop counts, never a guess.

Pairwise, `score` runs a round robin inside each run of consecutive answers to the same prompt (the loop's
k answers per prompt): every unordered pair is compared once, answer order alternating between pairs to
average out the judge's position bias, and an answer's score is its share of the comparisons it won (in
[0, 1]; None when all of its comparisons failed). A lone answer has nothing to be compared with and scores
None; `compare` is the primitive for comparing two given answers (e.g. the policy's against the reference's).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

from dpokit.data.rows import Text
from dpokit.distributed import progress
from dpokit.online.config import LLMJudgeConfig, fill
from dpokit.online.judges import Score
from dpokit.online.openai_http import OpenAIClient, RequestFailed

log = logging.getLogger(__name__)

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# Pointwise reply patterns, most explicit first; the first that matches decides.
_SCORE_PATTERNS = [
    re.compile(rf"score\W{{0,3}}(?:is\W{{0,2}})?\**\s*({_NUMBER})", re.IGNORECASE),  # Score: 7, **Score:** 7
    re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*10\b", re.IGNORECASE),  # 7/10, 7 out of 10
    re.compile(rf"\*\*\s*({_NUMBER})\s*\*\*"),  # **8**
    re.compile(rf"\[\[\s*({_NUMBER})\s*\]\]"),  # [[8]] (MT-bench)
]
_CHOICE_PATTERNS = [
    re.compile(r"\[\[\s*([AB])\s*\]\]"),  # [[A]] (MT-bench)
    re.compile(r"\b(?:answer|response)\s+([AB])\s+is\s+(?:better|preferred)", re.IGNORECASE),
    re.compile(
        r"(?:winner|better|choice|verdict|prefer)\w*\W{0,3}(?:is\W{0,2})?(?:answer\W{0,2}|response\W{0,2})?"
        r"\**\(?([AB])\b",
        re.IGNORECASE,
    ),
]


def _finite(value: object) -> Score:
    """A finite float from a number or a numeric string, else None (NaN, inf, text, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _json_object(text: str) -> dict | None:
    """The reply as a JSON object, or the first {...} inside it, or None."""
    for candidate in (text, *re.findall(r"\{[^{}]*\}", text)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_score(reply: str) -> Score:
    """A pointwise score from free text: {"score": 6}, "Score: 7", "7/10", "**8**", "[[8]]" or a lone number.

    Anything else (no number, several unlabelled numbers, NaN) is None.
    """
    obj = _json_object(reply)
    if obj is not None and "score" in obj:
        return _finite(obj["score"])
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(reply)
        if match:
            return _finite(match.group(1))
    numbers = re.findall(_NUMBER, reply)
    return _finite(numbers[0]) if len(numbers) == 1 else None


def parse_choice(reply: str) -> str | None:
    """'A' or 'B' from free text: {"winner": "A"}, "Winner: B", "[[A]]", "Answer B is better", or a bare
    letter; None when the reply names neither or is ambiguous."""
    obj = _json_object(reply)
    if obj is not None:
        value = next((obj[k] for k in ("winner", "choice", "better") if k in obj), None)
        choice = value.strip().upper() if isinstance(value, str) else None
        return choice if choice in ("A", "B") else None
    bare = re.sub(r"[^A-Za-z]", "", reply)
    if bare in ("A", "B"):
        return bare
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(reply)
        if match:
            return match.group(1).upper()
    return None


def _render(prompt: Text) -> str:
    """A prompt as text: a string as is, a conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@dataclass
class LLMJudge:
    """The judge; its client holds the key, which `load` reads from the environment, out of repr and logs."""

    config: LLMJudgeConfig
    client: OpenAIClient

    @classmethod
    def load(cls, config: LLMJudgeConfig) -> LLMJudge:
        return cls(config, OpenAIClient.from_config(config.url, config, "judge"))

    @property
    def pairwise(self) -> bool:
        """Whether the judge compares two answers (`compare`) rather than scoring one."""
        return self.config.mode == "pairwise"

    # --- one request -------------------------------------------------------------------------------
    def ask(self, content: str) -> str | None:
        """The reply to one user message after up to `retries` retries, or None (logged without the key)."""
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        try:
            reply = self.client.post("chat/completions", body)
        except RequestFailed as error:
            log.warning("LLM judge: request failed (%s)", error)
            return None
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            log.warning("LLM judge: the reply has no choices[0].message.content")
            return None

    def _ask_all(self, contents: list[str]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            replies = pool.map(self.ask, contents)
            return list(progress(replies, total=len(contents), desc="judging", unit="request", leave=False))

    # --- the judge interface -----------------------------------------------------------------------
    def compare(
        self, prompts: Sequence[Text], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[Score]:
        """Pairwise: 1.0 where the judge prefers answer A, 0.0 where B, None where it failed."""
        contents = [
            fill(self.config.template, {"prompt": _render(p), "answer_a": a, "answer_b": b})
            for p, a, b in zip(prompts, answers_a, answers_b)
        ]
        return [None if c is None else float(c == "A") for c in map(_choice, self._ask_all(contents))]

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        if self.config.mode == "pointwise":
            contents = [
                fill(self.config.template, {"prompt": _render(p), "answer": a})
                for p, a in zip(prompts, answers)
            ]
            return [None if reply is None else parse_score(reply) for reply in self._ask_all(contents)]
        return self._round_robin(prompts, answers)

    def _round_robin(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        """Win share of each answer against the other answers in its run of consecutive equal prompts."""
        matches: list[tuple[int, int]] = []  # (index shown as A, index shown as B)
        start = 0
        for end in range(1, len(answers) + 1):
            if end == len(answers) or prompts[end] != prompts[start]:
                for n, (i, j) in enumerate(combinations(range(start, end), 2)):
                    matches.append((i, j) if n % 2 == 0 else (j, i))
                start = end
        results = self.compare(
            [prompts[a] for a, _ in matches],
            [answers[a] for a, _ in matches],
            [answers[b] for _, b in matches],
        )
        wins, played = [0.0] * len(answers), [0] * len(answers)
        for (a, b), a_won in zip(matches, results):
            if a_won is not None:
                wins[a] += a_won
                wins[b] += 1.0 - a_won
                played[a] += 1
                played[b] += 1
        return [w / p if p else None for w, p in zip(wins, played)]


def _choice(reply: str | None) -> str | None:
    return None if reply is None else parse_choice(reply)
