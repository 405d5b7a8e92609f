"""shard_model on a 1-process gloo group: FSDP2 units per decoder layer and LM head, and under bf16-mixed
FSDP2's MixedPrecisionPolicy computes in bf16 while master weights and reduced gradients stay float32."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dpokit.distributed import Engine, is_sharded, shard_model
from tiny_models import build_model


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_units_and_precision(process_group, compute_dtype):
    model = build_model(320).train()
    shard_model(model, Engine("fsdp2"), compute_dtype)
    assert is_sharded(model)
    assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert isinstance(model.lm_head, FSDPModule)
    logits = model(input_ids=torch.randint(0, 320, (2, 8))).logits  # (B, T, V)
    assert logits.dtype == (compute_dtype or torch.float32)
    logits.float().logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) and param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
