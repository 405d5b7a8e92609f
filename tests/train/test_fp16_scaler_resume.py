"""fp16-mixed: the gradient scaler's state (the loss scale it has found) is checkpointed and restored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_invariants import make_config

from dpokit.train.hooks import RunHooks
from dpokit.train.loop import train
from dpokit.train.precision import Precision

INIT_SCALE = 2.0**40  # overflows fp16 at once: every step is skipped and halves the scale


def scaler_of_last_checkpoint(run_dir: Path) -> dict:
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    return json.loads((latest / "progress.json").read_text())["scaler"]


def skipped_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("skipped", 0.0) for r in records if r["split"] == "train"}


def test_a_resumed_fp16_run_keeps_its_loss_scale(tiny_model_dir, standard_file, tmp_path, monkeypatch):
    with torch.autocast("cpu", dtype=torch.float16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.float16:
            pytest.skip("this torch's CPU autocast does not support float16")
    monkeypatch.setattr(
        Precision, "grad_scaler", lambda self: torch.amp.GradScaler(self.device_type, init_scale=INIT_SCALE)
    )

    def config(name: str):
        return make_config(
            tmp_path / name, tiny_model_dir, standard_file, precision="fp16-mixed", num_epochs=2, save_every=1
        )

    whole = train(config("whole"))
    skipped = skipped_by_step(whole)
    assert len(skipped) == 8 and all(skipped.values()), "every step overflowed at this scale"
    assert scaler_of_last_checkpoint(whole)["scale"] == INIT_SCALE / 2**8

    original = RunHooks.on_record

    def crash_after_step_3(self, record):
        original(self, record)
        if record["split"] == "train" and record["step"] == 3:
            raise RuntimeError("simulated crash")

    broken = config("broken")
    monkeypatch.setattr(RunHooks, "on_record", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken)
    monkeypatch.setattr(RunHooks, "on_record", original)
    # The crash comes as step 3 is logged, before its checkpoint: the run resumes from step 2.
    assert scaler_of_last_checkpoint(Path(broken.output_dir))["scale"] == INIT_SCALE / 2**2
    resumed = train(broken, resume=True)
    # A fresh scaler would have restarted at 2^40 and ended at 2^34 instead of 2^32.
    assert scaler_of_last_checkpoint(resumed) == scaler_of_last_checkpoint(whole)
    assert skipped_by_step(resumed) == skipped
