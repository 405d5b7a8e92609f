"""Checkpoints: at every instant `latest` names a complete checkpoint that restores its step exactly.

Crashes are injected at each write, fsync and rename of the save sequence in turn, then the run is
"restarted": whatever `latest` names must load, bit for bit, the weights and optimizer state of its step.
End to end, a training run killed at an os.replace of a save resumes to the uninterrupted run's losses
and final weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from dpokit.train import checkpoint as checkpoint_module
from dpokit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpokit.train.loop import train
from dpokit.train.rng import restore_checkpoint_rng
from tiny_models import STANDARD_ROWS, write_jsonl
from train.test_invariants import make_config

KEEP = 1  # the strictest setting: the previous checkpoint is deleted as soon as the new one is latest


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` on the way can swallow it."""


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # frozen: not part of a checkpoint
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=0.1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.linspace(-1, 1, 8).reshape(2, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every trainable weight and every AdamW slot (exp_avg, exp_avg_sq, step), cloned."""
    state = {f"weight.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for index, slots in optimizer.state_dict()["state"].items():
        state |= {f"adam.{index}.{slot}": torch.as_tensor(v).clone() for slot, v in slots.items()}
    return state


def restored(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load `path` into a fresh model and optimizer (as a restarted run does); returns their snapshot."""
    model, optimizer = make_model()
    progress = load_checkpoint(path, model, optimizer)
    return snapshot(model, optimizer), progress


@pytest.fixture
def killer(monkeypatch):
    """`arm(k)` makes the k-th call to any write, fsync or rename of the save sequence raise Killed;
    `count()` tells how many such calls were made since."""
    targets = [
        (os, "replace"),
        (os, "fsync"),
        (checkpoint_module, "save_file"),
        (Path, "write_text"),
        (Path, "write_bytes"),
    ]
    state = {"k": 0, "count": 0}
    for owner, name in targets:
        real = getattr(owner, name)

        def call(*args, _real=real, **kwargs):
            state["count"] += 1
            if state["count"] == state["k"]:
                raise Killed
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    class Killer:
        def arm(self, k: int) -> None:
            state["k"], state["count"] = k, 0

        def count(self) -> int:
            return state["count"]

    return Killer()


@pytest.mark.parametrize("again", [False, True], ids=["new-step", "same-step-again"])
def test_a_kill_at_any_call_of_a_save_leaves_latest_complete(tmp_path, killer, again):
    """Save step 1, train, then save step 2 with a kill at its k-th call, for k = 1, 2, ... until a save runs
    to the end. After every kill `latest` loads exactly step 1 or step 2, and saving again succeeds.
    `same-step-again` first saves step 2 whole: the loop's double save of the last step."""
    k = 0
    while True:
        k += 1
        run_dir = tmp_path / f"k{k}"
        model, optimizer = make_model()
        train_step(model, optimizer)
        save_checkpoint(run_dir, 1, model, optimizer, {"seed": 7}, KEEP)
        expected = {1: snapshot(model, optimizer)}
        train_step(model, optimizer)
        expected[2] = snapshot(model, optimizer)
        if again:
            save_checkpoint(run_dir, 2, model, optimizer, {"seed": 7}, KEEP)
        killer.arm(k)
        try:
            save_checkpoint(run_dir, 2, model, optimizer, {"seed": 7}, KEEP)
        except Killed:
            pass
        else:
            assert killer.count() < k  # the whole save ran without reaching the k-th call
            break
        finally:
            killer.arm(0)
        latest = latest_checkpoint(run_dir)
        state, progress = restored(latest)
        step = progress["step"]
        assert latest.name == f"step-{step:06d}" and step in ({2} if again else {1, 2}), f"k={k}"
        assert progress["seed"] == 7
        assert_close(state, expected[step], rtol=0, atol=0)
        # The restarted run saves again: it completes and loads step 2.
        assert save_checkpoint(run_dir, 2, model, optimizer, {"seed": 7}, KEEP) == latest_checkpoint(run_dir)
        state, progress = restored(latest_checkpoint(run_dir))
        assert progress["step"] == 2
        assert_close(state, expected[2], rtol=0, atol=0)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000002"]
    # A new step makes 4 safetensors/JSON writes, 5 fsyncs (4 files and the directory), 1 rename and
    # 1 fsync of checkpoints/, then `latest`: write, fsync, rename, fsync. The same step again: `latest` only.
    assert k - 1 == (4 if again else 15)


def test_resaving_an_existing_step_never_deletes_or_rewrites_it(tmp_path, monkeypatch):
    """The last step is saved twice when save_every divides it; the second save must not open a window
    where step-N is gone, nor replace it: it only points `latest` at it."""
    model, optimizer = make_model()
    for step in (1, 2):
        train_step(model, optimizer)
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    expected, _ = restored(tmp_path / "checkpoints" / "step-000002")
    (tmp_path / "checkpoints" / "latest").write_text("step-000001")  # as a kill before `latest` moved
    removed: list[str] = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(
        shutil, "rmtree", lambda path, **kw: (removed.append(Path(path).name), real_rmtree(path, **kw))
    )
    train_step(model, optimizer)  # a different state, so a rewrite would show
    assert save_checkpoint(tmp_path, 2, model, optimizer, {}, keep=2).name == "step-000002"
    assert "step-000002" not in removed
    assert latest_checkpoint(tmp_path).name == "step-000002"
    state, progress = restored(latest_checkpoint(tmp_path))
    assert progress["step"] == 2
    assert_close(state, expected, rtol=0, atol=0)


def test_stale_partials_are_pruned_and_only_the_newest_kept(tmp_path):
    """Whatever a kill left (a half-written `.partial-step-*` directory, a `latest` temporary) goes at the
    next save; of four checkpoints, keep=2 leaves the last two."""
    root = tmp_path / "checkpoints"
    (root / ".partial-step-000003").mkdir(parents=True)
    (root / ".partial-step-000003" / "trainable.safetensors").write_bytes(b"half")
    (root / ".partial-latest.4242").write_text("step-00")
    model, optimizer = make_model()
    for step in range(1, 5):
        train_step(model, optimizer)
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
        if step == 1:
            assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (root / "latest").read_text() == "step-000004"


def test_cpu_rng_state_is_restored(tmp_path):
    model, optimizer = make_model()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    expected = torch.rand(5)
    torch.manual_seed(0)
    restore_checkpoint_rng(path, 0)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("devices_now", [0, 1, 3])
def test_cuda_rng_states_restore_the_devices_both_machines_have(tmp_path, monkeypatch, devices_now):
    """A checkpoint from a 2-GPU machine: on 1 GPU device 0 is restored, on 3 GPUs devices 0 and 1 (the
    third keeps its state), on a CPU-only machine none, and the load never fails. CUDA is faked: the
    arithmetic is what is tested, a real GPU in the test below."""
    model, optimizer = make_model()
    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    rng = load_file(str(path / "rng-rank0.safetensors"))
    assert sorted(rng) == ["cuda.0", "cuda.1", "numpy", "python", "torch"] and torch.equal(
        rng["cuda.1"], saved[1]
    )
    restored_states: list[tuple[list[int], int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices_now > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices_now)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored_states.append((s.tolist(), i)))
    restore_checkpoint_rng(path, 0)
    assert restored_states == [([1, 2, 3], 0), ([4, 5, 6], 1)][: min(devices_now, 2)]


def test_a_cpu_checkpoint_loads_on_a_cuda_machine(tmp_path, monkeypatch):
    """Checkpoints written before CUDA states were saved (or on a CPU machine) hold no `cuda.*` key."""
    model, optimizer = make_model()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append(i))
    restore_checkpoint_rng(path, 0)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_is_restored_on_every_device(tmp_path):
    model, optimizer = make_model()
    torch.cuda.manual_seed_all(123)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=1)
    devices = range(torch.cuda.device_count())
    expected = [torch.rand(5, device=f"cuda:{d}") for d in devices]
    torch.cuda.manual_seed_all(0)
    restore_checkpoint_rng(path, 0)
    for d in devices:
        assert torch.equal(torch.rand(5, device=f"cuda:{d}"), expected[d])
    assert json.loads((path / "progress.json").read_text())["step"] == 1


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A 4-step run (checkpoints at steps 2 and 4, then step 4 again at the end): its data file, the
    target of each os.replace it made, in order, and its run directory."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_jsonl(tmp / "pairs.jsonl", STANDARD_ROWS)
    targets: list[str] = []
    real_replace = os.replace

    def recording(source, target):
        targets.append(Path(target).name)
        real_replace(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", recording)
        run_dir = train(make_config(tmp, tiny_model_dir, data, num_epochs=1))
    return data, targets, run_dir


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


# (target of the os.replace to kill, which of the calls with that target): the reference cache, the first
# checkpoint's rename and its `latest`, the second save of the last step (only `latest`), the final model.
CRASH_POINTS = {
    "reference-cache": (".safetensors", 0),
    "checkpoint-rename": ("step-000002", 0),
    "checkpoint-latest": ("latest", 0),
    "last-step-saved-again": ("latest", -1),
    "final-model": ("final", 0),
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_run_killed_at_a_save_resumes_to_the_uninterrupted_result(
    uninterrupted, tiny_model_dir, tmp_path, monkeypatch, point
):
    """Kill a run at one os.replace of its save sequence, then `train(config, resume=True)`: every logged
    train loss and the final weights equal the uninterrupted run's (atol 1e-6)."""
    data, targets, expected_dir = uninterrupted
    suffix, which = CRASH_POINTS[point]
    hits = [i for i, target in enumerate(targets) if target.endswith(suffix)]
    kill_at = hits[which] + 1
    calls = {"n": 0}
    real_replace = os.replace

    def dying(source, target):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        real_replace(source, target)

    config = make_config(tmp_path, tiny_model_dir, data, num_epochs=1)
    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(Killed):
        train(config)
    monkeypatch.setattr(os, "replace", real_replace)
    train(config, resume=True)

    run_dir = Path(config.output_dir)
    expected = dict(train_losses(expected_dir))
    got = train_losses(run_dir)
    for step, loss in got:
        assert loss == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert_close(weights, load_file(str(expected_dir / "final" / "model.safetensors")), atol=1e-6, rtol=0)
    assert not [p.name for p in run_dir.glob("**/.partial-*")], "the finished run leaves no temporaries"
    # Owned by the training loop (metrics.jsonl), not by checkpoint.py: after a resume, exactly one
    # record per step, even when the kill came before the first checkpoint.
    assert [step for step, _ in got] == sorted(expected), "one metrics record per train step"
