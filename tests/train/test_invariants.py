"""Numerical invariants of training: accumulation, reference handling, resume, signals, NaN, checkpoints."""

from __future__ import annotations

import json
import os
import signal
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dpokit.config import RunConfig
from dpokit.data.prepare import load_pairs
from dpokit.errors import DpokitError
from dpokit.logprobs import compute_logps, padded_pair_logps
from dpokit.losses import LOSSES
from dpokit.models.loading import add_lora, load_model, load_tokenizer, reference_context
from dpokit.reference import cache as cache_module
from dpokit.reference.cache import cached_reference_logps
from dpokit.train import checkpoint as checkpoint_module
from dpokit.train.hooks import RunHooks
from dpokit.train.loop import train
from tiny_models import tiny_run_config


def make_config(tmp_path: Path, model_dir: Path, data: Path, **fields) -> RunConfig:
    """tiny_run_config with no warmup and a checkpoint every 2 steps."""
    return tiny_run_config(tmp_path, model_dir, data, **{"warmup_ratio": 0.0, "save_every": 2, **fields})


def losses_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_lora_with_adapters_disabled_is_exactly_the_base(tiny_model_dir, standard_file):
    """The reference of a LoRA run is the base model itself: identical log-probs, bit for bit,
    even after the adapters have moved away from zero."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    base = load_model(str(tiny_model_dir))
    with torch.no_grad():
        expected = logps_fn(base, pairs[:4])
    policy = add_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, "all-linear", False)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # make the adapters change the output
        assert not torch.equal(logps_fn(policy, pairs[:4]).chosen, expected.chosen)
    with reference_context(policy, None) as reference:
        got = logps_fn(reference, pairs[:4])
    assert torch.equal(got.chosen, expected.chosen) and torch.equal(got.rejected, expected.rejected)


def test_precomputed_reference_equals_live_and_cache_is_keyed(
    tiny_model_dir, tiny_reference_dir, standard_file, tmp_path, monkeypatch
):
    """Cached reference log-probs equal a live forward; a different model, max_length, torch build or dpokit
    source (same version string) misses the cache."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    reference = load_model(str(tiny_reference_dir))
    cached, hit = cached_reference_logps(reference, pairs, logps_fn, tmp_path, batch_size=3)
    assert not hit
    with torch.no_grad():
        live = logps_fn(reference, pairs)
    assert_close(cached.chosen, live.chosen, atol=1e-5, rtol=0)
    assert_close(cached.rejected, live.rejected, atol=1e-5, rtol=0)
    again, hit = cached_reference_logps(reference, pairs, logps_fn, tmp_path)
    assert hit and torch.equal(again.chosen, cached.chosen)
    _, hit = cached_reference_logps(load_model(str(tiny_model_dir)), pairs, logps_fn, tmp_path)
    assert not hit, "another model's weights must not reuse the cache"
    short, _ = load_pairs(str(standard_file), tokenizer, 12)
    _, hit = cached_reference_logps(reference, short, logps_fn, tmp_path)
    assert not hit, "another max_length must not reuse the cache"
    monkeypatch.setattr(torch, "__version__", "0.0.0-another-build")
    _, hit = cached_reference_logps(reference, pairs, logps_fn, tmp_path)
    assert not hit, "another torch build may round differently and must not reuse the cache"
    monkeypatch.undo()
    _, hit = cached_reference_logps(reference, pairs, logps_fn, tmp_path)
    assert hit
    monkeypatch.setattr(cache_module, "code_fingerprint", lambda: "other dpokit sources, same version")
    _, hit = cached_reference_logps(reference, pairs, logps_fn, tmp_path)
    assert not hit, "dpokit code that computes log-probs differently must not reuse the cache"


def test_eight_pairs_one_step_equals_one_pair_eight_accumulations(tiny_model_dir, standard_file, tmp_path):
    """One optimizer step over 8 pairs gives the same weights and loss whether they go through the model
    as one micro-batch of 8 or eight micro-batches of 1."""
    runs = {}
    for micro in (8, 1):
        config = make_config(
            tmp_path / f"m{micro}",
            tiny_model_dir,
            standard_file,
            effective_batch_size=8,
            micro_batch_size=micro,
            max_steps=1,
            save_every=0,
        )
        runs[micro] = train(config)
    weights8 = load_file(str(runs[8] / "final" / "model.safetensors"))
    weights1 = load_file(str(runs[1] / "final" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights8[name], start[name]), "the step must change the weights"
    for key in weights8:
        assert_close(weights1[key], weights8[key], atol=1e-6, rtol=1e-5)
    assert losses_by_step(runs[8])[1] == pytest.approx(losses_by_step(runs[1])[1], abs=1e-6)


def test_resume_after_a_crash_continues_the_loss_curve_exactly(
    tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """A run that dies after step 3 (checkpoint at step 2) and resumes logs the same losses at every step as
    the uninterrupted run: same data order, weights, optimizer state and schedule."""
    whole = train(make_config(tmp_path / "whole", tiny_model_dir, standard_file, num_epochs=2))
    expected = losses_by_step(whole)
    assert len(expected) == 8

    original = RunHooks.on_record

    def crash_after_step_3(self, record):
        original(self, record)
        if record["split"] == "train" and record["step"] == 3:
            raise RuntimeError("simulated crash")

    config = make_config(tmp_path / "broken", tiny_model_dir, standard_file, num_epochs=2)
    monkeypatch.setattr(RunHooks, "on_record", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config)
    monkeypatch.setattr(RunHooks, "on_record", original)
    assert (Path(config.output_dir) / "checkpoints" / "latest").read_text() == "step-000002"
    train(config, resume=True)
    got = losses_by_step(Path(config.output_dir))
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), f"step {step}"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, standard_file, tmp_path, monkeypatch):
    """SIGTERM during step 3 finishes the step, checkpoints step 3 (not a multiple of save_every) and exits
    with 128 + 15; resuming completes the run with the uninterrupted losses."""
    expected = losses_by_step(
        train(make_config(tmp_path / "whole", tiny_model_dir, standard_file, num_epochs=2))
    )
    original = RunHooks.on_record

    def terminate_at_step_3(self, record):
        original(self, record)
        if record["split"] == "train" and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    config = make_config(tmp_path / "term", tiny_model_dir, standard_file, num_epochs=2)
    monkeypatch.setattr(RunHooks, "on_record", terminate_at_step_3)
    with pytest.raises(SystemExit) as exited:
        train(config)
    assert exited.value.code == 128 + signal.SIGTERM
    assert (Path(config.output_dir) / "checkpoints" / "latest").read_text() == "step-000003"
    monkeypatch.setattr(RunHooks, "on_record", original)
    train(config, resume=True)
    got = losses_by_step(Path(config.output_dir))
    assert got == pytest.approx(expected, abs=1e-6)


def test_nan_loss_stops_without_overwriting_the_good_checkpoint(
    tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """A NaN at step 3 ends the run with a clear error; the step-2 checkpoint stays the latest, untouched."""
    config = make_config(tmp_path / "nan", tiny_model_dir, standard_file, num_epochs=2)
    real_sigmoid = LOSSES["sigmoid"]
    calls = {"n": 0}

    def poisoned(policy, reference, params):
        calls["n"] += 1
        losses, chosen, rejected = real_sigmoid(policy, reference, params)
        if calls["n"] > 4:  # two micro-batches per step: steps 1-2 are clean
            losses = losses * float("nan")
        return losses, chosen, rejected

    monkeypatch.setitem(LOSSES, "sigmoid", poisoned)
    with pytest.raises(DpokitError, match=r"step 3: non-finite loss"):
        train(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002"]
    assert not (Path(config.output_dir) / "final").exists()


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(
    tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """Killing the writer in the middle of checkpoint 4 leaves `latest` on checkpoint 2, complete and loadable."""
    config = make_config(tmp_path / "save", tiny_model_dir, standard_file, num_epochs=2)
    real_save = checkpoint_module.save_file
    count = {"n": 0}

    def dying_save(tensors, path, metadata=None):
        count["n"] += 1
        if count["n"] == 5:  # second checkpoint: trainable(4), optimizer(5) -> dies half-way through
            raise KeyboardInterrupt("killed while saving")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    latest = checkpoint_module.latest_checkpoint(Path(config.output_dir))
    assert latest.name == "step-000002"
    assert {"trainable.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "progress.json"} <= {
        p.name for p in latest.iterdir()
    }
    assert json.loads((latest / "progress.json").read_text())["step"] == 2


def test_compute_logps_returns_dataset_order(tiny_model_dir, standard_file):
    """Length-sorted batching of the reference pass must put each pair's log-probs back in its place."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    model = load_model(str(tiny_model_dir))
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    batched = compute_logps(model, pairs, logps_fn, 5, "test")
    with torch.no_grad():
        for i in (0, 3, 7):
            single = logps_fn(model, [pairs[i]])
            assert_close(batched.chosen[i], single.chosen[0], atol=1e-5, rtol=0)


def test_live_reference_equals_precomputed(tiny_model_dir, tiny_reference_dir, standard_file, tmp_path):
    """With a separate reference model, live reference forwards and the precomputed cache train identically."""
    losses = {}
    for mode in ("precompute", "live"):
        config = make_config(
            tmp_path / mode,
            tiny_model_dir,
            standard_file,
            reference_mode=mode,
            reference_model=str(tiny_reference_dir),
        )
        losses[mode] = losses_by_step(train(config))
    assert losses["live"] == pytest.approx(losses["precompute"], abs=1e-5)
    assert losses["live"][1] != pytest.approx(0.6931, abs=1e-3), (
        "policy != reference: step-1 loss is not ln 2"
    )


def test_lora_run_trains_only_adapters_and_checkpointing_changes_nothing(
    tiny_model_dir, standard_file, tmp_path
):
    """A LoRA run saves a PEFT adapter; gradient checkpointing gives the same losses."""
    losses = {}
    for checkpointing in (False, True):
        config = make_config(
            tmp_path / f"gc{checkpointing}",
            tiny_model_dir,
            standard_file,
            use_lora=True,
            lora_r=4,
            learning_rate=1e-2,
            gradient_checkpointing=checkpointing,
        )
        run_dir = train(config)
        losses[checkpointing] = losses_by_step(run_dir)
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / "final" / "adapter_config.json").read_text())["r"] == 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[False][2] < losses[False][1] < 0.6932  # the adapters learn: step 1 at ln 2, then down


def test_a_lora_run_from_a_saved_adapter_trains_that_adapter_on(tiny_model_dir, standard_file, tmp_path):
    """model = a LoRA run's final/: the policy starts as that adapter (its log-probs), trains the adapter's own
    weights, and the reference is the base with adapters disabled (no second copy)."""
    from rich.console import Console

    from dpokit.models.loading import load_adapter
    from dpokit.train.run import setup_run

    fields = dict(use_lora=True, lora_r=4, learning_rate=1e-2, max_steps=2)
    first = train(make_config(tmp_path / "first", tiny_model_dir, standard_file, **fields))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    saved = load_adapter(str(first / "final"), load_model(str(tiny_model_dir)))
    base = load_model(str(tiny_model_dir))
    with torch.no_grad():
        expected, base_logps = logps_fn(saved, pairs[:4]), logps_fn(base, pairs[:4])
    assert not torch.allclose(expected.chosen, base_logps.chosen), "the first run moved the adapter"

    config = make_config(tmp_path / "second", first / "final", standard_file, **fields)
    run = setup_run(config, Console(quiet=True))
    assert run.reference is None
    assert {n for n, p in run.policy.named_parameters() if p.requires_grad} == {
        n for n, _ in saved.named_parameters() if "lora_" in n
    }
    with torch.no_grad():
        got = logps_fn(run.policy, pairs[:4])
    assert_close(got.chosen, expected.chosen, atol=1e-5, rtol=0)
    with reference_context(run.policy, None) as reference:
        assert_close(logps_fn(reference, pairs[:4]).chosen, base_logps.chosen, atol=1e-5, rtol=0)
