"""The reference pass: reference log-probs before any optimizer step (SPEC §3.1).

precompute: of every train and held-out pair, once, cached on disk, then the separate reference is freed.
With several processes, each pair is computed by one of them and the whole table gathered on all; the
main process alone reads and writes the cache.
live: of the held-out pairs only (train pairs get a reference forward inside each step).
none: nothing (reference-free losses such as SimPO).
"""

from __future__ import annotations

import gc
from functools import partial
from pathlib import Path

import torch

from dpokit.logprobs import compute_logps
from dpokit.models.loading import reference_context
from dpokit.reference.cache import AUTOCAST_TOLERANCE, FP32_TOLERANCE, cached_reference_logps
from dpokit.train.run import Run


def reference_pass(run: Run) -> None:
    """Fill `run.data.train_reference` and `run.data.eval_reference` as the reference mode asks."""
    config, data = run.config, run.data
    # No gradients: twice the training forward pass fits.
    batch_size = config.micro_batch_size * 2
    max_tokens = 2 * run.micro_batch_tokens if run.micro_batch_tokens is not None else None
    if run.mode == "precompute":
        cache_dir = Path(config.cache_dir) / "reference"
        # Packed and chunked log-probs equal padded ones only up to float rounding, and autocast rounds
        # more: all part of the key.
        method = (
            f"packing={config.packing},share={config.share_prompt},chunk={config.logps_chunk_size},"
            f"precision={run.precision.name},compile={config.compile}"
        )
        if run.engine.name == "fsdp2" and run.precision.mixed:
            method += ",fsdp2-gathered"  # FSDP2 gathers the weights in the compute dtype, autocast does not
        tolerance = FP32_TOLERANCE if run.precision.compute_dtype == torch.float32 else AUTOCAST_TOLERANCE
        reference_logps = partial(
            cached_reference_logps,
            logps_fn=run.logps_fn,
            cache_dir=cache_dir,
            batch_size=batch_size,
            method=method,
            max_tokens=max_tokens,
            tolerance=tolerance,
            accelerator=run.accelerator,
        )
        with reference_context(run.policy, run.reference) as model:
            data.train_reference, hit = reference_logps(model, data.train)
            if run.accelerator.is_main_process:
                run.console.print(
                    f"reference log-probs of {len(data.train)} train pairs: {'cache hit' if hit else 'computed'}"
                )
            if data.eval:
                data.eval_reference, _ = reference_logps(model, data.eval)
        run.reference = None  # every reference log-prob is on hand: free the weights before training
        gc.collect()
    elif run.mode == "live" and data.eval:
        with reference_context(run.policy, run.reference) as model:
            data.eval_reference = compute_logps(
                model, data.eval, run.logps_fn, batch_size, "reference", max_tokens
            )
