"""Attention over packed rows one segment at a time, for SDPA models on the packed path.

A 4-D block-diagonal mask is exact but makes attention cost (row length)^2 per row, and a masked SDPA call
cannot skip the blocks it masks out. Running each segment as its own causal SDPA call costs (segment length)^2
instead. With a shared prompt, the chosen answer runs with the prompt as one causal block; the rejected answer
runs as the causal block [prompt, rejected], whose prompt rows (recomputed, identical) are dropped.

The kernel is registered with transformers' AttentionInterface and switched on only around a packed forward
(`packed_attention`). On CUDA, packing/flex.py's one-call-per-layer FlexAttention kernel replaces it.
Activation checkpointing reruns each layer's forward during backward, after that switch has been undone;
`enable_checkpointing` makes the rerun use the kernel the forward used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

SEGMENT_KERNEL = "dpokit_segments"


def segment_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (R, Hq, T, D)
    key: torch.Tensor,  # (R, Hkv, T, D)
    value: torch.Tensor,  # (R, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    packed_spans: list[tuple[int, int, int, int, int]],
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA per segment of `packed_spans` (see PackedBatch.spans); padding gets zeros. -> (R, T, Hq, D)."""
    out = query.new_zeros(query.shape)
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )

    for row, start, trunk, chosen, rejected in packed_spans:
        r = slice(row, row + 1)  # keep the batch dim: CPU's flash kernel takes 4-D inputs only
        end = start + trunk + chosen
        out[r, :, start:end] = attend(*(x[r, :, start:end] for x in (query, key, value)))
        if rejected:  # the causal block [prompt, rejected answer], whose prompt rows are dropped
            keep = [slice(start, start + trunk), slice(end, end + rejected)]
            q, k, v = (torch.cat([x[r, :, s] for s in keep], dim=2) for x in (query, key, value))
            out[r, :, end : end + rejected] = attend(q, k, v)[:, :, trunk:]
    return out.transpose(1, 2).contiguous(), None


# Its Python loop over segments changes with every batch: under `compile: true` it runs eagerly between the
# compiled parts of each layer instead of being traced (and recompiled) per batch.
AttentionInterface.register(SEGMENT_KERNEL, torch.compiler.disable(segment_sdpa))


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Route `model`'s attention through the registered kernel `name` (SEGMENT_KERNEL, or FLEX_KERNEL of
    packing/flex.py) inside the block, and back after it. A checkpointed model's backward reruns the forward
    after the block: only checkpointing set up by `enable_checkpointing` reruns it with the same kernel."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# Set on a model whose checkpointed layers recompute with the kernel their forward ran (enable_checkpointing).
RECOMPUTES_KERNEL = "_dpokit_recomputes_attention_kernel"


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    """The attention layers read `config._attn_implementation` at each call; set it for the block only."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def checkpointing_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """torch.utils.checkpoint arguments under which each layer's recomputation in backward runs the attention
    kernel that its forward ran (read when the layer's forward runs, restored after the recomputation)."""
    config = model.config

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _attention_implementation(config, config._attn_implementation)

    return {"use_reentrant": False, "context_fn": context_fn}


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing on a transformers model that keeps packed rows on their fast kernels (the
    per-segment or flex one) instead of falling back to a dense 4-D mask."""
    kwargs = checkpointing_kwargs(model)
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    setattr(model, RECOMPUTES_KERNEL, True)
