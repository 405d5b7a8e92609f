"""Under FSDP2 only rank 0 reads the model's weights (2 gloo processes): the other process builds the model
on the meta device, never calls `from_pretrained`, and once sharded holds rank 0's weights and buffers,
equal to the model loaded normally. LoRA adapters (fresh ones, rank 0's random A, and saved ones) and tied
embeddings alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import environment
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from dpokit.models.loading import load_model
from tiny_models import TINY_SIZES

WORKER = Path(__file__).with_name("rank0_loading_worker.py")
INPUT_IDS = torch.arange(12).reshape(2, 6)  # (B, T): the worker's forward input


def load_on_two(tmp_path: Path, *settings: str) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Each process's (gathered weights, buffers and logits; what it read) after the worker loaded the
    policy and reference of a run configured by `settings` under FSDP2."""
    out = tmp_path / "out"
    out.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*launcher, str(WORKER), str(out), *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-4000:]
    return [
        (load_file(out / f"rank-{rank}.safetensors"), json.loads((out / f"rank-{rank}.json").read_text()))
        for rank in range(2)
    ]


def assert_only_rank0_read(ranks: list[tuple[dict, dict]], models: int) -> None:
    """Rank 0 loaded each model with `from_pretrained`; rank 1 never did, and its weights were all on the
    meta device when the fill from rank 0 began."""
    (_, first), (_, second) = ranks
    assert len(first["read"]) == models and first["on_meta"] == [False] * models
    assert second["read"] == [] and second["on_meta"] == [True] * models


def assert_same_on_both(ranks: list[tuple[dict, dict]]) -> None:
    (first, _), (second, _) = ranks
    assert first.keys() == second.keys()
    for name in first:
        assert_close(second[name], first[name], atol=0, rtol=0, msg=name)


def assert_holds(
    held: dict[str, torch.Tensor], prefix: str, model: torch.nn.Module, wrapper: str = ""
) -> None:
    """`held` (one process's, under `prefix`) has `model`'s buffers and logits, and its weights unless the
    model was wrapped (`wrapper`: the PEFT wrapper's name prefix)."""
    if not wrapper:
        for name, value in model.state_dict().items():
            assert_close(held[f"{prefix}/weight/{name}"], value, atol=0, rtol=0, msg=name)
    for name, value in model.named_buffers():
        assert_close(held[f"{prefix}/buffer/{wrapper}{name}"], value, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits  # (B, T, V)
    assert_close(held[f"{prefix}/logits"], logits, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose LM head is its input embedding (as SmolLM2's is)."""
    path = tmp_path_factory.mktemp("tied-model")
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), **(TINY_SIZES | {"tie_word_embeddings": True}))
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_full_fine_tune_policy_and_tied_live_reference(tiny_model_dir, tied_model_dir, tmp_path):
    """Policy and live reference (a model with tied embeddings) both filled from rank 0: every process holds
    the normally loaded weights and buffers (Llama's rotary inv_freq, outside the state dict), computes the
    same logits, and keeps the reference's LM head tied to its embeddings."""
    ranks = load_on_two(
        tmp_path,
        f"model={tiny_model_dir}",
        f"reference_model={tied_model_dir}",
        "use_lora=false",
        "reference_mode=live",
    )
    assert_only_rank0_read(ranks, models=2)
    assert_same_on_both(ranks)
    held, read = ranks[1]
    assert_holds(held, "policy", load_model(str(tiny_model_dir)))
    assert_holds(held, "reference", load_model(str(tied_model_dir)))
    assert [read["tied"] for _, read in ranks] == [{"policy": False, "reference": True}] * 2


@pytest.mark.slow
def test_fresh_lora_adapters_come_from_rank0(tiny_model_dir, tmp_path):
    """LoRA with gradient checkpointing, the adapter-disabled base as a live reference: rank 0's freshly
    drawn lora_A reach rank 1; lora_B starts at zero, so the logits are the base model's."""
    ranks = load_on_two(
        tmp_path,
        f"model={tiny_model_dir}",
        "use_lora=true",
        "reference_mode=live",
        "gradient_checkpointing=true",
    )
    assert_only_rank0_read(ranks, models=1)
    assert_same_on_both(ranks)
    held, _ = ranks[1]
    lora_a = [value for name, value in held.items() if "lora_A" in name]
    assert lora_a and all(torch.count_nonzero(value) > 0 for value in lora_a)
    assert_holds(held, "policy", load_model(str(tiny_model_dir)), wrapper="base_model.model.")


@pytest.mark.slow
def test_saved_adapter_trains_on_from_rank0(tiny_model_dir, tmp_path):
    """A LoRA run whose model is a saved adapter: every process holds the base and the saved adapter
    weights, and computes the adapted model's logits."""
    adapter_dir = tmp_path / "adapter"
    torch.manual_seed(3)
    adapted = get_peft_model(
        load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # non-zero: the adapter changes the logits
    adapted.save_pretrained(adapter_dir)
    ranks = load_on_two(tmp_path, f"model={adapter_dir}", "use_lora=true", "reference_mode=live")
    assert_only_rank0_read(ranks, models=1)
    assert_same_on_both(ranks)
    held, _ = ranks[1]
    assert_holds(held, "policy", adapted.eval())  # the saved adapter with its base: weights and all
