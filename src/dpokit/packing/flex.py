"""Attention over packed rows as one FlexAttention call per layer, with one block mask per micro-batch.

`segment_sdpa` launches one SDPA call per segment (two per shared-prompt pair) in every layer, and recomputes
each prompt for its rejected answer; on a GPU that is launch-bound. Here the layout's per-token segment and
branch ids become a `mask_mod` that allows exactly what `PackedBatch.attention_mask` allows, and
`create_block_mask` turns it into a `BlockMask` once per micro-batch: the kernel skips the blocks it masks out,
so the cost follows the segments' lengths, not the row's, and every layer reuses the same mask.

The kernel is registered with transformers' AttentionInterface as FLEX_KERNEL and switched on only around a
packed forward (`packed_attention`); the block mask reaches it through the forward's kwargs. On CUDA it runs
compiled (compiled once, on first use); elsewhere eagerly, which materialises the scores (tests only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import AttentionInterface

from dpokit.packing.layout import TRUNK, PackedBatch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5 has no FlexAttention: packed rows take the per-segment kernel
    flex_attention = None

FLEX_KERNEL = "dpokit_flex"


def packed_mask_mod(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The `mask_mod(b, h, q_idx, kv_idx) -> bool` of `PackedBatch.attention_mask`, from (R, T) token ids.

    A query sees a key of its own segment, not later than itself, that is a prompt token or on its own branch
    (so a rejected answer never sees the chosen one). A padding token (segment -1) sees itself only: no
    softmax row is empty (NaN), and its output is never read.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        segment, branch = segment_ids[b, q_idx], branch_ids[b, q_idx]
        visible = (segment == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)
        visible &= (branch_ids[b, kv_idx] == TRUNK) | (branch == branch_ids[b, kv_idx])
        return visible & ((segment >= 0) | (q_idx == kv_idx))

    return mask_mod


def packed_block_mask(batch: PackedBatch) -> BlockMask:
    """The block mask of `batch`'s rows, (R, 1, T, T) in blocks, on the batch's device; build once, use in every
    layer."""
    rows, width = batch.segment_ids.shape
    mask_mod = packed_mask_mod(batch.segment_ids, batch.branch_ids)
    return create_block_mask(mask_mod, rows, None, width, width, device=batch.segment_ids.device)


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled into a fused kernel, once per process (first packed forward on CUDA)."""
    return torch.compile(flex_attention)


def flex_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (R, Hq, T, D)
    key: torch.Tensor,  # (R, Hkv, T, D)
    value: torch.Tensor,  # (R, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    packed_block_mask: BlockMask,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One FlexAttention call over all rows under `packed_block_mask` (no dropout: attention_mode only picks
    this kernel for models without attention dropout). -> (R, T, Hq, D)."""
    kernel = compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    out = kernel(
        query,
        key,
        value,
        block_mask=packed_block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


if flex_attention is not None:
    AttentionInterface.register(FLEX_KERNEL, flex_sdpa)
