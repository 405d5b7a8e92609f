"""Group pairs into forward passes, and turn them into padded model inputs (chosen sequences first, then
rejected, as TRL lays them out)."""

from __future__ import annotations

import torch

from dpokit.data.tokenize import TokenizedPair


def pad_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    Returns input_ids, attention_mask and completion_mask, each (2B, T); completion_mask marks answer tokens.
    """
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    answers = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (sequence, answer) in enumerate(zip(sequences, answers)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
        completion_mask[i, len(sequence) - answer : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def token_batches(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of the indices of `sizes`, each as many items as fit in `max_tokens` (at least one).

    A forward pass carries a token budget rather than a fixed number of pairs, so short pairs fill it as well
    as long ones; the order is kept, so the gradient of a step is the same sum over the same pairs.
    """
    groups: list[list[int]] = []
    filled = max_tokens  # forces a new group for the first item
    for index, size in enumerate(sizes):
        if filled + size > max_tokens:
            groups.append([])
            filled = 0
        groups[-1].append(index)
        filled += size
    return groups
