"""The distributed engines on CUDA with NCCL, as users run them: the CPU tests' gloo runs cannot show that
FSDP2's and its CPU offload's device moves, or NCCL's collectives, train as one process does.

    bash benchmarks/gpu/check_distributed.sh     # on a lent GPU machine; results under $OUT

1 GPU: torchrun with 1 process under fsdp2, and fsdp2-offload started by dpokit itself, bf16-mixed, against the plain single-process
bf16-mixed run. 2 GPUs or more: DDP and FSDP2 with 2 processes against it too. Skipped without CUDA.

Tolerances, from the same comparisons run on CPU with gloo (bf16 keeps 8 significant bits on either device;
only the kernels' order of accumulation differs). Losses: within 1.1e-4 of the plain process for 1-process
FSDP2 (its MixedPrecisionPolicy gathers every weight in bf16, norms and embeddings too, which autocast keeps
in fp32), 5.5e-5 for 2-process FSDP2, 1.5e-5 for 2-process DDP; LOSS_ATOL is 9x the worst and 7% of the 0.014
the loss moves in 4 steps. Weights: AdamW moves a weight by ~lr either way where its gradient is near zero,
so single weights differ by up to 2 lr; the whole update agrees instead, within 4.7% of its norm for FSDP2
and 1% for DDP; UPDATE_RTOL is 4x the worst, where an update left unapplied differs by 100%.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launching import records, run, settings, single, torchrun, update_difference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)"),
]

BF16 = "precision=bf16-mixed"
LOSS_ATOL = 1e-3
UPDATE_RTOL = 0.2


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    """The plain single-process bf16-mixed run on the GPU, no launcher: what every engine is compared with."""
    out = tmp_path_factory.mktemp("one-gpu") / "run"
    run(single(settings(tiny_model_dir, pairs_file, out, BF16)), out)
    return out


def assert_trains_as(got: Path, expected: Path, start: Path) -> None:
    """The same records with losses within LOSS_ATOL; float32 final weights whose update from `start`
    differs from `expected`'s by less than UPDATE_RTOL of its norm."""
    have, want = records(got), records(expected)
    assert [(r["split"], r["step"]) for r in have] == [(r["split"], r["step"]) for r in want]
    assert [r["loss"] for r in have] == pytest.approx([r["loss"] for r in want], abs=LOSS_ATOL)
    assert update_difference(got, expected, start) < UPDATE_RTOL


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp2-offload"])
def test_one_gpu_fsdp2_bf16_mixed_equals_one_process(engine, one_gpu, tiny_model_dir, pairs_file, tmp_path):
    """FSDP2 on the GPU (and with its shards, gradients and AdamW state offloaded to CPU memory) trains as
    the plain process does. fsdp2 under torchrun with 1 process; fsdp2-offload started by dpokit itself,
    one process per visible GPU (`--distributed` with no `--num-processes`)."""
    out = tmp_path / engine
    args = settings(tiny_model_dir, pairs_file, out, BF16)
    run(torchrun(1, args, engine) if engine == "fsdp2" else [*single(args), "--distributed", engine], out)
    assert_trains_as(out, one_gpu, tiny_model_dir)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_gpus_equal_one_process(engine, one_gpu, tiny_model_dir, pairs_file, tmp_path):
    """2 processes on 2 GPUs under NCCL, each taking half of every step's pairs, train as 1 process does."""
    out = tmp_path / engine
    run(torchrun(2, settings(tiny_model_dir, pairs_file, out, BF16), engine), out)
    assert_trains_as(out, one_gpu, tiny_model_dir)
