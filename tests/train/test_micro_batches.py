"""Forward passes by token budget: any grouping of a step's pairs gives the same update (8 x 1 == 1 x 8)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dpokit.train import step as step_module
from dpokit.train.loop import train
from train.test_invariants import losses_by_step, make_config


def test_token_budget_groupings_give_the_same_step(tiny_model_dir, standard_file, tmp_path, monkeypatch):
    """One step over 8 pairs as 8 fixed-size forwards of 1 pair, as a budget of 1 token (each pair alone),
    and as a budget that holds all 8: the same weights and loss; the groupings are what the budget says."""
    groupings = []
    original = step_module.micro_batches

    def recording(run, step):
        batches = original(run, step)
        groupings.append([len(b) for b in batches])
        return batches

    monkeypatch.setattr(step_module, "micro_batches", recording)
    runs = {}
    for name, fields in {
        "pairs": dict(micro_batch_size=1, micro_batch_tokens=None),
        "one_token": dict(micro_batch_size=8, micro_batch_tokens=1),
        "all": dict(micro_batch_size=1, micro_batch_tokens=100_000),
    }.items():
        config = make_config(
            tmp_path / name,
            tiny_model_dir,
            standard_file,
            effective_batch_size=8,
            max_steps=1,
            save_every=0,
            **fields,
        )
        runs[name] = train(config)
    assert groupings == [[1] * 8, [1] * 8, [8]]
    weights = {name: load_file(str(run / "final" / "model.safetensors")) for name, run in runs.items()}
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights["all"][key], start[key]), "the step must change the weights"
    for name in ("one_token", "all"):
        for key in weights["pairs"]:
            assert_close(weights[name][key], weights["pairs"][key], atol=1e-6, rtol=1e-5)
        assert losses_by_step(runs[name])[1] == pytest.approx(losses_by_step(runs["pairs"])[1], abs=1e-6)


def test_auto_budget_is_pairs_on_cpu(tiny_model_dir, standard_file, tmp_path):
    """'auto' keeps micro_batch_size pairs per forward on CPU (16384 tokens is the GPU setting)."""
    from dpokit.train.run import setup_run

    config = make_config(tmp_path, tiny_model_dir, standard_file)
    assert config.micro_batch_tokens == "auto"
    run = setup_run(config, console=None)
    assert run.micro_batch_tokens is None
