"""QLoRA: a 4-bit NF4 base (bitsandbytes, on CPU here) with LoRA adapters trains, and its reference is the
quantized base itself with the adapters disabled."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpokit.config import RunConfig
from dpokit.data.prepare import load_pairs
from dpokit.logprobs import padded_pair_logps
from dpokit.models.loading import add_lora, load_model, load_tokenizer, reference_context
from dpokit.train.loop import train

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_model_dir(tmp_path_factory, tiny_tokenizer):
    """bitsandbytes' CPU 4-bit kernels need wider matrices than the shared tiny model has."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("qlora-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_qlora_reference_is_the_quantized_base(qlora_model_dir, standard_file):
    tokenizer = load_tokenizer(str(qlora_model_dir))
    pairs, _ = load_pairs(str(standard_file), tokenizer, 1024)
    logps_fn = partial(padded_pair_logps, pad_token_id=tokenizer.pad_token_id)
    base = load_model(str(qlora_model_dir), load_in_4bit=True)
    assert any("4bit" in type(m).__name__ for m in base.modules()), "weights are 4-bit"
    with torch.no_grad():
        expected = logps_fn(base, pairs[:4])
    policy = add_lora(base, 4, 8, 0.0, "all-linear", quantized=True)
    with reference_context(policy, None) as reference:
        got = logps_fn(reference, pairs[:4])
    assert torch.equal(got.chosen, expected.chosen)


def test_qlora_run_learns(qlora_model_dir, standard_file, tmp_path):
    config = RunConfig(
        model=str(qlora_model_dir), train_data=str(standard_file), eval_data=None, use_lora=True,
        load_in_4bit=True, lora_r=4, learning_rate=1e-2, allow_risky_hyperparameters=True,
        effective_batch_size=4, micro_batch_size=2, warmup_ratio=0.0, output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), sample_prompts=None, report_to=[], save_every=0,
    )  # fmt: skip
    run_dir = train(config)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(0.693147, abs=1e-4)  # policy == quantized reference at step 1
    assert losses[-1] < losses[0]
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
