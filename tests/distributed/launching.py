"""Launching dpokit training on CPU with gloo, as users launch it on GPUs: torchrun or accelerate launch.

The config is small enough for CI (16 tiny pairs, 4 optimizer steps of 8 pairs, greedy samples of 4 tokens
every 2 steps from prompts.txt beside the pairs) and saves every step, so a kill always has a checkpoint to
resume from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from dpokit.distributed import preset_path

TIMEOUT = 600


def settings(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={model_dir}", f"train_data={data}", f"eval_data={data}", "use_lora=false",
        "learning_rate=1e-4", "allow_risky_hyperparameters=true", "effective_batch_size=8", "micro_batch_size=2",
        "num_epochs=2", "save_every=1", f"sample_prompts={data.with_name('prompts.txt')}", "sample_every=2",
        "sample_max_new_tokens=4", "report_to=[]", "warmup_ratio=0",
        f"output_dir={out}", f"cache_dir={out}-cache", *extra,
    ]  # fmt: skip


def single(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpokit.cli", "train", *args]


def torchrun(processes: int, args: list[str], engine: str) -> list[str]:
    # --standalone: a free rendezvous port of its own, so concurrent test runs on one machine never meet.
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
    ]
    return [*launcher, "-m", "dpokit.cli", "train", *args, "--distributed", engine]


def accelerate_launch(processes: int, args: list[str], preset: str) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_path(preset))]
    return [*launcher, "--num_processes", str(processes), "-m", "dpokit.cli", "train", *args]


def environment() -> dict[str, str]:
    # One thread per process: two processes on a small CI machine would otherwise fight over its cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], out: Path, expect: int = 0) -> str:
    """Run a training command to its end; returns its stderr. Fails with that stderr's tail if the exit
    status is not `expect`."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment())
    assert result.returncode == expect, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return result.stderr


def kill_after_first_checkpoint(command: list[str], out: Path) -> None:
    """Start a run and SIGKILL the launcher and all its processes as soon as a checkpoint is published."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "latest").exists():
        assert process.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if r["split"] == "train"]


def assert_same_training(got: Path, expected: Path, atol: float = 1e-6) -> None:
    """The same records (one per step and split: written by one process) with the same losses, and the
    same final weights, within float tolerance."""
    have, want = records(got), records(expected)
    assert [(r["split"], r["step"]) for r in have] == [(r["split"], r["step"]) for r in want]
    for a, b in zip(have, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol), (a, b)
    final = load_file(str(got / "final" / "model.safetensors"))
    reference = load_file(str(expected / "final" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for name in final:
        assert_close(final[name], reference[name], atol=atol, rtol=0)
