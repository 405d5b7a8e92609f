"""`--num-processes N` (and `--distributed` alone on a GPU machine): dpokit starts the run's processes itself,
as torchrun --standalone would, and the run is the one torchrun would make."""

from __future__ import annotations

import subprocess

import pytest
from launching import assert_same_training, environment, run, settings, single

from dpokit.errors import DpokitError
from dpokit.launch import processes_to_start
from tiny_models import write_jsonl


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("distributed", "count", "gpus", "started"),
    [
        (None, None, 8, None),  # no flag: this process, as always
        ("single", None, 8, None),
        ("ddp", None, 8, 8),  # one process per visible GPU
        ("fsdp2", None, 8, 8),
        ("ddp", None, 1, None),  # DDP of one process is this process
        ("fsdp2", None, 1, 1),  # FSDP2 needs a process group, even of one (fsdp2-offload on one GPU)
        ("ddp", None, 0, None),  # CPU: this process
        (None, 2, 0, 2),  # a count alone: DDP, as under torchrun
        ("fsdp2", 2, 8, 2),
        ("ddp", 1, 8, None),
        ("fsdp2", 1, 0, 1),
        ("single", 1, 8, None),
    ],
)
def test_how_many_processes_a_command_starts(monkeypatch, no_launcher, distributed, count, gpus, started):
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    assert processes_to_start(distributed, count) == started


@pytest.mark.parametrize(
    ("distributed", "count", "environment", "message"),
    [
        ("fsdp2", None, {}, "^--distributed fsdp2: no GPU to count processes by; give --num-processes N"),
        (None, 0, {}, "^--num-processes 0: give 1 or more"),
        ("single", 2, {}, "^--num-processes 2: --distributed single runs one process"),
        ("zero9", 2, {}, "unknown preset 'zero9'"),
        (
            "ddp",
            4,
            {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"},
            "^--num-processes 4: the launcher started 2",
        ),
        ("fsdp2", 8, {"SLURM_NTASKS": "2"}, "^--num-processes: SLURM started this command 2 times"),
    ],
)
def test_counts_that_cannot_be_started_fail_in_one_line(
    monkeypatch, no_launcher, distributed, count, environment, message
):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DpokitError, match=message) as error:
        processes_to_start(distributed, count)
    assert "\n" not in str(error.value)


def test_under_a_launcher_nothing_more_is_started(monkeypatch, no_launcher):
    """The processes dpokit starts run the same command line: they must not start more."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert processes_to_start("fsdp2", 2) is None
    assert processes_to_start("fsdp2", None) is None


def started(args: list[str], engine: str) -> list[str]:
    return [*single(args), "--distributed", engine, "--num-processes", "2"]


@pytest.mark.slow
def test_fsdp2_started_by_dpokit_equals_one_process(one_process, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "fsdp2"
    stderr = run(started(settings(tiny_model_dir, pairs_file, out), "fsdp2"), out)
    assert_same_training(out, one_process)
    assert stderr.count("done: ") == 1


@pytest.mark.slow
def test_a_bad_row_stops_the_started_processes_with_the_one_line_error(tiny_model_dir, pairs_file, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    out = tmp_path / "run"
    result = subprocess.run(
        started(settings(tiny_model_dir, bad, out), "ddp"),
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines and set(lines) == {
        f"error: {bad}:1: field 'chosen' must be a string or a list of {{role, content}} messages, got int"
    }
    assert "Traceback" not in result.stderr and "exitcode" not in result.stderr
