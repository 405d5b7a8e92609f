"""Under DDP every process's watchdog reads the same held-out metrics (each process evaluates a share of
the batches; the sums are gathered) and the same samples (the main process's, broadcast), so a stop on them
(with stop_on_critical) comes in every process at once, with the same finding. Before, the main process
alone evaluated and sampled, and only its watchdog saw them: it stopped alone, and the other process waited
for it in the next step's all-reduce (here for ever; under torchrun until the launcher, seeing the first
one fail, killed it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from launching import environment

WORKER = Path(__file__).with_name("watchdog_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize(("what", "code"), [("eval", "non_finite_metrics"), ("samples", "gibberish")])
def test_a_stop_on_what_the_main_process_computes_comes_in_every_process(
    what, code, tmp_path, tiny_model_dir, pairs_file
):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*launcher, str(WORKER), what, str(tmp_path), str(tiny_model_dir), str(pairs_file)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment())
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        everyone = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for victim in everyone:  # the workers too: each is in a session of its own
            victim.kill()
        pytest.fail("hung: one process stopped and the other waited for it")
    assert process.returncode == 0, stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 2 and code in ranks[0]["codes"], ranks
    assert not (tmp_path / "run" / "final").exists()
