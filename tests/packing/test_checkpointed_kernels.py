"""Activation checkpointing keeps packed rows on their kernel (packing.attention.enable_checkpointing).

Checkpointing reruns each layer's forward during backward, after `packed_attention` has switched the model
back to SDPA. Set up by `enable_checkpointing`, the rerun uses the kernel the forward used; a model
checkpointed without it takes the dense 4-D mask, which is exact at any time.
"""

from __future__ import annotations

import pytest
from test_equivalence import PAD, VOCAB, assert_same, loss_and_grads, padded_fn

from dpokit.packing import attention, forward
from dpokit.packing.attention import enable_checkpointing
from dpokit.packing.forward import attention_mode, build_logps_fn
from tiny_models import build_model


def packed_fn():
    return build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)


def test_plainly_checkpointed_models_take_the_mask_and_ours_keep_the_segments() -> None:
    plain = build_model(VOCAB, seed=0).train()
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert attention_mode(plain, row_length=64) == "mask"
    ours = build_model(VOCAB, seed=0).train()
    enable_checkpointing(ours)
    assert ours.is_activation_checkpointing
    assert attention_mode(ours, row_length=64) == "segments"


def test_the_rerun_in_backward_uses_the_segment_kernel_and_gradients_equal_padded(
    pairs, reference, monkeypatch
) -> None:
    """Every decoder layer's segment attention runs twice per step (forward, then the rerun in backward), and
    the gradients equal the unpacked, uncheckpointed model's."""
    model = build_model(VOCAB, seed=0).train()
    want = loss_and_grads(model, padded_fn, pairs, reference)
    enable_checkpointing(model)
    calls = []
    kernel = attention.segment_sdpa

    def counted(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return kernel(module, *args, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.SEGMENT_KERNEL, counted)
    got = loss_and_grads(model, packed_fn(), pairs, reference)
    assert_same(got, want)
    layers = list(range(model.config.num_hidden_layers))
    assert calls == layers + layers[::-1], (
        "each layer's forward, then its rerun in backward, last layer first"
    )
    assert model.config._attn_implementation == "sdpa", "the model is back on SDPA after the step"


def test_flex_kernel_is_kept_too(monkeypatch) -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(forward, "FLEX_DEVICES", frozenset({"cpu"}))
    model = build_model(VOCAB, seed=0).train()
    enable_checkpointing(model)
    assert attention_mode(model, row_length=64) == "flex"
