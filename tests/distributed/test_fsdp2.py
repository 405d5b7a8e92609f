"""FSDP2 over gloo on CPU, 2 processes: weights, gradients and AdamW state sharded, the same run as 1 process;
sharded (DCP) checkpoints resume after a kill, on the same or another number of processes, and export to a
standalone model."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
from launching import (
    assert_lora_resume_equals_one_process,
    assert_same_training,
    kill_after_first_checkpoint,
    records,
    resume_on_other_process_counts,
    run,
    settings,
    torchrun,
)
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    run(torchrun(2, settings(tiny_model_dir, pairs_file, out), "fsdp2"), out)
    return out


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(fsdp2_run, one_process):
    """Each process holds half of every weight; the losses, held-out evaluations and the final weights
    (gathered from the shards into final/) equal the 1-process run's."""
    assert_same_training(fsdp2_run, one_process)
    assert [r["step"] for r in records(fsdp2_run) if r["split"] == "eval"] == [0, 4]
    # Every process generates (the weights are sharded), the main one writes: greedy text equal to 1 process.
    samples = [json.loads(line) for line in (fsdp2_run / "samples.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (one_process / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["text"]) for s in samples] == [(s["step"], s["text"]) for s in expected]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    checkpoint = fsdp2_run / "checkpoints" / "step-000004"
    shards = sorted(p.name for p in checkpoint.glob("*.distcp"))
    assert (checkpoint / ".metadata").exists() and len(shards) == 2, shards
    assert json.loads((checkpoint / "progress.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_fsdp2_killed_then_resumed_equals_uninterrupted(fsdp2_run, tiny_model_dir, pairs_file, tmp_path):
    """SIGKILL to torchrun and both processes once a sharded checkpoint exists; --resume with 2 processes
    ends as the uninterrupted run."""
    out = tmp_path / "fsdp2"
    args = settings(tiny_model_dir, pairs_file, out)
    kill_after_first_checkpoint(torchrun(2, args, "fsdp2"), out)
    assert not (out / "final").exists(), "the kill landed before the end"
    run(torchrun(2, [*args, "--resume"], "fsdp2"), out)
    assert_same_training(out, fsdp2_run)


@pytest.mark.slow
def test_fsdp2_checkpoints_reshard_from_two_processes_to_one_and_back(
    one_process, tiny_model_dir, pairs_file, tmp_path
):
    """Killed on 2 processes after step 1's checkpoint, resumed on 1 and killed after step 3's, resumed on 2:
    DCP cuts each checkpoint's weights and AdamW state into the shards of the processes reading it, and the
    run ends as one uninterrupted process does (losses, evaluations, final weights within 1e-6)."""
    out = tmp_path / "fsdp2"
    args = settings(tiny_model_dir, pairs_file, out)
    launch = {n: partial(torchrun, n, engine="fsdp2") for n in (1, 2)}
    log = resume_on_other_process_counts(launch[2], launch[1], args, out)
    assert "written by 1 process, resumed on 2" in log
    assert_same_training(out, one_process)


@pytest.mark.slow
def test_fsdp2_checkpoint_exports_to_a_standalone_model(fsdp2_run, tmp_path):
    """`dpokit export --checkpoint latest` consolidates the last sharded checkpoint in one process: the
    result loads in transformers and holds the trained weights, as final/ does."""
    out = tmp_path / "exported"
    export = [sys.executable, "-m", "dpokit.cli", "export", str(fsdp2_run), "--out", str(out)]
    run([*export, "--checkpoint", "latest"], out)
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = load_file(str(fsdp2_run / "final" / "model.safetensors"))
    exported = model.state_dict()
    assert trained.keys() == exported.keys()
    for name, value in trained.items():
        assert_close(exported[name], value, atol=0, rtol=0)


@pytest.mark.slow
def test_fsdp2_lora_with_live_adapter_disabled_reference_killed_resumed_equals_one_process(
    tiny_model_dir, pairs_file, tmp_path
):
    """LoRA with gradient checkpointing under FSDP2, the reference being the sharded base with adapters
    disabled at every step; killed once a checkpoint (adapters and their AdamW state only) exists and
    resumed, it ends as 1 process does."""
    assert_lora_resume_equals_one_process(
        lambda args: torchrun(2, args, "fsdp2"), tiny_model_dir, pairs_file, tmp_path
    )
