"""packed == padded, shared prompt == separate, chunked == dense: log-probs, DPO loss and parameter gradients.

All against `padded_pair_logps`, the reference implementation, on a tiny random Llama in float32, with prompts
and answers of different lengths (an empty prompt included) in one batch.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import PairLogps, compute_logps, padded_pair_logps
from dpokit.losses import LOSSES, LossParams
from dpokit.packing import build_logps_fn, forward, packed_pair_logps
from tiny_models import build_model

VOCAB, PAD = 320, 0
# (prompt, chosen, rejected) lengths
LENGTHS = [(5, 3, 7), (1, 4, 2), (12, 1, 9), (3, 8, 8), (0, 3, 2), (20, 6, 1), (2, 2, 15)]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def make_pairs(lengths: list[tuple[int, int, int]] = LENGTHS, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    return [TokenizedPair(ids(p), ids(c), ids(r), line=i) for i, (p, c, r) in enumerate(lengths)]


def loss_and_grads(model: torch.nn.Module, logps_fn, pairs, reference: PairLogps):
    """Log-probs, per-pair sigmoid DPO losses and the gradient of their sum for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    out = logps_fn(model, pairs)
    losses, _, _ = LOSSES["sigmoid"](out, reference, LossParams(beta=0.5))
    losses.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [t.detach() for t in vars(out).values()], losses.detach(), grads


def assert_same(got, want) -> None:
    (got_logps, got_losses, got_grads), (want_logps, want_losses, want_grads) = got, want
    for g, w in zip(got_logps, want_logps):
        torch.testing.assert_close(g, w, **TOLERANCE)
    torch.testing.assert_close(got_losses, want_losses, **TOLERANCE)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOLERANCE, msg=name)


def padded_fn(model, pairs):
    return padded_pair_logps(model, pairs, PAD)


@pytest.mark.parametrize("token_budget", [None, 24, 4096])  # unpacked, several rows, all in one row
@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_packed_equals_padded(pairs, reference, token_budget, share_prompt, chunk_size) -> None:
    model = build_model(VOCAB, seed=0)
    fn = build_logps_fn(
        PAD,
        packing=token_budget is not None,
        share_prompt=share_prompt,
        chunk_size=chunk_size,
        token_budget=token_budget or 0,
    )
    assert_same(
        loss_and_grads(model, fn, pairs, reference), loss_and_grads(model, padded_fn, pairs, reference)
    )


def test_eager_attention_takes_the_float_mask(pairs, reference) -> None:
    model = build_model(VOCAB, seed=0)
    model.set_attn_implementation("eager")
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    assert_same(
        loss_and_grads(model, fn, pairs, reference), loss_and_grads(model, padded_fn, pairs, reference)
    )


def test_lora_policy_and_its_reference(pairs, reference) -> None:
    """A PeftModel: LoRA gradients match, and with adapters disabled (the reference) so do the log-probs."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_model(VOCAB, seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters do something
            torch.nn.init.normal_(p, std=0.1)
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    assert_same(
        loss_and_grads(model, fn, pairs, reference), loss_and_grads(model, padded_fn, pairs, reference)
    )
    with model.disable_adapter(), torch.inference_mode():
        got, want = fn(model, pairs), padded_fn(model, pairs)
    torch.testing.assert_close(got.chosen, want.chosen, **TOLERANCE)
    torch.testing.assert_close(got.rejected, want.rejected, **TOLERANCE)


def test_sdpa_with_the_4d_mask(pairs, reference, monkeypatch) -> None:
    """The bool 4-D mask route into SDPA, which segment attention replaces by default."""
    monkeypatch.setattr(forward, "SEGMENT_ATTENTION", frozenset())
    model = build_model(VOCAB, seed=0)
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    assert_same(
        loss_and_grads(model, fn, pairs, reference), loss_and_grads(model, padded_fn, pairs, reference)
    )


def test_gradient_checkpointing_recomputes_exactly(pairs, reference) -> None:
    """Checkpointing reruns the forward in backward, after segment attention is switched off again."""
    model = build_model(VOCAB, seed=0).train()
    want = loss_and_grads(model, padded_fn, pairs, reference)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    assert_same(loss_and_grads(model, fn, pairs, reference), want)


def test_reference_precompute_on_the_packed_path(pairs) -> None:
    model = build_model(VOCAB, seed=1)
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    got = compute_logps(model, pairs, fn, batch_size=3, desc="test")
    want = compute_logps(model, pairs, padded_fn, batch_size=3, desc="test")
    for g, w in zip(vars(got).values(), vars(want).values()):
        torch.testing.assert_close(g, w, **TOLERANCE)


def test_packing_from_position_ids_alone(pairs, reference, monkeypatch) -> None:
    """The flash-attention route: no mask, transformers finds the segments from restarting position ids.
    SDPA takes the same route on CPU, so the route itself is checked here; prompts are not shared on it."""
    monkeypatch.setattr(forward, "MASK_ATTENTION", frozenset())
    monkeypatch.setattr(forward, "VARLEN_ATTENTION", frozenset({"sdpa"}))
    model = build_model(VOCAB, seed=0)
    fn = build_logps_fn(PAD, packing=True, share_prompt=True, chunk_size=8, token_budget=64)
    assert_same(
        loss_and_grads(model, fn, pairs, reference), loss_and_grads(model, padded_fn, pairs, reference)
    )


def test_unverified_family_falls_back_to_padded(pairs, monkeypatch) -> None:
    monkeypatch.setattr(forward, "PACKING_FAMILIES", frozenset())
    model = build_model(VOCAB, seed=0)
    with pytest.warns(UserWarning, match="not verified"), torch.inference_mode():
        got = packed_pair_logps(model, pairs, PAD, token_budget=64)
    with torch.inference_mode():
        torch.testing.assert_close(got.chosen, padded_fn(model, pairs).chosen)


def test_rows_longer_than_the_sliding_window_fall_back(pairs) -> None:
    model = build_model(VOCAB, seed=0)
    model.config.sliding_window = 32  # the longest pair, shared prompt, has 22 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed_pair_logps(model, pairs, PAD, token_budget=32)  # rows fit the window: packed
    with pytest.warns(UserWarning, match="not verified"):
        packed_pair_logps(model, pairs, PAD, token_budget=64)


def test_all_switches_off_is_the_reference_implementation() -> None:
    fn = build_logps_fn(PAD, packing=False, share_prompt=True, chunk_size=None, token_budget=1024)
    assert fn.func is padded_pair_logps
