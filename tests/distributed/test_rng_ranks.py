"""Checkpoints hold every process's RNG state and each process restores its own: after a resume, process 1
draws what it would have drawn uninterrupted, not what process 0 would have."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import environment

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
