"""A reference-cache hit is checked against a recomputed batch before it is trusted.

A stale entry under a matching key (written by other code or weights) makes the policy differ from its
reference before any step: the first loss is off ln 2 and every later loss shifts. These tests plant such
an entry and check that it is caught, recomputed and rewritten.
"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpokit.data.prepare import load_pairs
from dpokit.logprobs import length_batches, padded_pair_logps
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.reference.cache import FP32_TOLERANCE, cached_reference_logps
from dpokit.train.loop import train
from tiny_models import tiny_run_config


def tamper(cache_dir, shift: float, index: list[int] | None = None) -> None:
    """Add `shift` nats to the cached chosen log-probs (of `index`, or every pair) of the only cache file."""
    (path,) = cache_dir.glob("*.safetensors")
    tensors = load_file(path)
    chosen = tensors["chosen"].clone()
    chosen[index if index is not None else slice(None)] += shift
    save_file({**tensors, "chosen": chosen}, str(path))


@pytest.fixture
def setup(tiny_model_dir, standard_file):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    return load_model(str(tiny_model_dir)), pairs, logps_fn


def test_an_untouched_hit_passes_the_check(setup, tmp_path, recwarn):
    model, pairs, logps_fn = setup
    first, hit = cached_reference_logps(model, pairs, logps_fn, tmp_path, batch_size=3)
    again, hit = cached_reference_logps(model, pairs, logps_fn, tmp_path, batch_size=3)
    assert hit and torch.equal(again.chosen, first.chosen) and not recwarn.list


def test_a_stale_entry_is_recomputed_and_rewritten(setup, tmp_path):
    """3e-3 nats on one pair of the checked batch (about what a 3e-4 loss shift at beta 0.1 needs) is over the
    fp32 margin at these log-prob sizes; the entry is recomputed, and the rewritten file then hits cleanly."""
    model, pairs, logps_fn = setup
    fresh, _ = cached_reference_logps(model, pairs, logps_fn, tmp_path, batch_size=3)
    checked = length_batches(pairs, 3)[0]
    atol, rtol = FP32_TOLERANCE
    assert 3e-3 > atol + rtol * fresh.chosen[checked[0]].abs().item()
    tamper(tmp_path, 3e-3, [checked[0]])
    with pytest.warns(UserWarning, match=r"differ from this reference model's by up to 0\.003.*recomputing"):
        got, hit = cached_reference_logps(model, pairs, logps_fn, tmp_path, batch_size=3)
    assert not hit
    assert torch.equal(got.chosen, fresh.chosen) and torch.equal(got.rejected, fresh.rejected)
    again, hit = cached_reference_logps(model, pairs, logps_fn, tmp_path, batch_size=3)
    assert hit and torch.equal(again.chosen, fresh.chosen)


def test_a_training_run_on_a_stale_entry_still_starts_at_ln2(tiny_model_dir, standard_file, tmp_path):
    """Full fine-tuning, precomputed reference: the policy is its reference at step 1, so the first loss is
    ln 2 to float precision, even when a planted stale cache entry would have shifted it."""
    config = tiny_run_config(
        tmp_path,
        tiny_model_dir,
        standard_file,
        learning_rate=1e-6,
        max_steps=1,
        output_dir=str(tmp_path / "first"),
    )
    train(config)
    tamper(tmp_path / "cache" / "reference", 0.5)  # every pair: a loss well off ln 2 if it were used
    with pytest.warns(UserWarning, match="recomputing"):
        train(config.model_copy(update={"output_dir": str(tmp_path / "second")}))
    for run in ("first", "second"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        (step_1,) = [r for r in records if r["split"] == "train" and r["step"] == 1]
        assert step_1["loss"] == pytest.approx(math.log(2), abs=1e-6)
