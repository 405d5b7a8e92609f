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
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
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


def exit_worker() -> None:
    """End a torchrun worker script at once, its output flushed, skipping the interpreter's finalization:
    there, now and then, gloo's threads abort a process whose work is done ("terminate called without an
    active exception", with destroy_process_group or without; seen in 4 of about 45 runs of
    reference_worker.py on 2 busy cores; pytorch/pytorch#179291 describes the race). Call it after a
    barrier, so that no process leaves while another still needs it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def environment() -> dict[str, str]:
    # One thread per process: two processes on a small CI machine would otherwise fight over its cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], out: Path, expect: int = 0) -> str:
    """Run a training command to its end; returns its stderr. Fails with that stderr's tail if the exit
    status is not `expect`."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment())
    assert result.returncode == expect, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return result.stderr


def kill_once_written(command: list[str], marker: Path, what: str) -> None:
    """Start `command` and SIGKILL the launcher and all its processes as soon as `marker` exists (`what` names
    it in the failure messages); returns once every one of them is gone.

    The processes are found by walking the launcher's children: torchrun starts each worker in a session
    of its own, so a kill of the launcher's process group would leave the workers training on."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment()
    )
    launcher = psutil.Process(process.pid)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.02)
    victims = [launcher, *launcher.children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=60)
    process.wait()


def worker(rank: int) -> Callable[[psutil.Process], psutil.Process]:
    """The worker process of `rank` among a launcher's children."""

    def pick(launcher: psutil.Process) -> psutil.Process:
        [found] = [p for p in launcher.children(recursive=True) if p.environ().get("RANK") == str(rank)]
        return found

    return pick


def signal_during_training(
    command: list[str], out: Path, target: Callable[[psutil.Process], psutil.Process], signum: int
) -> subprocess.CompletedProcess:
    """Start a launched run and, once its first training step is logged, send `signum` to the one process
    `target(launcher)` picks (the launcher itself, or `worker(rank)`); returns the launcher's exit status and
    output once it is gone. Fails if it is still running a minute later: the other processes would then be
    waiting for that one."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment()
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert process.poll() is None, f"the run ended before its first step: {process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no training step in time"
        time.sleep(0.02)
    launcher = psutil.Process(process.pid)
    target(launcher).send_signal(signum)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for victim in [launcher, *launcher.children(recursive=True)]:
            victim.kill()
        output, _ = process.communicate()
        pytest.fail(f"the run hung after the signal: {output[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


def kill_after_first_checkpoint(command: list[str], out: Path) -> None:
    """Start a run and SIGKILL the launcher and all its processes as soon as a checkpoint is published."""
    kill_once_written(command, out / "checkpoints" / "latest", "a checkpoint")


def resume_on_other_process_counts(
    first: Callable[[list[str]], list[str]],
    second: Callable[[list[str]], list[str]],
    args: list[str],
    out: Path,
) -> str:
    """Start a run with `first(args)` and SIGKILL it once step 1's checkpoint exists; resume it with
    `second(...)` and SIGKILL that once step 3's exists; resume it with `first(...)` to the end. Each resume
    reads a checkpoint written by the other launch's processes. Returns the last resume's stderr."""
    kill_after_first_checkpoint(first(args), out)
    resume = [*args, "--resume"]
    kill_once_written(second(resume), out / "checkpoints" / "step-000003", "step 3's checkpoint")
    assert not (out / "final").exists(), "the second kill landed after the end"
    return run(first(resume), out)


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


def update_difference(got: Path, expected: Path, start: Path) -> float:
    """|u - v| / |v| for the whole weight updates u and v (final/ minus the model at `start`) of runs `got`
    and `expected`, after checking both final/ hold the same float32 weights. Under bf16, AdamW moves weights
    whose gradient is near zero by about lr either way, so single weights differ by up to 2 lr; the whole
    update is what agrees."""
    initial = load_file(str(start / "model.safetensors"))
    final = load_file(str(got / "final" / "model.safetensors"))
    reference = load_file(str(expected / "final" / "model.safetensors"))
    assert final.keys() == reference.keys() and {w.dtype for w in final.values()} == {torch.float32}
    update = torch.cat([(final[n] - initial[n]).flatten() for n in sorted(final)])
    wanted = torch.cat([(reference[n] - initial[n]).flatten() for n in sorted(final)])
    assert wanted.norm() > 0, "the expected run did not train"
    return float((update - wanted).norm() / wanted.norm())


LORA_LIVE = [
    "use_lora=true",
    "learning_rate=1e-3",
    "reference_mode=live",
    "eval_data=null",
    "gradient_checkpointing=true",
]


def assert_lora_resume_equals_one_process(
    launch: Callable[[list[str]], list[str]], model_dir: Path, data: Path, tmp_path: Path
) -> None:
    """LoRA with gradient checkpointing and the adapter-disabled base as a live reference, launched on 2
    processes by `launch(args)`, killed once a checkpoint exists and resumed, ends as 1 process does: the same
    steps and losses, the same adapters (and trained ones: lora_B moved off zero), within 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(single(settings(model_dir, data, one, *LORA_LIVE)), one)
    args = settings(model_dir, data, two, *LORA_LIVE)
    kill_after_first_checkpoint(launch(args), two)
    assert not (two / "final").exists(), "the kill landed before the end"
    run(launch([*args, "--resume"]), two)
    have = [(r["step"], r["loss"]) for r in records(two)]
    want = [(r["step"], r["loss"]) for r in records(one)]
    assert [step for step, _ in have] == [step for step, _ in want]
    assert [loss for _, loss in have] == pytest.approx([loss for _, loss in want], abs=1e-5)
    adapters = load_file(str(two / "final" / "adapter_model.safetensors"))
    expected = load_file(str(one / "final" / "adapter_model.safetensors"))
    assert adapters.keys() == expected.keys()
    for name in adapters:
        assert_close(adapters[name], expected[name], atol=1e-5, rtol=0)
    assert torch.count_nonzero(next(v for k, v in adapters.items() if "lora_B" in k)) > 0
