"""Resume holes: a resumed run equals the uninterrupted one (losses and weights), with one record per step,
refuses changed data or settings unless forced, and a non-finite gradient never reaches the optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dpokit.errors import DpokitError
from dpokit.train import loop as loop_module
from dpokit.train.checkpoint import latest_checkpoint
from dpokit.train.hooks import RunHooks
from dpokit.train.loop import train
from dpokit.train.step import NonFiniteStep
from tiny_models import STANDARD_ROWS, write_jsonl
from train.test_invariants import make_config


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def crash_after(monkeypatch, step: int) -> None:
    """Make the run raise right after logging train step `step` (as a kill would, minus the process)."""
    original = RunHooks.on_record

    def crashing(self, record):
        original(self, record)
        if record["split"] == "train" and record["step"] == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(RunHooks, "on_record", crashing)


def assert_same_run(got: Path, expected: Path) -> None:
    """Same records (one per step and split, same losses) and the same final weights."""
    want = [(r["split"], r["step"], r["loss"]) for r in records(expected)]
    have = [(r["split"], r["step"], r["loss"]) for r in records(got)]
    assert [k[:2] for k in have] == [k[:2] for k in want], "one record per step, in order"
    for (_, step, loss), (_, _, expected_loss) in zip(have, want):
        assert loss == pytest.approx(expected_loss, abs=1e-6), f"step {step}"
    final, reference = (
        load_file(str(got / "final" / "model.safetensors")),
        load_file(str(expected / "final" / "model.safetensors")),
    )
    assert final.keys() == reference.keys()
    for name in final:
        assert_close(final[name], reference[name], atol=1e-6, rtol=0)


@pytest.fixture
def uninterrupted(tiny_model_dir, standard_file, tmp_path) -> Path:
    return train(
        make_config(tmp_path / "whole", tiny_model_dir, standard_file, num_epochs=2, eval_split=0.25)
    )


def test_resume_before_the_first_checkpoint_starts_over_without_duplicate_records(
    uninterrupted, tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """Killed after step 1 with no checkpoint yet (save_every=2): --resume starts over, and metrics.jsonl
    holds each step once — not the dead run's records followed by the new ones."""
    config = make_config(tmp_path / "early", tiny_model_dir, standard_file, num_epochs=2, eval_split=0.25)
    crash_after(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        train(config)
    monkeypatch.undo()
    assert latest_checkpoint(Path(config.output_dir)) is None
    assert_same_run(train(config, resume=True), uninterrupted)


def test_resume_after_the_last_checkpoint_redoes_the_end_once(
    uninterrupted, tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """A crash after the final checkpoint but before the end-of-run eval finished: resume runs the end again,
    and the final eval is logged once."""
    config = make_config(tmp_path / "end", tiny_model_dir, standard_file, num_epochs=2, eval_split=0.25)
    original = loop_module.evaluate

    def crash_in_final_eval(run, step, log, hooks):
        original(run, step, log, hooks)
        if step == run.total_steps:
            raise RuntimeError("simulated crash after the final eval record")

    monkeypatch.setattr(loop_module, "evaluate", crash_in_final_eval)
    with pytest.raises(RuntimeError):
        train(config)
    monkeypatch.undo()
    assert (
        latest_checkpoint(Path(config.output_dir)).name == "step-000006"
    )  # 12 train pairs, 4 a step, 2 epochs
    assert_same_run(train(config, resume=True), uninterrupted)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("effective_batch_size", {"effective_batch_size": 2, "micro_batch_size": 1}),
        ("seed", {"seed": 7}),
        ("loss_type", {"loss_type": "ipo"}),
        ("train_data", {}),  # the file's content changes, below
    ],
)
def test_resume_refuses_what_would_remap_the_steps(
    field, change, tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """Changed data, batch size, seed or loss: --resume fails with one line naming the field; forced, it runs."""
    config = make_config(tmp_path / "run", tiny_model_dir, standard_file, num_epochs=2)
    crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        train(config)
    monkeypatch.undo()
    if field == "train_data":
        write_jsonl(standard_file, list(reversed(STANDARD_ROWS)))
    changed = config.model_copy(update=change)
    with pytest.raises(DpokitError, match=rf"cannot resume, {field} changed") as error:
        train(changed, resume=True)
    assert "\n" not in str(error.value) and "--force-resume" in str(error.value)
    run_dir = train(changed, resume=True, force_resume=True)
    steps = [r["step"] for r in records(run_dir) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and steps[:2] == [1, 2]


def test_non_finite_gradient_stops_before_the_optimizer_step(
    tiny_model_dir, standard_file, tmp_path, monkeypatch
):
    """A finite loss with an infinite gradient at step 3: the run stops before AdamW steps, the weights are
    those of step 2, and `latest` still names the step-2 checkpoint."""
    config = make_config(tmp_path / "inf", tiny_model_dir, standard_file, num_epochs=2)
    runs = []
    original_setup = loop_module.setup_optimizer

    def setup_with_poisoned_gradient(run):
        original_setup(run)
        runs.append(run)
        calls = {"backward": 0}

        def poison(grad):
            calls["backward"] += 1
            return grad * float("inf") if calls["backward"] == 5 else grad  # 2 micro-batches a step: step 3

        run.trainable[0].register_hook(poison)

    monkeypatch.setattr(loop_module, "setup_optimizer", setup_with_poisoned_gradient)
    with pytest.raises(NonFiniteStep, match=r"step 3: non-finite grad_norm"):
        train(config)
    run = runs[0]
    latest = latest_checkpoint(Path(config.output_dir))
    assert latest.name == "step-000002"
    saved = load_file(str(latest / "trainable.safetensors"))
    for name, parameter in run.model.named_parameters():
        assert torch.equal(parameter.detach(), saved[name]), f"{name} moved after step 2"
    assert [r["step"] for r in records(Path(config.output_dir)) if r["split"] == "train"] == [1, 2]
