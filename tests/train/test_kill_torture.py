"""kill -9 torture: a run killed with SIGKILL at many moments and resumed each time ends exactly as the
uninterrupted run — one metrics record per step, the same losses and final weights, a loadable model.

Kills land at random times, and also the moment a checkpoint or the final model starts being written
(a `.partial-*` path appears) or a metrics line is appended, so the save sequence itself gets hit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from tiny_models import STANDARD_ROWS, write_jsonl

pytestmark = pytest.mark.slow

KILLS = 20
STEPS = 24  # 48 train pairs (16 held out), 4 per step, 2 epochs


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", STANDARD_ROWS * 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nHello there,\n")
    config = dict(
        model=str(model_dir), train_data=str(data), eval_data=None, eval_split=0.25, use_lora=False,
        learning_rate=1e-3, allow_risky_hyperparameters=True, effective_batch_size=4, micro_batch_size=2,
        num_epochs=2, warmup_ratio=0.0, save_every=1, keep_checkpoints=2, eval_every=5, sample_every=7,
        sample_prompts=str(prompts), sample_max_new_tokens=4, judge="none", report_to=[],
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "dpokit.cli", "train", str(config), f"output_dir={run_dir}", "--resume"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def partial_paths(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".partial-*")) + list(run_dir.glob("checkpoints/.partial-*"))


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def kill_at_some_moment(process: subprocess.Popen, run_dir: Path, rng: random.Random, whole: float) -> bool:
    """SIGKILL `process` at a moment chosen by `rng`; returns False when it finished first.

    time: after a random share of the uninterrupted run's duration; record: once metrics.jsonl has grown
    by 1-4 lines; partial: the moment a `.partial-*` temporary exists (else, once it has grown by 3 lines).
    """
    how = rng.choice(["time", "record", "partial"])
    deadline = time.monotonic() + (rng.uniform(0.05, 0.6) * whole if how == "time" else 3 * whole)
    grow = rng.randint(1, 4) if how == "record" else 3
    metrics_lines = lines(run_dir / "metrics.jsonl")
    while time.monotonic() < deadline and process.poll() is None:
        if how == "partial" and partial_paths(run_dir):
            break
        if how != "time" and lines(run_dir / "metrics.jsonl") >= metrics_lines + grow:
            break
        time.sleep(0.0005)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def train_records(run_dir: Path) -> list[tuple[str, int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in records]


def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    began = time.monotonic()
    whole = start(config, tmp_path / "whole")
    assert whole.wait() == 0, whole.stderr.read()
    duration = time.monotonic() - began

    run_dir = tmp_path / "tortured"
    rng = random.Random(int(os.environ.get("DPOKIT_TORTURE_SEED", "0")))
    kills = 0
    for _ in range(3 * KILLS):
        if kills == KILLS:
            break
        kills += kill_at_some_moment(start(config, run_dir), run_dir, rng, duration)
        if (run_dir / "final").exists() and (run_dir / "summary.json").exists():
            break  # finished before a kill landed
    last = start(config, run_dir)
    assert last.wait() == 0, last.stderr.read()
    assert kills >= KILLS // 2, f"only {kills} kills landed"

    expected, got = train_records(tmp_path / "whole"), train_records(run_dir)
    assert [r[:2] for r in got] == [r[:2] for r in expected], "exactly one record per step and eval, in order"
    assert [r[1] for r in got if r[0] == "train"] == list(range(1, STEPS + 1))
    for (split, step, loss), (_, _, want) in zip(got, expected):
        assert loss == pytest.approx(want, abs=1e-6), f"{split} step {step}"
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    reference = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    for name, tensor in reference.items():
        assert_close(final[name], tensor, atol=1e-6, rtol=0)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "whole" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"], s["text"]) for s in samples] == [
        (s["step"], s["prompt"], s["text"]) for s in want
    ]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None
    assert not partial_paths(run_dir), "a finished run leaves no temporaries"
