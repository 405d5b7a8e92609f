"""A stop signal that reaches one process of a launched run stops every process after the same step, with
one checkpoint, and `--resume` then ends where the uninterrupted run ends. Before, the signalled process
went into the checkpoint's collectives while the others went into the next step's: the run hung for ever
and saved nothing (DDP and FSDP2 alike, 2 processes on CPU)."""

from __future__ import annotations

import signal

import pytest
from launching import assert_same_training, run, settings, signal_during_training, single, torchrun, worker

# 40 optimizer steps with no checkpoint or sample on the way: the signal lands well before the end, and
# the only checkpoint is the one it asks for.
LONG = ["num_epochs=20", "save_every=0", "sample_every=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, pairs_file):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(single(settings(tiny_model_dir, pairs_file, out, *LONG)), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_sigterm_to_one_process_stops_all_after_the_same_step(
    engine, uninterrupted, tiny_model_dir, pairs_file, tmp_path
):
    out = tmp_path / engine
    args = settings(tiny_model_dir, pairs_file, out, *LONG)
    stopped = signal_during_training(torchrun(2, args, engine), out, worker(1), signal.SIGTERM)
    assert stopped.returncode != 0
    assert_one_checkpoint_then_resumes(stopped, "SIGTERM", out, lambda a: torchrun(2, a, engine), args)
    assert_same_training(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_to_a_run_dpokit_started_saves_in_every_process(
    uninterrupted, tiny_model_dir, pairs_file, tmp_path
):
    """SIGINT to the `dpokit train --num-processes 2` process (what Ctrl-C sends it; its processes are in
    sessions of their own): it passes the signal on, both save the same step, and it exits with 130."""
    out = tmp_path / "started"
    args = settings(tiny_model_dir, pairs_file, out, *LONG)

    def started(a: list[str]) -> list[str]:
        return [*single(a), "--distributed", "ddp", "--num-processes", "2"]

    stopped = signal_during_training(started(args), out, lambda launcher: launcher, signal.SIGINT)
    assert stopped.returncode == 128 + signal.SIGINT
    assert_one_checkpoint_then_resumes(stopped, "SIGINT", out, started, args)
    assert_same_training(out, uninterrupted)


def assert_one_checkpoint_then_resumes(stopped, name: str, out, launch, args: list[str]) -> None:
    """The stopped run said so once, left one published checkpoint before the end, and resumes to the end."""
    assert stopped.stdout.count(f"{name}: checkpoint saved at step") == 1, stopped.stdout[-3000:]
    [checkpoint] = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint
    assert 1 <= int(checkpoint.removeprefix("step-")) < 40
    assert not (out / "final").exists()
    run(launch([*args, "--resume"]), out)
