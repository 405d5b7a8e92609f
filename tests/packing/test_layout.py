"""Packed row layout: tokens, positions, who attends to whom, and which hidden state scores which token."""

from __future__ import annotations

import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.packing.layout import layout_pairs

PAIR = TokenizedPair(prompt_ids=[10, 11, 12], chosen_ids=[20, 21, 22], rejected_ids=[30, 31, 32, 33], line=1)


def test_shared_prompt_layout_matches_the_module_docstring() -> None:
    batch = layout_pairs([PAIR], pad_token_id=0, share_prompt=True, token_budget=None)
    # The last answer token of each sequence predicts nothing scored, so it is not in the input.
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch.branch_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    # Both answers' first tokens are predicted by the prompt's last token (index 2).
    assert batch.sources.tolist() == [2, 3, 4, 2, 5, 6, 7]
    assert batch.targets.tolist() == [20, 21, 22, 30, 31, 32, 33]
    assert batch.owners.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_shared_prompt_mask_answers_see_the_prompt_not_each_other() -> None:
    mask = layout_pairs([PAIR], 0, share_prompt=True, token_budget=None).attention_mask(torch.bool)[0, 0]
    rejected_first = 5
    assert mask[rejected_first].tolist() == [True, True, True, False, False, True, False, False]
    assert mask[4].tolist() == [True, True, True, True, True, False, False, False]


def test_packed_rows_block_diagonal_and_positions_restart() -> None:
    other = TokenizedPair([40], [50, 51], [60], line=2)
    batch = layout_pairs([PAIR, other], 0, share_prompt=False, token_budget=100)
    assert batch.input_ids.shape[0] == 1
    row = batch.input_ids[0].tolist()
    # Longest segment first: prompt+rejected of PAIR (6 tokens), prompt+chosen (5), then the short pair's.
    assert row == [10, 11, 12, 30, 31, 32, 10, 11, 12, 20, 21, 40, 50, 40]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 0]
    mask = batch.attention_mask(torch.float32)[0, 0]
    segments = batch.segment_ids[0]
    blocked = segments[:, None] != segments[None, :]
    assert (mask[blocked] == torch.finfo(torch.float32).min).all()
    assert batch.owners.tolist() == [2, 2, 2, 2, 0, 0, 0, 1, 1, 3]  # pair i: chosen i, rejected B+i


def test_padding_sees_only_itself() -> None:
    short = TokenizedPair([1], [2], [3], line=3)
    batch = layout_pairs([PAIR, short], 0, share_prompt=True, token_budget=None)
    assert batch.segment_ids[1].tolist() == [1] + [-1] * 7
    mask = batch.attention_mask(torch.bool)[1, 0]
    assert mask[1:, 1:].equal(torch.eye(7, dtype=torch.bool))


def test_empty_prompt_first_answer_token_has_no_logprob() -> None:
    """As in a padded batch, position 0 of a sequence is never a target."""
    batch = layout_pairs(
        [TokenizedPair([], [5, 6], [7, 8, 9], line=4)], 0, share_prompt=True, token_budget=None
    )
    assert batch.targets.tolist() == [6, 8, 9]
    assert batch.owners.tolist() == [0, 1, 1]
