"""The device-side weights fingerprint of the reference cache key, worked by hand."""

from __future__ import annotations

import torch

from dpokit.reference.cache import FINGERPRINT_WEIGHTS, tensor_fingerprint


def wrap64(value: int) -> int:
    """Python int -> the int64 that two's-complement arithmetic modulo 2^64 leaves."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def test_fingerprint_is_the_position_weighted_sum_of_32_bit_words():
    """int32 words [1, 2]: each slot is 1 * (0 * m + o) + 2 * (1 * m + o) = 3 o + 2 m, modulo 2^64."""
    got = tensor_fingerprint(torch.tensor([1, 2], dtype=torch.int32)).tolist()
    assert got == [wrap64(3 * o + 2 * m) for m, o in FINGERPRINT_WEIGHTS]


def test_any_changed_byte_changes_it_and_odd_byte_counts_are_padded():
    weights = torch.linspace(-1, 1, 1001)
    before = tensor_fingerprint(weights)
    weights[500] = torch.nextafter(weights[500], torch.tensor(2.0))  # one ulp
    assert not torch.equal(tensor_fingerprint(weights), before)
    odd = torch.tensor([1, 2, 3], dtype=torch.bfloat16)  # 6 bytes: one zero-padded word at the end
    words = torch.cat([odd.view(torch.uint8), torch.zeros(2, dtype=torch.uint8)]).view(torch.int32).tolist()
    expected = [wrap64(sum(w * (i * m + o) for i, w in enumerate(words))) for m, o in FINGERPRINT_WEIGHTS]
    assert tensor_fingerprint(odd).tolist() == expected


def test_positions_matter_swapping_two_words_changes_it():
    assert not torch.equal(
        tensor_fingerprint(torch.tensor([5, 9], dtype=torch.int32)),
        tensor_fingerprint(torch.tensor([9, 5], dtype=torch.int32)),
    )
