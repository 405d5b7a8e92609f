"""Attention over packed rows one segment at a time, for SDPA models on the packed path.

A 4-D block-diagonal mask is exact but makes attention cost (row length)^2 per row, and a masked SDPA call
cannot skip the blocks it masks out. Running each segment as its own causal SDPA call costs (segment length)^2
instead. With a shared prompt, the chosen answer runs with the prompt as one causal block; the rejected answer
runs as the causal block [prompt, rejected], whose prompt rows (recomputed, identical) are dropped.

The kernel is registered with transformers' AttentionInterface and switched on only around a packed forward
(`packed_attention`). On CUDA, packing/flex.py's one-call-per-layer FlexAttention kernel replaces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


AttentionInterface.register(SEGMENT_KERNEL, segment_sdpa)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Route `model`'s attention through the registered kernel `name` (SEGMENT_KERNEL, or FLEX_KERNEL of
    packing/flex.py) inside the block, and back after it (not for models with activation checkpointing: their
    backward reruns the forward after the block)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
