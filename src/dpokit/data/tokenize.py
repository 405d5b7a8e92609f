"""Tokenize preference rows exactly as TRL 1.16's DPOTrainer does, so migrating users get the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dpokit.data.rows import PreferenceRow, Text


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair after truncation: the sequences are prompt+chosen and prompt+rejected."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    line: int  # where the row came from, for error messages and audits

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens of both sequences, counted as a padded batch would process them."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizedDataset:
    pairs: list[TokenizedPair]
    dropped_long_prompts: int  # rows whose prompt alone reaches max_length (TRL drops them too)
    truncated: int  # rows with at least one answer cut at max_length


def _encode(tokenizer: PreTrainedTokenizerBase, text: Text, add_generation_prompt: bool = False) -> list[int]:
    if isinstance(text, list):
        encoded = tokenizer.apply_chat_template(
            text, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
        return list(encoded["input_ids"])
    return list(tokenizer(text=text)["input_ids"])


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


def tokenize_row(
    tokenizer: PreTrainedTokenizerBase, row: PreferenceRow
) -> tuple[list[int], list[int], list[int]]:
    """Return untruncated (prompt_ids, chosen_ids, rejected_ids) for one row.

    Standard rows get the EOS token appended to each answer when missing; conversational rows are rendered
    with the chat template (the prompt with the generation prompt). The answer ids are what follows the
    common prefix of the prompt's ids and the full sequence's ids: tokens may merge across the boundary.
    """
    prompt, chosen, rejected = row.prompt, row.chosen, row.rejected
    if isinstance(chosen, list):
        prompt_ids = _encode(tokenizer, prompt, add_generation_prompt=True)
        full_chosen = _encode(tokenizer, prompt + chosen)
        full_rejected = _encode(tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _encode(tokenizer, prompt)
        full_chosen = _encode(tokenizer, prompt + chosen)
        full_rejected = _encode(tokenizer, prompt + rejected)
    prompt_length = min(
        _common_prefix_length(prompt_ids, full_chosen), _common_prefix_length(prompt_ids, full_rejected)
    )
    return prompt_ids[:prompt_length], full_chosen[prompt_length:], full_rejected[prompt_length:]


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[PreferenceRow], max_length: int | None
) -> TokenizedDataset:
    """Tokenize every row and truncate prompt+answer to its first max_length tokens.

    Rows whose prompt alone has max_length tokens or more are dropped and counted, as TRL does with its
    default ``truncation_mode="keep_start"``: no answer token would be left to learn from.
    """
    pairs: list[TokenizedPair] = []
    dropped = truncated = 0
    for row in rows:
        prompt_ids, chosen_ids, rejected_ids = tokenize_row(tokenizer, row)
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                dropped += 1
                continue
            budget = max_length - len(prompt_ids)
            truncated += len(chosen_ids) > budget or len(rejected_ids) > budget
            chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        pairs.append(TokenizedPair(prompt_ids, chosen_ids, rejected_ids, row.line))
    return TokenizedDataset(pairs, dropped, truncated)
