"""Every process's random number generators in a checkpoint, so that a resumed run draws on each process
what the uninterrupted run would have drawn there (LoRA and attention dropout, sampling).

Each process's state goes to its own `rng-rank<N>.safetensors`: torch's CPU generator, each CUDA device's,
and Python's and NumPy's global generators (tensors, with the few scalars in the file's metadata).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, safe_open

from dpokit.errors import DpokitError

LEGACY_RNG_FILE = "rng.safetensors"  # single-process and DDP checkpoints before per-process files

RngState = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, and scalars as string metadata


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng-rank{rank}.safetensors"


def rng_state() -> RngState:
    """This process's generator states: tensors, and the scalars that go with them as string metadata
    (`save_file(tensors, rng_file(...), metadata=metadata)`)."""
    version, python_state, gauss = random.getstate()
    kind, numpy_state, position, has_gauss, cached_gauss = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),  # 625 unsigned 32-bit words
        "numpy": torch.from_numpy(numpy_state.astype(np.int64)),  # (624,) unsigned 32-bit words
    }
    if torch.cuda.is_available():
        tensors |= {f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}
    scalars = {"python": [version, gauss], "numpy": [kind, position, has_gauss, cached_gauss]}
    return tensors, {"scalars": json.dumps(scalars)}


def written_by(checkpoint: Path) -> int | None:
    """How many processes wrote `checkpoint` (each saves its own RNG file); None for a checkpoint from before
    per-process files, whose single file every process restores."""
    return len(list(checkpoint.glob("rng-rank*.safetensors"))) or None


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed this process's generators (torch, CUDA, Python, NumPy) from the run's seed, the step it resumes
    at and its index: a run resumed on another number of processes has no saved state that is each process's
    own, so its random draws (dropout) start afresh, reproducibly, instead of repeating step 0's."""
    set_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def restore_checkpoint_rng(checkpoint: Path, rank: int) -> None:
    """Restore process `rank`'s generators from `checkpoint`. A checkpoint written before each process had its
    own file holds one `rng.safetensors` (rank 0's torch and CUDA states): every process restores that, as
    resuming did then."""
    path = rng_file(checkpoint, rank)
    if not path.exists() and (checkpoint / LEGACY_RNG_FILE).exists():
        path = checkpoint / LEGACY_RNG_FILE
    if not path.exists():
        raise DpokitError(
            f"{checkpoint}: no random-generator state for process {rank}; resume with as many processes as "
            "wrote the checkpoint"
        )
    restore_rng(path)


def restore_rng(path: Path) -> None:
    """Restore the generator states saved in `path`; a checkpoint moved to a machine with fewer, more or no
    GPUs restores the devices both machines have and leaves the others as they are. Files from before Python's
    and NumPy's states were saved restore torch's (and CUDA's) alone."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    torch.set_rng_state(tensors["torch"])
    if "scalars" in metadata:
        scalars = json.loads(metadata["scalars"])
        version, gauss = scalars["python"]
        random.setstate((version, tuple(tensors["python"].tolist()), gauss))
        kind, position, has_gauss, cached_gauss = scalars["numpy"]
        np.random.set_state(
            (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gauss)
        )
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda.{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{index}"], index)
