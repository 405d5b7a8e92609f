"""2 processes == 1 process: DDP over gloo on CPU, launched with accelerate, logs the same losses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run(processes: int, model_dir: Path, data: Path, out: Path) -> list[float]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [
        accelerate, "launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dpokit.cli", "train",
        f"model={model_dir}", f"train_data={data}", "eval_data=null", "use_lora=false", "learning_rate=1e-4",
        "allow_risky_hyperparameters=true", "effective_batch_size=8", "micro_batch_size=2", "num_epochs=2",
        f"output_dir={out}", "sample_prompts=null", f"cache_dir={out}-cache", "report_to=[]", "warmup_ratio=0",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dir, standard_file, tmp_path):
    """Each process takes half of every step's 8 pairs; gradients are weighted so the average over processes
    equals the single-process mean over all 8, step after step."""
    one = run(1, tiny_model_dir, standard_file, tmp_path / "one")
    two = run(2, tiny_model_dir, standard_file, tmp_path / "two")
    assert len(one) == 4
    assert two == pytest.approx(one, abs=1e-6)
    assert one[-1] < one[0]
