"""Checkpoint RNG files: each process's own, and those written before per-process files still resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dpokit.errors import DpokitError
from dpokit.train.rng import LEGACY_RNG_FILE, reseed, restore_checkpoint_rng, rng_file, rng_state, written_by


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


def test_written_by_counts_the_processes_files(tmp_path) -> None:
    """One file per process that wrote the checkpoint; an old single rng.safetensors tells no count."""
    tensors, metadata = rng_state()
    (tmp_path / "new").mkdir()
    for rank in range(3):
        save_file(tensors, str(rng_file(tmp_path / "new", rank)), metadata=metadata)
    (tmp_path / "old").mkdir()
    save_file({"torch": torch.get_rng_state()}, str(tmp_path / "old" / LEGACY_RNG_FILE))
    assert written_by(tmp_path / "new") == 3
    assert written_by(tmp_path / "old") is None


def test_reseed_depends_on_seed_step_and_process_alone() -> None:
    """A resharded resume seeds each process from (seed, step, rank): the same triple draws the same numbers
    from torch, Python and NumPy whatever state came before, and another step or process draws others."""

    def draws(seed: int, step: int, rank: int) -> tuple[list[float], float, float]:
        torch.manual_seed(999)  # whatever came before is overwritten
        reseed(seed, step, rank)
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    assert draws(0, 2, 1) == draws(0, 2, 1)
    assert draws(0, 2, 1) != draws(0, 2, 0)
    assert draws(0, 2, 1) != draws(0, 3, 1)
    assert draws(0, 2, 1) != draws(1, 2, 1)
