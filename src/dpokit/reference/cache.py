"""Precompute reference log-probs for a whole dataset once and cache them on disk (SPEC §3.1).

The cache key hashes the reference weights themselves and the exact token ids of every pair, so a change
of model, tokenizer, dataset content, max_length or truncation can never reuse a stale file. The dpokit and
torch versions are part of the key too: a new kernel may round differently, and a reference that differs
from the policy at step 0 by rounding alone shows as a spurious non-zero starting accuracy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dpokit
from dpokit.atomic import publish_file
from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import LogpsFn, PairLogps, compute_logps


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the reference weights: names, dtypes, shapes and bytes; LoRA adapter weights are left out
    because the reference runs with adapters disabled."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()


def cache_key(model: torch.nn.Module, pairs: list[TokenizedPair], method: str) -> str:
    """Key of a reference cache: reference weights, token ids of every pair, how log-probs were computed,
    and the code that computed them."""
    versions = f"dpokit {dpokit.__version__}, torch {torch.__version__}"
    return hashlib.blake2b(
        f"{weights_fingerprint(model)}|{pairs_fingerprint(pairs)}|{method}|{versions}".encode(),
        digest_size=16,
    ).hexdigest()


def cached_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    logps_fn: LogpsFn,
    cache_dir: Path,
    batch_size: int = 8,
    method: str = "padded",
    desc: str = "reference log-probs",
    max_tokens: int | None = None,
) -> tuple[PairLogps, bool]:
    """Reference log-probs of `pairs`, from the cache when the key matches; returns (logps, cache_hit).
    Batches as `compute_logps` makes them (`batch_size` pairs, or up to `max_tokens` tokens)."""
    path = cache_dir / f"{cache_key(model, pairs, method)}.safetensors"
    if path.exists():
        tensors = load_file(path)
        return PairLogps(
            tensors["chosen"], tensors["rejected"], tensors["chosen_lengths"], tensors["rejected_lengths"]
        ), True
    logps = compute_logps(model, pairs, logps_fn, batch_size, desc, max_tokens)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{path.name}.{os.getpid()}")
    save_file(
        {
            "chosen": logps.chosen,
            "rejected": logps.rejected,
            "chosen_lengths": logps.chosen_lengths,
            "rejected_lengths": logps.rejected_lengths,
        },
        str(partial),
    )
    publish_file(partial, path)  # a crash never leaves a truncated cache under the final name
    return logps, False
