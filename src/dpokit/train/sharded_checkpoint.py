"""Sharded checkpoints, as atomic as the single-process ones (train/checkpoint.py): under FSDP2 through
torch.distributed.checkpoint (DCP), under DeepSpeed ZeRO-3 through DeepSpeed's own `save_checkpoint`.

Every process writes its shards of the trainable weights and AdamW state, and its RNG state, into the same
`.partial-step-N` directory; once all have finished, rank 0 writes progress.json, fsyncs the tree, renames it
to step-N, moves `latest` and prunes. `latest` therefore always names a checkpoint every process finished.
The run directory must be on a file system all processes see (one machine, or a shared one across nodes).

An FSDP2 checkpoint resumes on any number of processes: DCP reads the shards each process needs for its
own slice (resharding), whatever the number that wrote them. A ZeRO-3 checkpoint resumes on the number that
wrote it (DeepSpeed's own resharding, its "universal" checkpoints, is not wired in). `dpokit export` reads an
FSDP2 checkpoint in one process.
DeepSpeed's files are its own torch.save files; resume reads them with PyTorch's restricted unpickler
(`weights_only`: tensors, containers, numbers and two DeepSpeed classes), never with the full one DeepSpeed
uses, which would run whatever a tampered file names. A ZeRO-3 run's final/ is the gathered model.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dpokit.atomic import publish_dir, write_atomic
from dpokit.errors import DpokitError
from dpokit.train.checkpoint import _prune
from dpokit.train.rng import rng_file, rng_state

ShardIO = Callable[[Path], None]  # writes or reads this process's shards in a checkpoint directory


def is_sharded_checkpoint(path: Path) -> bool:
    """An FSDP2 (DCP) checkpoint."""
    return (path / ".metadata").exists()


def sharded_engine(path: Path) -> str | None:
    """The engine whose shards a checkpoint holds: fsdp2 (DCP), zero3 (DeepSpeed), None (unsharded)."""
    if is_sharded_checkpoint(path):
        return "fsdp2"
    return "zero3" if any(path.glob("zero_pp_rank_*")) else None


def trainable_weights(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a model state dict that AdamW trains (a LoRA run: the adapters only)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value for name, value in state.items() if name in names}


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's shards of the trainable weights and of AdamW's state, keyed by parameter name."""
    weights, optimizer_state = get_state_dict(model, optimizer)
    return {"model": trainable_weights(model, weights), "optimizer": optimizer_state}


def write_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=directory)


def read_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # the frozen weights come from the model files, not here
    )


def write_zero3(engine: torch.nn.Module, directory: Path) -> None:
    """DeepSpeed's ZeRO-3 checkpoint: this process's float32 weight and AdamW partitions (and rank 0's model
    file, whose partitioned weights are placeholders), in `directory` itself (DeepSpeed's tag)."""
    engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)


def read_zero3(engine: torch.nn.Module, directory: Path) -> None:
    """Load a `write_zero3` checkpoint into the engine, every file through `restricted_load`."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = restricted_load  # an instance attribute: DeepSpeed's own load is left as it is
    try:
        # The schedule is dpokit's (stepped to the checkpoint's step by the loop), not DeepSpeed's.
        engine.load_checkpoint(str(directory.parent), tag=directory.name, load_lr_scheduler_states=False)
    finally:
        del checkpoint_engine.load


def restricted_load(path: str, map_location: Any = None) -> Any:
    """torch.load with `weights_only=True`, allowing the two DeepSpeed classes its ZeRO-3 files hold beside
    tensors and plain values: the ZeRO stage enum and the (unused, fp32) loss scaler of its optimizer state.
    DeepSpeed's TorchCheckpointEngine loads with `weights_only=False`, which executes any callable a file
    names."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line for line in str(error).splitlines() if "Unsupported global" in line), str(error))
        raise DpokitError(
            f"{path}: not loaded, it holds more than tensors and plain values ({reason.strip()})"
        ) from None


def save_sharded_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    write_shards: ShardIO,
    progress: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step-N from every process's shards (`write_shards(partial_dir)`: `write_dcp` or
    `write_zero3` with their model bound), point `latest` at it, prune; returns step-N. A collective: every
    process calls it. An existing step-N is never rewritten (see `save_checkpoint`)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    main = accelerator.is_main_process
    if not final.exists():
        partial = root / f".partial-{final.name}"
        if main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier save of this step
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_shards(partial)
        rng, metadata = rng_state()
        save_file(rng, str(rng_file(partial, accelerator.process_index)), metadata=metadata)
        accelerator.wait_for_everyone()  # every shard is written before rank 0 publishes the directory
        if main:
            record = {**progress, "step": step, "num_processes": accelerator.num_processes}
            (partial / "progress.json").write_text(json.dumps(record))
            publish_dir(partial, final)
    if main:
        write_atomic(root / "latest", final.name)
        _prune(root, final, keep)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(path: Path, read_shards: ShardIO) -> dict[str, Any]:
    """Restore this process's shards of weights and AdamW state (`read_shards(path)`: `read_dcp` or
    `read_zero3`); returns the progress. DCP reads any process count's shards into this run's sharding."""
    read_shards(path)
    return json.loads((path / "progress.json").read_text())


def load_sharded_weights(path: Path, model: torch.nn.Module) -> None:
    """Read the trainable weights of a sharded checkpoint into an ordinary (unsharded) model, in one process
    with no process group: DCP assembles the shards of every process (for `dpokit export`)."""
    weights = trainable_weights(model, model.state_dict())
    if not weights:
        raise DpokitError(f"{path}: the model has no trainable weights to read")
    dcp.load({"model": weights}, checkpoint_id=path)
    model.load_state_dict(weights, strict=False)
