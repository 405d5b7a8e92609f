"""DDP over gloo on CPU, 2 processes: the same run as 1 process, and a killed run resumed equals it too, on
2 processes or on 1."""

from __future__ import annotations

from functools import partial

import pytest
from launching import (
    accelerate_launch,
    assert_same_training,
    kill_after_first_checkpoint,
    resume_on_other_process_counts,
    run,
    settings,
    single,
    torchrun,
    train_losses,
)


@pytest.mark.slow
def test_ddp_under_accelerate_launch_with_the_shipped_preset_equals_one_process(
    one_process, tiny_model_dir, pairs_file, tmp_path
):
    """Each process takes half of every step's 8 pairs; gradients are weighted so that DDP's average over
    processes equals the 1-process mean over all 8: the same losses step after step, the same weights."""
    out = tmp_path / "ddp"
    stderr = run(accelerate_launch(2, settings(tiny_model_dir, pairs_file, out), "ddp"), out)
    assert stderr.count("learning_rate = 0.0001 is above the recommended range") == 1  # the first process's
    assert stderr.count("done: ") == 1
    assert len(train_losses(one_process)) == 4
    assert train_losses(one_process)[-1] < train_losses(one_process)[0]
    assert_same_training(out, one_process)


@pytest.mark.slow
def test_ddp_killed_then_resumed_under_torchrun_equals_one_process(
    one_process, tiny_model_dir, pairs_file, tmp_path
):
    """SIGKILL to torchrun and both processes once a checkpoint exists, then --resume with 2 processes."""
    out = tmp_path / "ddp"
    args = settings(tiny_model_dir, pairs_file, out)
    kill_after_first_checkpoint(torchrun(2, args, "ddp"), out)
    assert not (out / "final").exists(), "the kill landed before the end"
    run(torchrun(2, [*args, "--resume"], "ddp"), out)
    assert_same_training(out, one_process)


@pytest.mark.slow
def test_ddp_checkpoints_resume_on_one_process_and_back_on_two(
    one_process, tiny_model_dir, pairs_file, tmp_path
):
    """Killed on 2 DDP processes after step 1's checkpoint, resumed by a single process without a launcher
    and killed after step 3's, resumed on 2: the run ends as one uninterrupted process does (1e-6)."""
    out = tmp_path / "ddp"
    args = settings(tiny_model_dir, pairs_file, out)
    log = resume_on_other_process_counts(partial(torchrun, 2, engine="ddp"), single, args, out)
    assert "written by 1 process, resumed on 2" in log
    assert_same_training(out, one_process)
