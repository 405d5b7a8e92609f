"""examples/sentiment: the shipped on-policy run (SmolLM2-135M-Instruct + LoRA, VADER judge).

The fast test checks the config and the prompt files; the slow one runs the example as a user would, through
the CLI, and checks the targets of issue 10 on its rounds.jsonl (CI: `make test-slow`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.online.config import load_iterate_config
from dpokit.online.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sentiment"


def test_config_loads_and_prompt_files_are_disjoint(monkeypatch) -> None:
    """320 training and 64 held-out prompts, no prompt and no reviewed subject in both files."""
    monkeypatch.chdir(ROOT)  # the config names its prompt files relative to the repository root
    config = load_iterate_config(EXAMPLE / "config.yaml")
    assert config.judge == "vader" and config.train.model == "smollm2" and config.train.use_lora
    train, heldout = read_prompts(config.prompts), read_prompts(config.eval_prompts)
    assert (len(train), len(heldout)) == (320, 64)
    assert not set(train) & set(heldout)
    assert (EXAMPLE / "train_prompts.txt").read_text().splitlines() == train  # no blank or repeated lines


def test_prompt_files_are_what_the_committed_script_writes(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("make_prompts", EXAMPLE / "make_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    for name in ("train_prompts.txt", "heldout_prompts.txt"):
        assert (tmp_path / name).read_text() == (EXAMPLE / name).read_text()


@pytest.mark.slow
def test_sentiment_example_reaches_the_targets(tmp_path: Path) -> None:
    run_dir = tmp_path / "sentiment"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpokit.cli",
            "iterate",
            "examples/sentiment/config.yaml",
            f"output_dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    assert all(isinstance(r["kl"], float) and math.isfinite(r["kl"]) for r in rounds)
    start, last = rounds[0], rounds[-1]
    assert start["kl"] == 0.0  # round 0 is the reference itself
    assert start["reward_mean"] < last["reward_mean"] - 0.2
    assert last["reward_mean"] >= 0.9
    assert last["win_rate_vs_reference"] >= 0.85
