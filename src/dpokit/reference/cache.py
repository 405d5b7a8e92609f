"""Precompute reference log-probs for a whole dataset once and cache them on disk (SPEC §3.1).

The cache key hashes the reference weights themselves and the exact token ids of every pair, so a change
of model, tokenizer, dataset content, max_length or truncation can never reuse a stale file. The dpokit and
torch versions are part of the key too: a new kernel may round differently, and a reference that differs
from the policy at step 0 by rounding alone shows as a spurious non-zero starting accuracy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

import dpokit
from dpokit.atomic import publish_file
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import is_sharded
from dpokit.logprobs import LogpsFn, PairLogps, compute_logps, length_batches, without_grad

# Two (multiplier, offset) pairs: each tensor is summarised by two sums of its 32-bit words weighted by
# (multiplier * position + offset), in int64 arithmetic that wraps modulo 2^64 — 128 bits in all.
FINGERPRINT_WEIGHTS = ((0x1E3779B97F4A7C15, 0x632BE59BD9B4E019), (0x3C6EF372FE94F82B, 0x1B873593CC9E2D51))
FINGERPRINT_CHUNK = 1 << 24  # words per chunk: bounds the int64 temporaries to a few hundred MB


def tensor_fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """(2,) int64 position-weighted sums of a tensor's bytes read as 32-bit words, computed on the tensor's
    own device: a change of any byte changes them, and nothing is copied to the host."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.numel() % 4:
        data = torch.cat([data, data.new_zeros(4 - data.numel() % 4)])
    words = data.view(torch.int32)
    sums = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, words.numel(), FINGERPRINT_CHUNK):
        chunk = words[start : start + FINGERPRINT_CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=data.device)
        for slot, (multiplier, offset) in enumerate(FINGERPRINT_WEIGHTS):
            sums[slot] += (chunk * (position * multiplier + offset)).sum()
    return sums


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the reference weights: names, dtypes, shapes and every tensor's bytes; LoRA adapter weights are
    left out because the reference runs with adapters disabled.

    CPU tensors are hashed in place (blake2b over a zero-copy view: fastest there); tensors on an
    accelerator are fingerprinted where they live and read back once, since copying a 1B model to the host
    to hash it took seconds. The device kind is part of the key: the log-probs round differently there too.
    """
    # A sharded model (FSDP2) is hashed whole, one gathered tensor at a time (a collective: every process
    # calls this), so that its key is the unsharded model's.
    named = [(name, whole(t)) for name, t in sorted(model.state_dict().items()) if "lora_" not in name]
    on_device = [tensor_fingerprint(t) for _, t in named if t.device.type != "cpu"]
    device_values = iter(
        torch.stack([v.to(on_device[0].device) for v in on_device]).tolist() if on_device else []
    )
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.device.type}".encode())
        if tensor.device.type != "cpu":
            digest.update(str(next(device_values)).encode())
        elif tensor.numel():
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 shard (gathered from every process), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """Hash of dpokit's own source files: the version string stays 0.1.0 across commits that change the
    kernels (segment attention, chunked log-probs), and a cache written by other code must miss, not be
    read back as if this code had computed it."""
    digest = hashlib.blake2b(digest_size=16)
    root = Path(dpokit.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# How far a recomputed batch may differ from its cached log-probs, (absolute nats, relative to |log-prob|).
# The check recomputes the same batch the cache computed, so the same code on the same machine agrees to
# the bit; the margins cover another CPU's or GPU's rounding. Autocast rounds each matmul to 8 bits of
# mantissa, hence its wider margin.
FP32_TOLERANCE = (1e-3, 2e-6)
AUTOCAST_TOLERANCE = (5e-2, 1e-3)


def spot_check_error(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    logps_fn: LogpsFn,
    batch: list[int],
    cached: PairLogps,
    tolerance: tuple[float, float],
) -> float | None:
    """None when the log-probs of `pairs[batch]` recomputed now agree with `cached` within `tolerance`,
    else the largest absolute difference in nats."""
    with without_grad(model):
        fresh = logps_fn(model, [pairs[i] for i in batch])
    atol, rtol = tolerance
    worst = 0.0
    agree = True
    for side in ("chosen", "rejected"):
        want = getattr(cached, side)[batch]
        got = getattr(fresh, side).float().cpu()
        difference = (got - want).abs()
        agree &= bool((difference <= atol + rtol * want.abs()).all())
        worst = max(worst, difference.max().item())
    return None if agree else worst


def cache_key(model: torch.nn.Module, pairs: list[TokenizedPair], method: str) -> str:
    """Key of a reference cache: reference weights, token ids of every pair, how log-probs were computed,
    and the code that computed them (dpokit's sources, torch's version)."""
    versions = f"dpokit {dpokit.__version__} {code_fingerprint()}, torch {torch.__version__}"
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
    tolerance: tuple[float, float] = FP32_TOLERANCE,
    accelerator: Accelerator | None = None,
) -> tuple[PairLogps, bool]:
    """Reference log-probs of `pairs`, from the cache when the key matches; returns (logps, cache_hit).
    Batches as `compute_logps` makes them (`batch_size` pairs, or up to `max_tokens` tokens).

    A hit is trusted only after its first batch is recomputed and agrees within `tolerance` (absolute nats,
    relative): a stale entry would make the policy differ from its reference before any step (a first loss
    off ln 2 and every loss after it shifted), so it is recomputed instead, with a warning. The check
    costs one batch of the pass it saves.

    accelerator: with several processes, the main process alone reads (and checks) the cache; on a miss each
    process computes every num_processes-th batch (`_shared_reference_logps`) and the main process writes it.
    A sharded model (FSDP2) computes nothing alone: every process runs each forward pass of the check, and
    as many of the pass (`compute_logps`'s lockstep).
    """
    path = cache_dir / f"{cache_key(model, pairs, method)}.safetensors"
    shared = accelerator is not None and accelerator.num_processes > 1
    main = not shared or accelerator.is_main_process
    together = accelerator if shared and is_sharded(model) else None
    cached = None
    if main or together is not None:
        cached = _trusted_cache(path, model, pairs, logps_fn, batch_size, max_tokens, tolerance, together)
    if shared:
        logps, hit = _shared_reference_logps(
            model, pairs, logps_fn, cached, batch_size, desc, max_tokens, accelerator
        )
    elif cached is not None:
        return cached, True
    else:
        logps, hit = compute_logps(model, pairs, logps_fn, batch_size, desc, max_tokens), False
    if main and not hit:
        _write_cache(path, logps)
    return logps, hit


def _trusted_cache(
    path: Path,
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    logps_fn: LogpsFn,
    batch_size: int,
    max_tokens: int | None,
    tolerance: tuple[float, float],
    together: Accelerator | None = None,
) -> PairLogps | None:
    """The cached log-probs at `path` when they exist and their first batch recomputes within `tolerance`.

    together: the processes of a sharded model, which all call this: the main process reads and checks the
    cache, and the others run the check's forward pass beside it (its result dropped), since each pass
    gathers every process's shards. None: this process alone.
    """
    main = together is None or together.is_main_process
    found = main and path.exists()
    if together is not None:
        found = bool(together.reduce(torch.tensor([float(found)], device=together.device)).item())
    if not found:
        return None
    first = length_batches(pairs, batch_size, max_tokens)[0]
    if not main:
        with without_grad(model):
            logps_fn(model, [pairs[i] for i in first])
        return None
    tensors = load_file(path)
    cached = PairLogps(
        tensors["chosen"], tensors["rejected"], tensors["chosen_lengths"], tensors["rejected_lengths"]
    )
    error = spot_check_error(model, pairs, logps_fn, first, cached, tolerance)
    if error is None:
        return cached
    warnings.warn(
        f"{path}: the cached reference log-probs differ from this reference model's by up to {error:.3g} "
        f"nats on {len(first)} pairs recomputed as a check (a cache written by other code or weights under "
        "the same key); recomputing it",
        UserWarning,
        stacklevel=3,
    )
    return None


def _shared_reference_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    logps_fn: LogpsFn,
    cached: PairLogps | None,
    batch_size: int,
    desc: str,
    max_tokens: int | None,
    accelerator: Accelerator,
) -> tuple[PairLogps, bool]:
    """The reference pass split over processes, each batch computed by exactly one of them (the batches one
    process would make, so each pair's log-probs are the ones it would compute); returns the whole table on
    every process and whether the main process's cache (`cached`) served it.

    Each process fills its columns of a zero (4, N) table and the tables are summed across processes: every
    column has a single non-zero contributor, so the sum is exact.
    """
    hit = bool(accelerator.reduce(torch.tensor([float(cached is not None)], device=accelerator.device)))
    table = torch.zeros(4, len(pairs))
    if cached is not None:
        table = torch.stack(list(vars(cached).values()))
    elif not hit:
        share = (accelerator.process_index, accelerator.num_processes, is_sharded(model))
        part = compute_logps(model, pairs, logps_fn, batch_size, desc, max_tokens, share)
        table = torch.stack(list(vars(part).values()))
    table = accelerator.reduce(table.to(accelerator.device), "sum").cpu()  # (4, N), the same on every process
    return PairLogps(*(row.clone() for row in table)), hit


def _write_cache(path: Path, logps: PairLogps) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
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
