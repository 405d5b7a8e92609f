"""Generation by an OpenAI-compatible completions server (`backend: openai`).

    backend: openai
    openai:
      server_command: "vllm serve {policy} --port {port}"   # started per stage with the round's policy
      # url: http://127.0.0.1:8000/v1 and model: NAME instead, for a server you run yourself

Every answer is one request to URL/completions (n=1, k requests per prompt, each with its own seed drawn
from the stage's seed), so `usage.completion_tokens` is that answer's length; requests run in a thread pool
of `concurrency`. The prompt is sent as the token ids training uses (`prompt_ids`), or with
`prompt_format: text` as those ids decoded back to text (the chat template rendered locally). A request
that fails after its retries stops the stage with a one-line error: a missing answer would bias the pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpokit.data.rows import Text
from dpokit.distributed import progress
from dpokit.errors import DpokitError
from dpokit.online.config import OpenAIBackendConfig
from dpokit.online.generation import Answer, Sampling, prompt_ids
from dpokit.online.openai_http import OpenAIClient


@dataclass
class OpenAIBackend:
    client: OpenAIClient
    model: str  # the `model` field of each request
    tokenizer: PreTrainedTokenizerBase
    config: OpenAIBackendConfig

    def _prompt(self, prompt: Text) -> list[int] | str:
        ids = prompt_ids(prompt, self.tokenizer)
        return ids if self.config.prompt_format == "tokens" else self.tokenizer.decode(ids)

    def _body(self, prompt: list[int] | str, sampling: Sampling, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.config.extra_body,
            "model": self.model,
            "prompt": prompt,
            "max_tokens": sampling.max_new_tokens,
            "n": 1,
        }
        if sampling.temperature is None:  # greedy
            body["temperature"] = 0.0
        else:
            body.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
        return body

    def _answer(self, body: dict[str, Any]) -> Answer:
        reply = self.client.post("completions", body)
        try:
            return Answer(str(reply["choices"][0]["text"]), int(reply["usage"]["completion_tokens"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise DpokitError(
                f"{self.client.url}/completions: the reply has no choices[0].text and usage.completion_tokens"
            ) from None

    def generate(self, prompts: Sequence[Text], k: int, sampling: Sampling, seed: int) -> list[list[Answer]]:
        seeds = random.Random(seed)
        bodies = [
            self._body(rendered, sampling, seeds.randrange(2**31))
            for rendered in map(self._prompt, prompts)
            for _ in range(k)
        ]  # the k requests of a prompt next to each other
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency)
        try:
            answers = list(
                progress(pool.map(self._answer, bodies), total=len(bodies), desc="generating", leave=False)
            )
        finally:  # after a failed request, the queued ones are dropped rather than sent to a failing server
            pool.shutdown(cancel_futures=True)
        return [answers[i * k : (i + 1) * k] for i in range(len(prompts))]
