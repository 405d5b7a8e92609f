"""The built-in demo end to end: `dpokit train` with no config, on the real SmolLM2-135M-Instruct.

This is the run the README's table comes from (about 6 minutes on 2 quiet CPU cores, model conversion and
reference precompute included), so it is marked slow; CI runs it with `make test-slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpokit.data.prepare import resolve_path


def test_demo_config_uses_every_shipped_pair_and_stays_in_the_lora_range() -> None:
    """The demo trains on all 368 pairs in 92 steps of 4 and evaluates on all 47 held-out pairs."""
    demo = yaml.safe_load(Path(resolve_path("builtin:demo")).read_text())
    train_rows = Path(resolve_path(demo["train_data"])).read_text().splitlines()
    eval_rows = Path(resolve_path(demo["eval_data"])).read_text().splitlines()
    assert (len(train_rows), len(eval_rows)) == (368, 47)
    assert "train_subset" not in demo and "eval_subset" not in demo
    assert len(train_rows) // demo["effective_batch_size"] == 92
    assert demo["use_lora"] and demo["learning_rate"] <= 1e-4


@pytest.mark.slow
def test_demo_moves_held_out_preferences_and_the_judge(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "train", "builtin:demo", f"output_dir={run_dir}"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"demo wall time: {seconds:.0f} s")

    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["step"] == 92
    # Policy == reference at step 0: every implicit reward is 0, so the loss is ln 2 and no pair is won.
    assert before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    # After one epoch (measured 0.525 / 0.894 / 0.464): clearly better on pairs it never saw.
    assert after["loss"] < 0.6
    assert after["rewards/accuracies"] > 0.8
    assert after["rewards/margins"] > 0.3
    # ... and fresh greedy answers to held-out prompts are far more positive (measured +0.363 -> +0.905).
    assert summary["judge_after"] - summary["judge_before"] > 0.3
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
