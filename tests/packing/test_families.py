"""Every model family on the packing list accepts packed rows: shared-prompt packed log-probs == padded ones."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import PAD, TOLERANCE, VOCAB, make_pairs
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.logprobs import padded_pair_logps
from dpokit.packing import forward
from dpokit.packing.forward import PACKING_FAMILIES, attention_mode, packed_pair_logps
from tiny_models import TINY_SIZES

# head_dim spelled out: not every family derives it from hidden_size / num_attention_heads.
TINY = dict(TINY_SIZES, vocab_size=VOCAB, head_dim=8, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY, **overrides)).eval()


@pytest.mark.parametrize("family", sorted(PACKING_FAMILIES))
@pytest.mark.parametrize("path", ["segments", "mask"])
def test_family_accepts_packed_rows(family: str, path: str, monkeypatch) -> None:
    """Both routes into SDPA: one call per segment (the default), and the 4-D mask."""
    if path == "mask":
        monkeypatch.setattr(forward, "SEGMENT_ATTENTION", frozenset())
    model, pairs = tiny_model(family), make_pairs()
    assert attention_mode(model, row_length=64) == path
    with torch.inference_mode():
        got = packed_pair_logps(model, pairs, PAD, token_budget=64)
        want = padded_pair_logps(model, pairs, PAD)
    torch.testing.assert_close(got.chosen, want.chosen, **TOLERANCE)
    torch.testing.assert_close(got.rejected, want.rejected, **TOLERANCE)
    assert model.config._attn_implementation == "sdpa"  # switched back after the packed forward


@pytest.mark.parametrize("family, overrides", [("mpt", {}), ("granite", {"logits_scaling": 4.0})])
def test_left_out_families_would_give_wrong_numbers(family: str, overrides: dict, monkeypatch) -> None:
    """Why they are not on the list: ALiBi ignores position ids; logit scaling happens outside the output layer.
    Off the list they get the padded path, with a warning."""
    model, pairs = tiny_model(family, **overrides), make_pairs()
    with torch.inference_mode():
        want = padded_pair_logps(model, pairs, PAD)
        with pytest.warns(UserWarning, match="not verified"):
            fallback = packed_pair_logps(model, pairs, PAD, token_budget=64)
        monkeypatch.setattr(forward, "PACKING_FAMILIES", PACKING_FAMILIES | {family})
        forced = packed_pair_logps(model, pairs, PAD, token_budget=64)
    torch.testing.assert_close(fallback.rejected, want.rejected)
    assert not torch.allclose(forced.rejected, want.rejected, atol=1e-3)
