"""`dpokit export --merge` writes a model transformers loads with the adapter's outputs; `dpokit eval` on a
LoRA run uses the base as reference by default."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dpokit.cli import app
from dpokit.config import RunConfig
from dpokit.data.prepare import load_pairs
from dpokit.logprobs import padded_pair_logps
from dpokit.models.loading import load_adapter, load_model, load_tokenizer
from dpokit.train.loop import train


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from tiny_models import STANDARD_ROWS, write_jsonl

    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(tmp / "pairs.jsonl", STANDARD_ROWS)
    config = RunConfig(
        model=str(tiny_model_dir), train_data=str(data), eval_data=None, use_lora=True, lora_r=4,
        learning_rate=5e-2, allow_risky_hyperparameters=True, effective_batch_size=4, micro_batch_size=4,
        warmup_ratio=0.0, output_dir=str(tmp / "run"), cache_dir=str(tmp / "cache"), sample_prompts=None,
        report_to=[], save_every=0,
    )  # fmt: skip
    return train(config), data


def test_export_merge_matches_the_adapter(lora_run, tiny_model_dir, tmp_path):
    run_dir, data = lora_run
    result = CliRunner().invoke(app, ["export", str(run_dir), "--merge", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    pairs, _ = load_pairs(str(data), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    adapter = load_adapter(str(run_dir / "final"), load_model(str(tiny_model_dir)))
    with torch.no_grad():
        expected, got = logps_fn(adapter, pairs), logps_fn(merged, pairs)
        base = logps_fn(load_model(str(tiny_model_dir)), pairs)
    assert_close(got.chosen, expected.chosen, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(base.chosen, expected.chosen, atol=1e-3), "training changed the model"


def test_export_without_merge_of_an_adapter_is_refused(lora_run, tmp_path):
    run_dir, _ = lora_run
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "holds a LoRA adapter; pass --merge" in result.output
    assert not (tmp_path / "x").exists()


def test_eval_of_an_adapter_uses_the_base_as_reference(lora_run, tiny_model_dir, tmp_path):
    """Rewards are beta * (policy - base) log-ratios: recomputed here from the two models directly."""
    run_dir, data = lora_run
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        app, ["eval", "--policy", str(run_dir / "final"), "--data", str(data), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = load_pairs(str(data), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        policy = logps_fn(load_adapter(str(run_dir / "final"), load_model(str(tiny_model_dir))), pairs)
        base = logps_fn(load_model(str(tiny_model_dir)), pairs)
    rewards_chosen = 0.1 * (policy.chosen - base.chosen)
    rewards_rejected = 0.1 * (policy.rejected - base.rejected)
    assert metrics["rewards/chosen"] == pytest.approx(rewards_chosen.mean().item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(
        (rewards_chosen - rewards_rejected).mean().item(), abs=1e-5
    )
    assert metrics["rewards/accuracies"] == pytest.approx(
        (rewards_chosen > rewards_rejected).float().mean().item()
    )
    assert metrics["num_pairs"] == 16
