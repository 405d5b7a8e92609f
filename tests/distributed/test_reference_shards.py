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


def reference_pass(
    command: list[str], model_dir: Path, data: Path, tmp_path: Path, name: str, *options: str
) -> list[dict]:
    """Run the worker (batch size, engine: `options`); returns each process's record."""
    out, cache = tmp_path / name, tmp_path / f"{name}-cache"
    out.mkdir()
    args = [str(WORKER), str(model_dir), str(data), str(cache), str(out), *options]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=environment())
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(cache.glob("*.safetensors"))) == 1, "one cache file"
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]


ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.fixture
def eleven_pairs(tmp_path) -> Path:
    rows = STANDARD_ROWS[:4] + [
        {**row, "prompt": f"{row['prompt']} ({i})"} for i, row in enumerate(STANDARD_ROWS[:7])
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)  # 11 distinct pairs: an odd count


def pairs_of(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.mark.slow
def test_two_processes_compute_each_pair_once_and_equal_one(tiny_model_dir, eleven_pairs, tmp_path):
    """Batches of 3 (3+3+3+2 pairs) dealt in turn: shares of 6 and 5 pairs, each computed once, and the
    table equal to 1 process's to the bit (each batch is the one 1 process makes)."""
    (one,) = reference_pass(ONE, tiny_model_dir, eleven_pairs, tmp_path, "one", "3")
    two = reference_pass(TWO, tiny_model_dir, eleven_pairs, tmp_path, "two", "3")
    assert sorted(pairs_of(one["miss"]["computed"])) == list(range(11))
    shares = [pairs_of(rank["miss"]["computed"]) for rank in two]
    assert sorted(shares[0] + shares[1]) == list(range(11)), "each pair computed once, by one process"
    assert [len(share) for share in shares] == [6, 5]
    for rank in two:
        assert not rank["miss"]["hit"]
        assert rank["miss"]["table"] == one["miss"]["table"]
        assert rank["hit"]["table"] == rank["miss"]["table"]
        assert rank["hit"]["hit"]
    # On a hit only the main process reads the cache and recomputes its first batch as a check.
    assert len(pairs_of(two[0]["hit"]["computed"])) == 3 and two[1]["hit"]["computed"] == []


@pytest.mark.slow
def test_sharded_model_passes_in_lockstep_and_equals_one(tiny_model_dir, eleven_pairs, tmp_path):
    """FSDP2: batches of 4 (4+4+3 pairs) dealt in turn give process 0 two batches and process 1 one, but
    every forward pass is a collective, so process 1 runs the first batch again (its result dropped) and
    the processes run as many passes. Each pair's log-probs still come from one process, and the table
    equals 1 unsharded process's within float rounding. On a hit both processes run the check's batch."""
    (one,) = reference_pass(ONE, tiny_model_dir, eleven_pairs, tmp_path, "one", "4")
    two = reference_pass(TWO, tiny_model_dir, eleven_pairs, tmp_path, "two", "4", "fsdp2")
    first = one["miss"]["computed"][0]
    assert [len(rank["miss"]["computed"]) for rank in two] == [2, 2]
    assert two[1]["miss"]["computed"][1] == first, "the filler pass is the first batch again"
    kept = pairs_of(two[0]["miss"]["computed"]) + two[1]["miss"]["computed"][0]
    assert sorted(kept) == list(range(11))
    for rank in two:
        assert not rank["miss"]["hit"] and rank["hit"]["hit"]
        assert_close(
            torch.tensor(rank["miss"]["table"]), torch.tensor(one["miss"]["table"]), atol=1e-5, rtol=1e-6
        )
        assert rank["hit"]["table"] == rank["miss"]["table"]
        assert rank["hit"]["computed"] == [first]
