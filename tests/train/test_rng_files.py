"""Checkpoint RNG files: each process's own, and those written before per-process files still resume."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from dpokit.errors import DpokitError
from dpokit.train.rng import LEGACY_RNG_FILE, restore_checkpoint_rng, rng_file, rng_state


def test_each_process_restores_its_own_file(tmp_path) -> None:
    """Rank 1 restores rank 1's torch and Python states, not rank 0's."""
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        tensors, metadata = rng_state()
        save_file(tensors, str(rng_file(tmp_path, rank)), metadata=metadata)
    torch.manual_seed(101)
    random.seed(101)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    restore_checkpoint_rng(tmp_path, 1)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_a_checkpoint_from_before_per_process_files_restores_torch_state(tmp_path) -> None:
    """The old single `rng.safetensors` held torch's state only: it is restored, Python's is left alone."""
    torch.manual_seed(7)
    save_file({"torch": torch.get_rng_state()}, str(tmp_path / LEGACY_RNG_FILE))
    expected = torch.rand(3)
    random.seed(5)
    python_next = random.random()
    random.seed(5)
    torch.manual_seed(0)
    restore_checkpoint_rng(tmp_path, 0)
    assert torch.equal(torch.rand(3), expected)
    assert random.random() == python_next


def test_no_state_for_this_process_is_one_line(tmp_path) -> None:
    tensors, metadata = rng_state()
    save_file(tensors, str(rng_file(tmp_path, 0)), metadata=metadata)
    with pytest.raises(DpokitError, match="no random-generator state for process 1; resume with as many"):
        restore_checkpoint_rng(tmp_path, 1)
