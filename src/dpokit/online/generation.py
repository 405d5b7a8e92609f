"""Answers from the current policy: k samples per prompt, batched, behind a small backend interface.

`TransformersBackend` runs transformers `generate` (KV cache, left padding) on CPU or GPU; the same interface
is implemented by vllm_backend.py (vLLM on a GPU) and openai_backend.py (an OpenAI-compatible completions
server), and backends.py picks one by the config's `backend`. Every backend feeds the model the prompt tokens
training uses (`prompt_ids`), so the answers are sampled from exactly the distribution DPO then trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.generation import utils as generation_utils

from dpokit.data.rows import Text
from dpokit.data.tokenize import _encode
from dpokit.distributed import progress

# The KV-cache argument of forward and generate: `cache` in recent transformers (`past_key_values` there warns
# that it is deprecated), `past_key_values` in older ones.
CACHE_KWARG = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn. temperature None: greedy decoding (top_p unused)."""

    max_new_tokens: int
    temperature: float | None = 1.0
    top_p: float = 1.0


@dataclass
class Answer:
    text: str  # decoded without special tokens
    num_tokens: int  # generated tokens, the end-of-sequence token included


class GenerationBackend(Protocol):
    def generate(self, prompts: Sequence[Text], k: int, sampling: Sampling, seed: int) -> list[list[Answer]]:
        """k answers for each prompt, in prompt order; the same seed gives the same answers."""
        ...


def training_prompt(prompt: Text, tokenizer: PreTrainedTokenizerBase) -> Text:
    """The prompt as the pair rows will hold it: a string becomes a user message when the tokenizer has a chat
    template, so the policy is sampled, and trained, on exactly the same prompt tokens (SPEC §7)."""
    if isinstance(prompt, str) and tokenizer.chat_template:
        return [{"role": "user", "content": prompt}]
    return prompt


def prompt_ids(prompt: Text, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Prompt token ids exactly as training computes them (chat template with the generation prompt)."""
    return _encode(tokenizer, training_prompt(prompt, tokenizer), add_generation_prompt=True)


class InverseCdfSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores / temperature), restricted to the top-p nucleus, and
    leaves only that token's score finite, so that generate's greedy pick returns it.

    One uniform number per row, located in the cumulative distribution: transformers' `do_sample` calls
    torch.multinomial, which draws an exponential variate for every vocabulary entry of every row, 21% of
    generation's wall time (py-spy, SmolLM2-135M, 192 rows x 49k tokens per step on CPU), against 1% here.
    The nucleus is the most likely tokens whose probabilities reach top_p together (the most likely one is
    always kept), as in transformers' top-p warper.
    """

    def __init__(self, temperature: float, top_p: float = 1.0) -> None:
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:
            ranked, order = probs.sort(dim=-1, descending=True)
            outside = ranked.cumsum(-1) - ranked >= self.top_p  # the mass before it already reaches top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, ranked.masked_fill(outside, 0.0))
        cdf = probs.cumsum(-1)  # (B, V)
        draws = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # (B, 1), scaled to the mass
        # the first token whose cumulative mass exceeds the draw; zero-probability tokens are never it
        tokens = torch.searchsorted(cdf, draws, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


@dataclass
class TransformersBackend:
    """transformers `generate` over left-padded batches of `batch_size` prompts (k sequences each)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Text], k: int, sampling: Sampling, seed: int) -> list[list[Answer]]:
        torch.manual_seed(seed)
        self.model.eval()
        answers: list[list[Answer]] = []
        for start in progress(
            range(0, len(prompts), self.batch_size), desc="generating", unit="batch", leave=False
        ):
            answers += self._batch(prompts[start : start + self.batch_size], k, sampling)
        return answers

    def _batch(self, prompts: Sequence[Text], k: int, sampling: Sampling) -> list[list[Answer]]:
        pad_id = self.tokenizer.pad_token_id
        stops = {self.tokenizer.eos_token_id, pad_id}
        encoded = [prompt_ids(prompt, self.tokenizer) for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        device = self.model.device
        # Left padding: every prompt ends at the same column, so new tokens are appended right after it.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in encoded], device=device)  # (B, P)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in encoded], device=device)  # (B, P)
        # Sampling is done by InverseCdfSampler, after which generate's greedy pick takes the drawn token.
        sampler = [InverseCdfSampler(sampling.temperature, sampling.top_p)] if sampling.temperature else []
        # Prefill each prompt once and copy its KV cache k times: `num_return_sequences=k` would repeat the
        # prompts first and prefill all B * k rows, which with a chat template's system prompt was ~40% of
        # generation's CPU time (py-spy, SmolLM2-135M, k=4). All but the last prompt token go in the cache;
        # generate computes the last one. Positions skip the left padding, as generate's own would.
        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,  # only the cache is wanted, not (B, P, vocab) logits
            **{CACHE_KWARG: cache},
        )
        cache.batch_repeat_interleave(k)
        output = self.model.generate(
            input_ids=ids.repeat_interleave(k, dim=0),
            attention_mask=mask.repeat_interleave(k, dim=0),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList(sampler),
            pad_token_id=pad_id,
            **{CACHE_KWARG: cache},
        )  # (B * k, P + new), the k sequences of a prompt next to each other
        rows = output[:, width:].tolist()
        answers = []
        for row in rows:
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            answers.append(Answer(text, end))
        return [answers[i * k : (i + 1) * k] for i in range(len(prompts))]
