"""Generated answers and their health signals: n-gram repetition and perplexity under the reference.

The trainer calls ``generate_samples`` for the policy (at eval steps) and once for the reference,
and appends the records to RUN_DIR/samples.jsonl; the gibberish and verbosity rules read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.logprobs import token_logps

# 3-grams: a repeated word pair is common in fluent text, a repeated 3-token run rarely is, and a
# degenerate loop repeats every one of them.
REPETITION_N = 3


def repetition(token_ids: Sequence[int], n: int = REPETITION_N) -> float:
    """Share of the answer's n-grams that repeat an earlier one: 0.0 for fresh text, near 1.0 for a loop.

    An answer shorter than ``n`` tokens has no n-grams and scores 0.0.
    """
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# no_grad, not inference_mode: DeepSpeed ZeRO-3 gathers and re-partitions weights inside the call, and a weight
# whose data was made under inference_mode can never be trained again (peft's requires_grad_ fails on it).
@torch.no_grad()
def reference_perplexity(
    model: PreTrainedModel, prompt_ids: Sequence[int], answer_ids: Sequence[int]
) -> float:
    """exp(mean negative log-likelihood of the answer tokens given the prompt) under ``model``.

    ``prompt_ids`` must be non-empty: its last token predicts the first answer token. An empty
    answer has no tokens to average and gives NaN.
    """
    ids = torch.tensor([[*prompt_ids, *answer_ids]], device=model.device)  # (1, P + A)
    logits = model(input_ids=ids).logits[:, len(prompt_ids) - 1 : -1]  # (1, A, V): position t predicts t + 1
    logps = token_logps(logits, ids[:, len(prompt_ids) :])  # (1, A)
    return math.exp(-logps.mean().item())


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids as in training: the chat template with its generation prompt when the tokenizer has one."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds the special tokens (BOS and role markers).
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    step: int,
    source: Literal["policy", "reference"],
    reference_model: PreTrainedModel | None = None,
) -> list[dict[str, Any]]:
    """Generate one answer per prompt and return samples.jsonl records.

    ``ref_ppl`` is scored by the model itself for ``source="reference"``, and for the policy by
    ``reference_model`` (null when None). A PEFT policy passes itself as ``reference_model``: its
    answers are then scored with the adapters disabled, the reference without a second copy of
    the weights. Greedy, so policy and reference answers differ only by training.
    ``num_tokens`` counts the generated tokens, the end-of-sequence token included.
    """
    answers = []
    was_training = model.training
    model.eval()  # dropout off while generating; the training mode is restored below
    try:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        # One left-padded batch: every prompt ends at the same column, so generation appends after it.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in encoded], device=model.device)  # (B, P)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in encoded], device=model.device)
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id,
        )  # fmt: skip
        for prompt, prompt_ids, row in zip(prompts, encoded, output[:, width:].tolist()):
            # Stop at the first end-of-sequence token (kept, as a single generation would end there).
            ends = [i for i, token in enumerate(row) if token in (tokenizer.eos_token_id, pad_id)]
            answers.append((prompt, prompt_ids, row[: ends[0] + 1] if ends else row))
        scorer = model if source == "reference" else reference_model
        # Scoring after all generation, so disabling a PEFT policy's adapters cannot touch its answers.
        scope = scorer.disable_adapter() if scorer is model and source == "policy" else nullcontext()
        with scope:
            return [
                {
                    "step": step,
                    "source": source,
                    "prompt": prompt,
                    "text": tokenizer.decode(answer_ids, skip_special_tokens=True),
                    "num_tokens": len(answer_ids),
                    "repetition": repetition(answer_ids),
                    "ref_ppl": reference_perplexity(scorer, prompt_ids, answer_ids)
                    if scorer is not None and answer_ids
                    else None,
                }
                for prompt, prompt_ids, answer_ids in answers
            ]
    finally:
        model.train(was_training)
