"""Checkpoints hold every process's RNG state and each process restores its own: after a resume, process 1
draws what it would have drawn uninterrupted, not what process 0 would have; so a DDP run with LoRA dropout
(whose masks each process draws from its own generator) resumes to the uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import environment, records, run, settings, torchrun
from safetensors.torch import load_file
from torch.testing import assert_close

WORKER = Path(__file__).with_name("rng_worker.py")


@pytest.mark.slow
def test_each_of_two_processes_resumes_its_own_rng_state(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*launcher, str(WORKER), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "checkpoints" / "step-000001"
    assert sorted(p.name for p in checkpoint.glob("rng-rank*")) == [
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    ]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["resumed"] == rank["uninterrupted"]  # torch, Python and NumPy generators alike
    for generator in ("torch", "python", "numpy"):
        assert ranks[1]["resumed"][generator] != ranks[0]["resumed"][generator], generator


def stopped_after(run_dir: Path, copy: Path, step: int) -> None:
    """`copy`: `run_dir` as a kill right after checkpoint `step` leaves it (no later checkpoint, no final/),
    exactly at that step whatever the timing (a real kill races the tiny model's 15 steps a second)."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "final")
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if checkpoint.name > f"step-{step:06d}":
            shutil.rmtree(checkpoint)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:06d}")


@pytest.mark.slow
def test_ddp_with_lora_dropout_resumed_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path):
    """Each process's pairs have their own lengths, so each draws its own number of dropout values and the
    generators part ways (checked in the checkpoint resumed from). Had process 1 resumed with process 0's
    state, as before checkpoints held every process's, it would drop other units and the losses would differ
    (checked by hand: 0.6136 against 0.6122 one step after)."""
    lora = [
        "use_lora=true",
        "lora_dropout=0.5",
        "learning_rate=1e-2",
        "eval_data=null",
        "sample_prompts=null",
    ]
    args = [*lora, "num_epochs=3", "keep_checkpoints=10"]  # 6 steps, every checkpoint kept
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(torchrun(2, settings(tiny_model_dir, pairs_file, whole, *args), "ddp"), whole)
    stopped_after(whole, resumed, step=3)
    checkpoint = resumed / "checkpoints" / "step-000003"
    states = [load_file(str(checkpoint / f"rng-rank{rank}.safetensors")) for rank in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"]), "the processes' generators parted ways"
    run(torchrun(2, [*settings(tiny_model_dir, pairs_file, resumed, *args), "--resume"], "ddp"), resumed)
    have = [(r["step"], r["loss"]) for r in records(resumed)]
    want = [(r["step"], r["loss"]) for r in records(whole)]
    assert [step for step, _ in have] == [step for step, _ in want] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in have] == pytest.approx([loss for _, loss in want], abs=1e-6)
    adapters = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    expected = load_file(str(whole / "final" / "adapter_model.safetensors"))
    for name in expected:
        assert_close(adapters[name], expected[name], atol=1e-6, rtol=0)
