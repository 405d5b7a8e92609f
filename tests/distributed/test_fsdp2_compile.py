"""FSDP2 with `compile: true` over gloo on CPU, 2 processes: each decoder layer compiled by inductor (whose CPU
kernels a C++ compiler builds), then sharded, trains as 1 uncompiled process does."""

from __future__ import annotations

import pytest
from launching import assert_same_training, run, settings, torchrun


@pytest.mark.slow  # compiling takes about two minutes on two cores
def test_fsdp2_compiled_two_processes_equal_one(
    one_process, tiny_model_dir, pairs_file, tmp_path, monkeypatch
):
    """Losses and final weights within 1e-5 of the 1-process eager run. Measured: 1e-7 on losses, 2e-8 on
    weights. Fused kernels round differently from eager ones, but the reference log-probs come from the same
    compiled layers, so the roundings cancel in the loss; 1e-5 leaves a wide margin for other CPUs' kernels
    and stays 10x below one AdamW step (lr 1e-4), so a step lost or doubled on a shard fails.

    A fresh inductor cache: the compiled C++ kernels it fills show that inductor ran, not an eager fallback.
    The packed attention stays outside the graphs (a graph break by design, `torch.compiler.disable`).
    """
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # `run` passes the environment on
    out = tmp_path / "fsdp2-compiled"
    run(torchrun(2, settings(tiny_model_dir, pairs_file, out, "compile=true"), "fsdp2"), out)
    assert any(cache.rglob("*.so")), "inductor built no kernels"
    assert_same_training(out, one_process, atol=1e-5)
