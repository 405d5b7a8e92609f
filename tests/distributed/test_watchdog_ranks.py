"""Under DDP the main process alone generates the periodic samples; every process's watchdog reads them, so
a stop on them (gibberish, with stop_on_critical) comes in every process at once. Before, only the main
process's watchdog saw samples: it stopped alone and the others waited for it in the next step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import environment

WORKER = Path(__file__).with_name("watchdog_worker.py")


@pytest.mark.slow
def test_a_stop_on_samples_comes_in_every_process(tmp_path, tiny_model_dir):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*launcher, str(WORKER), str(tmp_path), str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == ["gibberish"]
    assert ranks[0]["judge_means"] == ranks[1]["judge_means"]  # the main process's judge scores, on both
    assert set(ranks[1]["judge_means"]) == {"0", "2"}
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4  # written once, by the main process: 2 prompts, reference then policy
