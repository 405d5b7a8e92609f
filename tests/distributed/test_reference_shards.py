"""The reference precompute split over 2 gloo processes: each pair computed once, by one process, and the
gathered table equal to the 1-process one; the cache is written once and then read by the main process alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import environment
from torch.testing import assert_close

from tiny_models import STANDARD_ROWS, write_jsonl

WORKER = Path(__file__).with_name("reference_worker.py")


def reference_pass(command: list[str], model_dir: Path, data: Path, tmp_path: Path, name: str) -> list[dict]:
    out, cache = tmp_path / name, tmp_path / f"{name}-cache"
    out.mkdir()
    args = [str(WORKER), str(model_dir), str(data), str(cache), str(out)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(cache.glob("*.safetensors"))) == 1, "one cache file"
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]


@pytest.mark.slow
def test_two_processes_compute_each_pair_once_and_equal_one(tiny_model_dir, tmp_path):
    rows = STANDARD_ROWS[:4] + [
        {**row, "prompt": f"{row['prompt']} ({i})"} for i, row in enumerate(STANDARD_ROWS[:7])
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)  # 11 distinct pairs: an odd count, shares of 6 and 5
    (one,) = reference_pass([sys.executable], tiny_model_dir, data, tmp_path, "one")
    two = reference_pass(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
        tiny_model_dir,
        data,
        tmp_path,
        "two",
    )
    assert sorted(one["miss"]["computed"]) == list(range(11))
    shares = [rank["miss"]["computed"] for rank in two]
    assert sorted(shares[0] + shares[1]) == list(range(11)), "each pair computed once, by one process"
    assert [len(share) for share in shares] == [6, 5]
    for rank in two:
        assert not rank["miss"]["hit"]
        assert_close(
            torch.tensor(rank["miss"]["table"]), torch.tensor(one["miss"]["table"]), atol=1e-5, rtol=1e-6
        )
        assert rank["hit"]["table"] == rank["miss"]["table"]
        assert rank["hit"]["hit"]
    # On a hit only the main process reads the cache and recomputes its first batch as a check.
    assert len(two[0]["hit"]["computed"]) == 3 and two[1]["hit"]["computed"] == []
