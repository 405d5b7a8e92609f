"""Atomic, pickle-free checkpoints of trainable weights, optimizer state, RNG state and progress.

A checkpoint is written to a temporary directory and renamed into place, then the `latest` pointer is
replaced atomically: a kill at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import DpokitError


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


def _rng_tensors() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically and point `latest` at it; prune all but the `keep` newest."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    partial = root / f".partial-step-{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(trainable_state(model), str(partial / "trainable.safetensors"))
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(partial / "optimizer.safetensors"))
    save_file(_rng_tensors(), str(partial / "rng.safetensors"))
    progress = {**progress, "step": step, "optimizer": meta}
    (partial / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    older = sorted(p for p in root.glob("step-*") if p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "progress.json").exists():
        raise DpokitError(f"{path}: the latest checkpoint is incomplete")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG state from `path`; returns the saved progress."""
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
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return progress
