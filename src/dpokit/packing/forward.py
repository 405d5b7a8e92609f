"""Packed, prompt-sharing, chunked log-probs of preference pairs: the fast path behind `logps_fn` (SPEC §3.4).

`packed_pair_logps` returns exactly what `dpokit.logprobs.padded_pair_logps` returns (same pairs, same order,
same numbers within float tolerance), with no compute spent on padding, each prompt run once per pair, and
logits only for answer tokens, a chunk at a time.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import LogpsFn, PairLogps, padded_pair_logps
from dpokit.packing import flex
from dpokit.packing.attention import RECOMPUTES_KERNEL, SEGMENT_KERNEL, packed_attention
from dpokit.packing.chunked import DEFAULT_CHUNK_SIZE, chunked_token_logps, dense_token_logps
from dpokit.packing.layout import layout_pairs

# Families checked by tests/packing/test_families.py: attention takes a custom 4-D mask and position ids as
# given, and the logits are the output layer applied to the decoder's output. Not so, and so left out: ALiBi
# (mpt, bloom), state-space layers (jamba, falcon_h1), logit soft-capping (gemma2) or scaling (cohere, granite).
PACKING_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3"})
SEGMENT_ATTENTION = frozenset({"sdpa"})  # replaced by a kernel of ours: one call per segment, or flex below
# Device types where that kernel is one FlexAttention call per layer (packing/flex.py), compiled. On CPU flex
# runs eagerly, materialising the scores, and one SDPA call per segment is faster.
FLEX_DEVICES = frozenset({"cuda"})
MASK_ATTENTION = frozenset({"sdpa", "eager"})  # take the 4-D mask as is
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3"})  # packing from position ids only


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and peft wrappers (it holds the config, decoder and output layer)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_mode(model: torch.nn.Module, row_length: int) -> str:
    """How packed rows reach attention: 'flex' (one FlexAttention call per layer, a block mask), 'segments'
    (SDPA per segment), 'mask' (a 4-D mask), 'position_ids' (varlen kernels, no shared prompt), or 'padded' (not
    verified for this model: the padded reference path). The one place where the packed kernel is chosen."""
    base = base_model(model)
    config = base.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if config.model_type not in PACKING_FAMILIES or (window is not None and row_length > window):
        return "padded"  # a 4-D mask replaces the sliding-window mask, exact only while rows fit the window
    # Checkpointing reruns the forward in backward, after packed_attention has switched back to SDPA, which
    # ignores packed_spans and packed_block_mask. Set up by enable_checkpointing, the rerun gets the forward's
    # kernel back; otherwise checkpointed models take the mask (the per-segment and the flex kernel alike).
    recomputes_kernel = getattr(base, RECOMPUTES_KERNEL, False) or not base.is_activation_checkpointing
    if config._attn_implementation in SEGMENT_ATTENTION and recomputes_kernel:
        device = base.get_input_embeddings().weight.device
        # flex_attention has no dropout; the per-segment SDPA calls do.
        flex_fits = flex.flex_attention is not None and not getattr(config, "attention_dropout", 0.0)
        return "flex" if flex_fits and device.type in FLEX_DEVICES else "segments"
    if config._attn_implementation in MASK_ATTENTION:
        return "mask"
    return "position_ids" if config._attn_implementation in VARLEN_ATTENTION else "padded"


def final_hidden_states(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """Hidden states after the final norm, (R, T, H), from a full forward of `model`.

    The forward goes through the outermost wrapper (DDP needs that to synchronise gradients) with logits for
    one position per row; a hook on the decoder catches its output.
    """
    captured: list[torch.Tensor] = []
    decoder = base_model(model).get_decoder()
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def packed_pair_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    *,
    token_budget: int | None,
    share_prompt: bool = True,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> PairLogps:
    """Summed answer log-probs of `pairs`, as `padded_pair_logps` computes them.

    token_budget: tokens per packed row (None: one sequence per row, right-padded, no packing).
    share_prompt: run each prompt once, both answers attending to it. chunk_size: tokens per output-layer chunk
    (None: all answer-token logits at once). Models not verified for packing get `padded_pair_logps`.
    """
    base = base_model(model)
    longest = max(p.num_tokens - len(p.prompt_ids) for p in pairs)  # a shared-prompt segment
    mode = attention_mode(model, max(token_budget or 0, longest))
    if mode == "padded":
        warnings.warn(
            f"packing: {base.config.model_type} with {base.config._attn_implementation} attention is not verified "
            "for packed rows; using padded batches",
            UserWarning,
            stacklevel=2,
        )
        return padded_pair_logps(model, pairs, pad_token_id)
    head = base.get_output_embeddings()
    device = head.weight.device
    share_prompt = share_prompt and mode != "position_ids"  # varlen kernels know causal segments only
    batch = layout_pairs(pairs, pad_token_id, share_prompt=share_prompt, token_budget=token_budget).to(device)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    if mode == "mask":
        eager = base.config._attn_implementation == "eager"
        inputs["attention_mask"] = batch.attention_mask(
            base.get_input_embeddings().weight.dtype if eager else torch.bool
        )
    if mode == "segments":
        inputs["packed_spans"] = batch.spans
    if mode == "flex":
        inputs["packed_block_mask"] = flex.packed_block_mask(batch)  # built once, used by every layer
    kernel = {"segments": SEGMENT_KERNEL, "flex": flex.FLEX_KERNEL}.get(mode)
    with packed_attention(base, kernel) if kernel else nullcontext():
        hidden = final_hidden_states(model, **inputs)  # (R, T, H)
    hidden = hidden.flatten(0, 1)[batch.sources]  # (N, H): the states that predict answer tokens
    if chunk_size is None:
        token_logps = dense_token_logps(head, hidden, batch.targets)
    else:
        token_logps = chunked_token_logps(head, hidden, batch.targets, chunk_size)  # (N,)
    num_sequences = 2 * len(pairs)
    logps = torch.zeros(num_sequences, dtype=torch.float32, device=device).index_add(
        0, batch.owners, token_logps
    )
    chosen, rejected = logps.chunk(2)
    # Every answer token counts, as in padded_pair_logps and TRL (even one that nothing before it can score).
    chosen_lengths = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float32, device=device)
    rejected_lengths = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float32, device=device)
    return PairLogps(chosen, rejected, chosen_lengths, rejected_lengths)


def build_logps_fn(
    pad_token_id: int, packing: bool, share_prompt: bool, chunk_size: int | None, token_budget: int
) -> LogpsFn:
    """The `logps_fn(model, pairs) -> PairLogps` the training loop, reference precompute and eval use.

    All switches off gives the padded reference path; `share_prompt` needs `packing`.
    """
    if not packing and chunk_size is None:
        return partial(padded_pair_logps, pad_token_id=pad_token_id)
    return partial(
        packed_pair_logps,
        pad_token_id=pad_token_id,
        token_budget=token_budget if packing else None,
        share_prompt=share_prompt and packing,
        chunk_size=chunk_size,
    )
