"""The FlexAttention route for packed rows (packing/flex.py): its block mask is the layout's 4-D mask, and its
log-probs, DPO loss and (on CUDA) gradients equal the padded reference path's.

On CPU flex_attention runs uncompiled, forward only (attention_mode picks it on CUDA; FLEX_DEVICES is widened
here).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import (
    LENGTHS,
    PAD,
    TOLERANCE,
    VOCAB,
    loss_and_grads,
    make_pairs,
    padded_fn,
)
from transformers import LlamaConfig, LlamaForCausalLM

from dpokit.logprobs import padded_pair_logps
from dpokit.losses import LOSSES, LossParams
from dpokit.packing import flex, forward
from dpokit.packing.forward import attention_mode, build_logps_fn
from dpokit.packing.layout import layout_pairs
from tiny_models import TINY_SIZES

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
# Eager flex on CPU warns that it is not compiled; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def llama(num_key_value_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama of tiny_models.build_model, with 4 query heads and `num_key_value_heads` key/value heads."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, **dict(TINY_SIZES, num_key_value_heads=num_key_value_heads))
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def flex_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(forward, "FLEX_DEVICES", frozenset({"cpu", "cuda"}))


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def reference(pairs):
    with torch.inference_mode():
        return padded_pair_logps(llama(seed=1), pairs, PAD)


# Rows of several 128-token blocks, so the block mask has empty, partial and full blocks to get right.
MANY = [
    (p % 23, 1 + c % 17, 1 + r % 29) for p, c, r in zip(range(0, 400, 7), range(0, 400, 5), range(3, 400, 11))
]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize(
    "lengths, token_budget", [(LENGTHS, None), (LENGTHS, 24), (LENGTHS, 4096), (MANY, 512)]
)
def test_block_mask_is_the_dense_mask(lengths, token_budget, share_prompt) -> None:
    """mask_mod on the full grid == PackedBatch.attention_mask, element for element; and the BlockMask (which
    skips blocks and leaves mask_mod out of full ones) gives the attention the dense mask gives."""
    batch = layout_pairs(make_pairs(lengths), PAD, share_prompt=share_prompt, token_budget=token_budget)
    rows, width = batch.input_ids.shape
    dense = batch.attention_mask(torch.bool)  # (R, 1, T, T)
    mask_mod = flex.packed_mask_mod(batch.segment_ids, batch.branch_ids)
    grid = flex_attention.create_mask(mask_mod, rows, None, width, width, device="cpu")
    torch.testing.assert_close(grid, dense)

    block_mask = flex.packed_block_mask(batch)
    if lengths is MANY:  # blocks below the diagonal with no query and key in one segment are skipped
        assert (block_mask.to_dense() == 0).tril().any()
    q, k, v = torch.randn(3, rows, 2, width, 8, dtype=torch.float64).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention.flex_attention(q, k, v, block_mask=block_mask), want)


def logps_and_losses(model: torch.nn.Module, logps_fn, pairs, reference) -> list[torch.Tensor]:
    """Without gradients: FlexAttention has no backward on CPU (torch 2.13 raises NotImplementedError)."""
    with torch.inference_mode():
        out = logps_fn(model, pairs)
        losses, _, _ = LOSSES["sigmoid"](out, reference, LossParams(beta=0.5))
    return [*vars(out).values(), losses]


@pytest.mark.parametrize("token_budget", [24, 4096])  # several rows (with padding), all in one row
@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("num_key_value_heads", [2, 4])  # GQA, and one key/value head per query head
def test_flex_equals_padded(
    pairs, reference, flex_on_cpu, token_budget, share_prompt, num_key_value_heads
) -> None:
    """Log-probs and DPO losses; prompts of different lengths, an empty one included (LENGTHS). Gradients: the
    CUDA test below."""
    model = llama(num_key_value_heads)
    assert attention_mode(model, row_length=token_budget) == "flex"
    fn = build_logps_fn(PAD, packing=True, share_prompt=share_prompt, chunk_size=5, token_budget=token_budget)
    got = logps_and_losses(model, fn, pairs, reference)
    want = logps_and_losses(model, padded_fn, pairs, reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCE)
    assert model.config._attn_implementation == "sdpa"  # switched back after the packed forward


def test_one_kernel_call_per_layer_and_one_block_mask(pairs, flex_on_cpu, monkeypatch) -> None:
    calls = {"kernel": 0, "mask": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(flex, "flex_attention", counted("kernel", flex.flex_attention))
    monkeypatch.setattr(flex, "packed_block_mask", counted("mask", flex.packed_block_mask))
    model = llama()
    with torch.inference_mode():
        forward.packed_pair_logps(model, pairs, PAD, token_budget=24)  # several rows
    assert calls == {"kernel": model.config.num_hidden_layers, "mask": 1}


def test_padding_gives_finite_outputs(pairs) -> None:
    """Padding tokens attend to themselves only: no empty softmax row, so no NaN anywhere in the output."""
    batch = layout_pairs(pairs, PAD, share_prompt=True, token_budget=24)
    assert (batch.segment_ids < 0).any()
    q, k, v = (torch.randn(*batch.input_ids.shape, h, 8).transpose(1, 2) for h in (4, 2, 2))
    out, _ = flex.flex_sdpa(torch.nn.Module(), q, k, v, None, packed_block_mask=flex.packed_block_mask(batch))
    assert out.shape == (*batch.input_ids.shape, 4, 8)
    assert out.isfinite().all()


def test_cpu_keeps_the_segment_kernel_by_default() -> None:
    assert attention_mode(llama(), row_length=64) == "segments"


def test_attention_dropout_keeps_the_segment_kernel(flex_on_cpu) -> None:
    """flex_attention has no dropout."""
    model = llama()
    model.config.attention_dropout = 0.1
    assert attention_mode(model, row_length=64) == "segments"


def test_checkpointed_models_take_the_mask(flex_on_cpu) -> None:
    """Checkpointing reruns each layer's forward in backward, after packed_attention has switched the model back
    to SDPA, which would ignore the block mask: as with the segment kernel, such models take the 4-D mask."""
    model = llama().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert attention_mode(model, row_length=64) == "mask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs a CUDA device")
@pytest.mark.parametrize("share_prompt", [False, True])
def test_compiled_flex_on_cuda_equals_padded(pairs, share_prompt) -> None:
    model = llama().cuda()
    assert attention_mode(model, row_length=4096) == "flex"
    fn = build_logps_fn(PAD, packing=True, share_prompt=share_prompt, chunk_size=5, token_budget=4096)
    with torch.inference_mode():
        reference = padded_pair_logps(llama(seed=1).cuda(), pairs, PAD)
    tolerance = {"atol": 1e-4, "rtol": 1e-3}  # fused kernel vs SDPA, float32 on a GPU
    (got_logps, got_losses, got_grads), (want_logps, want_losses, want_grads) = (
        loss_and_grads(model, fn, pairs, reference),
        loss_and_grads(model, padded_fn, pairs, reference),
    )
    for g, w in zip([*got_logps, got_losses], [*want_logps, want_losses]):
        torch.testing.assert_close(g, w, **tolerance)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tolerance, msg=name)
