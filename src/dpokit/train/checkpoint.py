"""Atomic, pickle-free checkpoints of trainable weights, optimizer state, RNG state and progress.

A checkpoint is written to a `.partial-*` directory, fsynced and renamed into place, then the `latest`
pointer is replaced atomically: at every instant `latest` names a complete checkpoint, the previous one
or the new one (see dpokit.atomic for why each fsync is there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpokit.atomic import publish_dir, write_atomic
from dpokit.errors import DpokitError
from dpokit.train.rng import RngState, rng_file, rng_state


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten AdamW's state into named tensors (safetensors) plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    keep: int,
    rng_states: list[RngState] | None = None,
) -> Path:
    """Write checkpoints/step-N, point `latest` at it, then prune all but the `keep` newest; returns step-N.

    rng_states: every process's generator states (`rng_state()`, gathered), in process order; None: this
    process's alone (a one-process run).

    Order matters: the new checkpoint is complete and durable (fsynced) under its final name before
    `latest` moves, and `latest` moves before anything is deleted, so a kill at any line leaves `latest`
    naming a complete checkpoint. An existing step-N is never rewritten: it was renamed into place only
    once complete, and the same step of the same run holds the same state (the loop saves the last step
    twice when save_every divides it, and a resumed run reaches again steps it had saved).
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    if not final.exists():
        partial = root / f".partial-{final.name}"
        shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier save of this step
        partial.mkdir()
        save_file(trainable_state(model), str(partial / "trainable.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        for rank, (tensors, metadata) in enumerate(rng_states or [rng_state()]):
            save_file(tensors, str(rng_file(partial, rank)), metadata=metadata)
        (partial / "progress.json").write_text(json.dumps({**progress, "step": step, "optimizer": meta}))
        publish_dir(partial, final)
    write_atomic(root / "latest", final.name)
    _prune(root, final, keep)
    return final


def _prune(root: Path, current: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (`current` always stays) and any `.partial-*` a kill left."""
    older = sorted(p for p in root.glob("step-*") if p != current)
    # ignore_errors: `latest` already names a complete checkpoint, so a failed prune must not end the run.
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".partial-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)  # the `latest` pointer's temporary


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "progress.json").exists():
        raise DpokitError(f"{path}: the latest checkpoint is incomplete")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable weights and optimizer state from `path` (whole in every checkpoint of this kind, so
    any number of processes can resume it); returns the saved progress. The RNG state is restored apart
    (`dpokit.train.rng`), as it depends on the number of processes."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise DpokitError(f"{path}: checkpoint does not match the model (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    progress = json.loads((path / "progress.json").read_text())
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), progress["optimizer"])
    return progress
