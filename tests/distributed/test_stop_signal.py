"""A stop signal that reaches one process of a launched run stops every process after the same step, with
one checkpoint, and `--resume` then ends where the uninterrupted run ends. Before, the signalled process
went into the checkpoint's collectives while the others went into the next step's: the run hung for ever
and saved nothing (DDP and FSDP2 alike, 2 processes on CPU)."""

from __future__ import annotations

import signal

import pytest
from launching import assert_same_training, run, settings, signal_one_worker, single, torchrun

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
    stopped = signal_one_worker(torchrun(2, args, engine), out, rank=1, signum=signal.SIGTERM)
    assert stopped.returncode != 0
    assert stopped.stdout.count("SIGTERM: checkpoint saved at step") == 1, stopped.stdout[-3000:]
    [checkpoint] = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint
    assert 1 <= int(checkpoint.removeprefix("step-")) < 40
    assert not (out / "final").exists()
    run(torchrun(2, [*args, "--resume"], engine), out)
    assert_same_training(out, uninterrupted)
