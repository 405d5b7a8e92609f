"""Run by test_rng_ranks.py under torchrun: each process seeds its generators differently, a checkpoint is
saved as the training loop saves one (every process's RNG state gathered, written by the main process),
each process draws on, then reseeds, restores the checkpoint and draws again; writes OUT/rank-R.json.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/rng_worker.py OUT
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from launching import exit_worker

from dpokit.distributed import make_accelerator
from dpokit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpokit.train.rng import restore_checkpoint_rng, rng_state


def draws() -> dict[str, list[float]]:
    """What dropout, sampling and shuffling would draw next from each generator."""
    return {
        "torch": torch.rand(4).tolist(),
        "python": [random.random() for _ in range(4)],
        "numpy": np.random.rand(4).tolist(),
    }


def main(out: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    random.seed(10 + rank)
    np.random.seed(20 + rank)
    torch.manual_seed(30 + rank)
    draws()  # each process advances its generators before the save, as training would
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    states = gather_object([rng_state()])  # as dpokit.train.loop.save gathers them
    if accelerator.is_main_process:
        save_checkpoint(Path(out), 1, model, optimizer, {}, keep=1, rng_states=states)
    accelerator.wait_for_everyone()
    uninterrupted = draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # a fresh process: every rank seeded alike, as a resumed run starts
    checkpoint = latest_checkpoint(Path(out))
    load_checkpoint(checkpoint, model, optimizer)
    restore_checkpoint_rng(checkpoint, rank)
    resumed = draws()
    Path(out, f"rank-{rank}.json").write_text(
        json.dumps({"uninterrupted": uninterrupted, "resumed": resumed})
    )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_worker()
