"""An LLM judge over an OpenAI-compatible chat-completions API, pointwise (a score) or pairwise (A/B).

    judge:                               # in a `dpokit iterate` config
      url: http://127.0.0.1:8080/v1      # llama.cpp server, vLLM, OpenAI, ...
      model: judge-model
      mode: pointwise                    # or pairwise
      api_key_env: OPENAI_API_KEY        # the key's variable name; the key itself is never logged or saved

Requests run in a thread pool of `concurrency`; each has a timeout and is retried with exponential backoff
after a timeout, a connection error, a 429 or a 5xx (never after another 4xx: the request itself is wrong).
A reply that cannot be parsed, or a request that still fails after its retries, is a None score: a judge
failure the loop counts, never a guess.

Pairwise, `score` runs a round robin inside each run of consecutive answers to the same prompt (the loop's
k answers per prompt): every unordered pair is compared once, answer order alternating between pairs to
average out the judge's position bias, and an answer's score is its share of the comparisons it won (in
[0, 1]; None when all of its comparisons failed). A lone answer has nothing to be compared with and scores
None; `compare` is the primitive for comparing two given answers (e.g. the policy's against the reference's).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations

from dpokit.data.rows import Text
from dpokit.errors import DpokitError
from dpokit.online.config import LLMJudgeConfig
from dpokit.online.judges import Score

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


def _fill(template: str, values: dict[str, str]) -> str:
    """Substitute {name} placeholders in one pass, so text inside a prompt or answer is never re-filled."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


class _Retryable(Exception):
    """A failure worth retrying: timeout, connection error, 429 or 5xx."""


@dataclass
class LLMJudge:
    """The judge; `key` is read from the environment by `load` and kept out of repr and logs."""

    config: LLMJudgeConfig
    key: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, config: LLMJudgeConfig) -> LLMJudge:
        key = None
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise DpokitError(
                    f"judge: environment variable {config.api_key_env} (api_key_env) is not set"
                )
        return cls(config, key)

    # --- one request -------------------------------------------------------------------------------
    def _post(self, content: str) -> str:
        """The reply text of one chat completion; raises _Retryable or DpokitError."""
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(
            self.config.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:  # before URLError: it is one
            if error.code == 429 or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}") from None
            raise DpokitError(f"HTTP {error.code}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            raise _Retryable(type(error).__name__) from None
        except ValueError:
            raise DpokitError("reply is not JSON") from None
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise DpokitError("reply has no choices[0].message.content") from None

    def ask(self, content: str) -> str | None:
        """The reply to one user message after up to `retries` retries, or None (logged without the key)."""
        for attempt in range(self.config.retries + 1):
            try:
                return self._post(content)
            except _Retryable as error:
                failure = error
                if attempt < self.config.retries:
                    time.sleep(self.config.backoff_s * 2**attempt)
            except DpokitError as error:
                log.warning("LLM judge: request failed, not retried (%s)", error)
                return None
        log.warning("LLM judge: giving up after %d attempts (%s)", self.config.retries + 1, failure)
        return None

    def _ask_all(self, contents: list[str]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(self.ask, contents))

    # --- the judge interface -----------------------------------------------------------------------
    def compare(
        self, prompts: Sequence[Text], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> list[Score]:
        """Pairwise: 1.0 where the judge prefers answer A, 0.0 where B, None where it failed."""
        contents = [
            _fill(self.config.template, {"prompt": _render(p), "answer_a": a, "answer_b": b})
            for p, a, b in zip(prompts, answers_a, answers_b)
        ]
        return [None if c is None else float(c == "A") for c in map(_choice, self._ask_all(contents))]

    def score(self, prompts: Sequence[Text], answers: Sequence[str]) -> list[Score]:
        if self.config.mode == "pointwise":
            contents = [
                _fill(self.config.template, {"prompt": _render(p), "answer": a})
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
