"""Run by test_rank0_loading.py under torchrun (gloo): load the policy and the frozen reference as
`dpokit train --distributed fsdp2` does, recording which processes read weights from disk; writes what
each process then holds, gathered whole, to OUT/rank-R.safetensors and what it read to OUT/rank-R.json.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/rank0_loading_worker.py \
    OUT model=MODEL_DIR use_lora=false reference_mode=live
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from launching import exit_worker
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel

from dpokit.config import RunConfig
from dpokit.distributed import Engine, make_accelerator
from dpokit.train.precision import resolve_precision
from dpokit.train.run import load_policy, load_reference

run_module = importlib.import_module("dpokit.train.run")  # the package's `train` attribute is the function


def recorded(read: list[str], on_meta: list[bool]) -> None:
    """Record every `from_pretrained` weight load, and whether a model's weights were all on the meta device
    when `fill_from_rank0` came to fill them."""
    from_pretrained = PreTrainedModel.from_pretrained.__func__

    def reading(cls, name, *args, **kwargs):
        read.append(str(name))
        return from_pretrained(cls, name, *args, **kwargs)

    fill = run_module.fill_from_rank0

    def filling(model, *args, **kwargs):
        on_meta.append(all(p.to_local().is_meta for p in model.parameters()))
        fill(model, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(reading)
    run_module.fill_from_rank0 = filling


def held(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The model's weights gathered whole from every process's shards, its buffers, and its logits on a
    fixed input (all processes run that forward together)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    tensors = {f"{prefix}weight/{name}": value.detach().clone() for name, value in weights.items()}
    tensors |= {f"{prefix}buffer/{name}": b.detach().clone() for name, b in model.named_buffers()}
    with torch.no_grad():
        logits = model(input_ids=torch.arange(12).reshape(2, 6)).logits  # (B, T, V)
    tensors[f"{prefix}logits"] = logits.detach().clone()
    return tensors


def main(out: str, *settings: str) -> None:
    accelerator = make_accelerator()
    values = dict(setting.split("=", 1) for setting in settings)
    config = RunConfig(train_data=str(Path(out) / "unused.jsonl"), **values)
    precision = resolve_precision("fp32", accelerator.device)
    read: list[str] = []
    on_meta: list[bool] = []
    recorded(read, on_meta)
    policy = load_policy(config, precision, accelerator.device, Engine("fsdp2"))
    reference = load_reference(config, precision, accelerator.device, Engine("fsdp2"))
    models = {"policy": policy} | ({"reference": reference} if reference is not None else {})
    tensors = {}
    for prefix, model in models.items():
        tensors |= held(model, f"{prefix}/")
    rank = accelerator.process_index
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out) / f"rank-{rank}.safetensors"))
    tied = {prefix: ties_embeddings(model) for prefix, model in models.items()}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"read": read, "on_meta": on_meta, "tied": tied}))
    accelerator.wait_for_everyone()


def ties_embeddings(model: torch.nn.Module) -> bool:
    """Whether the LM head and the input embeddings are one parameter (as the model's config asks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight is base.get_input_embeddings().weight


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_worker()
