"""The dpokit training loop, top to bottom: set-up → reference pass → optimizer steps → the end of the run.

dpokit train                       # the built-in demo: SmolLM2-135M + LoRA on sentiment pairs
dpokit train my.yaml beta=0.2      # your config, with overrides
dpokit train my.yaml --resume      # continue from the latest checkpoint
torchrun --nproc-per-node 8 -m dpokit.cli train my.yaml --distributed fsdp2   # 8 processes, sharded

From Python, `train(config, train_rows=[{"prompt": ..., "chosen": ..., "rejected": ...}, ...])` trains on
rows held in memory (the on-policy loop does this).
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import gather_object
from rich.console import Console

from dpokit.atomic import prune_partial_files, write_atomic
from dpokit.config import RunConfig
from dpokit.data.prepare import Rows
from dpokit.distributed import full_state_dict, progress
from dpokit.errors import DpokitError
from dpokit.evaluate import evaluate_pairs
from dpokit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpokit.train.hooks import RunHooks
from dpokit.train.metrics import MetricsLog, cut_jsonl
from dpokit.train.output import save_final
from dpokit.train.reference_pass import reference_pass
from dpokit.train.rng import reseed, restore_checkpoint_rng, rng_state, written_by
from dpokit.train.run import Run, identity_changes, setup_optimizer, setup_run
from dpokit.train.sharded_checkpoint import (
    load_sharded_checkpoint,
    read_dcp,
    read_zero3,
    save_sharded_checkpoint,
    sharded_engine,
    write_dcp,
    write_zero3,
)
from dpokit.train.step import train_step


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checks it between optimizer steps, saves, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def agreed(self, accelerator: Any) -> int | None:
        """The signal any process of the run has received (the largest number if several), the same on every
        process: they all stop after the same step. A process that stopped alone would wait in the
        checkpoint's collectives while the others waited in the next step's, for ever; the launcher's
        SIGTERM reaches the processes at slightly different times, so one can see it a step before another."""
        if accelerator.num_processes == 1:
            return self.signal
        flag = torch.tensor([self.signal or 0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def train(
    config: RunConfig,
    resume: bool = False,
    console: Console | None = None,
    *,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    force_resume: bool = False,
    distributed: str | None = None,
) -> Path:
    """Run DPO training as configured; returns the run directory.

    resume: continue from the run's latest checkpoint (from the start when it has none yet).
    train_rows / eval_rows: preference rows held in memory instead of the config's data files.
    force_resume: resume even though the data or a setting that decides the steps changed.
    distributed: a preset (single, ddp, fsdp2, fsdp2-offload, deepspeed-zero3) or an accelerate config
    file; None: what the launcher set (see dpokit.distributed).
    """
    console = console or Console(stderr=True)
    run_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "checkpoints").exists():
        raise DpokitError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    run = setup_run(config, console, train_rows, eval_rows, distributed)
    if run.accelerator.is_main_process:
        prune_partial_files(run_dir)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.resolved(), sort_keys=False))
    reference_pass(run)
    setup_optimizer(run)
    start_step = restore(run, checkpoint, force_resume) if checkpoint is not None else 0
    log, hooks = open_records(run, start_step, resumed=checkpoint is not None)
    run_steps(run, start_step, log, hooks)
    finish(run, log, hooks)
    return run_dir


def restore(run: Run, checkpoint: Path, force: bool) -> int:
    """Load weights, optimizer and RNG state from `checkpoint` and step the schedule to it; returns its step.

    A checkpoint written by another number of processes resumes too (DDP's are whole, FSDP2's resharded by
    DCP), with the same global batch, so each step sees the same pairs; only ZeRO-3's is refused. Its RNG
    states belong to processes that no longer exist, so the generators are reseeded instead (`reseed`).

    Refuses when the data or a setting that decides which pairs each step sees changed since the checkpoint
    was written, unless `force`.
    """
    written = sharded_engine(checkpoint)
    if written != (run.engine.name if run.sharded else None):
        kind = {"fsdp2": "sharded (fsdp2)", "zero3": "sharded (deepspeed-zero3)"}.get(
            written, "unsharded (single, ddp)"
        )
        raise DpokitError(f"{checkpoint}: a {kind} checkpoint; resume it with the engine that wrote it")
    processes, writers = run.accelerator.num_processes, written_by(checkpoint)
    resharded = writers is not None and writers != processes
    if resharded and written == "zero3":
        raise DpokitError(
            f"{checkpoint}: written by {writers} processes, this run has {processes}; resume with {writers} "
            "(a DeepSpeed ZeRO-3 checkpoint is not resharded; fsdp2 and ddp checkpoints are)"
        )
    if run.sharded:
        progress = load_sharded_checkpoint(checkpoint, shard_io(run, read=True))
    else:
        progress = load_checkpoint(checkpoint, run.model, run.optimizer)
    changes = identity_changes(progress.get("identity", {}), run.identity())
    if changes and not force:
        raise DpokitError(
            f"{checkpoint}: cannot resume, {'; '.join(changes)} since this checkpoint was written "
            "(the remaining steps would see other pairs); restore them, or pass --force-resume to continue anyway"
        )
    if changes:
        warnings.warn(f"--force-resume: {'; '.join(changes)} since {checkpoint}", UserWarning, stacklevel=2)
    if run.scaler is not None and "scaler" in progress:
        run.scaler.load_state_dict(progress["scaler"])  # fp16: the loss scale it had found, not a fresh one
    step = progress["step"]
    if resharded:
        reseed(run.config.seed, step, run.accelerator.process_index)
        run.console.print(
            f"{checkpoint}: written by {writers} process{'es' * (writers > 1)}, resumed on {processes}; weights, "
            "optimizer state and each step's pairs carry over, random draws (dropout) are reseeded"
        )
    else:
        restore_checkpoint_rng(checkpoint, run.accelerator.process_index)
    with warnings.catch_warnings():  # torch warns of a schedule stepped before any optimizer step: intended
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            run.scheduler.step()  # the schedule is a pure function of the step count
    run.console.print(f"resuming from {checkpoint} (step {step} of {run.total_steps})")
    return step


def open_records(run: Run, start_step: int, resumed: bool) -> tuple[MetricsLog, RunHooks]:
    """metrics.jsonl and samples.jsonl as the checkpoint we resume from left them, and the hooks that read them.

    A fresh start (or a resume with no checkpoint yet) empties both files. A resume keeps what was written up
    to the checkpoint's step and drops what came after it (those steps run again), and the end-of-run eval
    and samples when the checkpoint is the last step (the end of the run runs again).
    """
    total = run.total_steps

    def seen(record: dict[str, Any]) -> bool:
        step = record["step"]
        return resumed and (
            step < start_step or (step == start_step and (record.get("split") == "train" or step < total))
        )

    main = run.accelerator.is_main_process
    metrics = cut_jsonl(run.run_dir / "metrics.jsonl", seen) if main else []
    samples = cut_jsonl(run.run_dir / "samples.jsonl", seen) if main else []
    hooks = RunHooks(run.config, run.run_dir, run.tokenizer, run.console, run.accelerator, run.sharded)
    hooks.replay(metrics, samples)
    run.accelerator.init_trackers(
        "dpokit",
        config={k: v for k, v in run.config.resolved().items() if isinstance(v, (int, float, str, bool))},
    )
    return MetricsLog(run.run_dir / "metrics.jsonl"), hooks


def evaluate(run: Run, step: int, log: MetricsLog, hooks: RunHooks) -> None:
    """Held-out preference metrics of the current policy, logged as an `eval` record by the main process.
    Under DDP the processes share the batches; under FSDP2 every process runs all of them together."""
    accelerator = run.accelerator
    if not run.data.eval:
        return
    # DDP: the processes share the batches and gather the sums, so every process (and its watchdog) has the
    # same record. A sharded model runs every batch on every process: its forward passes are collectives.
    together = accelerator.num_processes > 1 and not run.sharded
    metrics = evaluate_pairs(
        run.model,
        run.data.eval,
        run.data.eval_reference,
        run.config.loss_type,
        run.params,
        run.logps_fn,
        run.config.micro_batch_size,
        share=(accelerator.process_index, accelerator.num_processes) if together else None,
        gather=gather_object if together else None,
    )
    record = {"split": "eval", "step": step, **metrics}
    main = accelerator.is_main_process
    if main:
        log.write(record)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    hooks.on_record(record)


def shard_io(run: Run, read: bool) -> Callable[[Path], None]:
    """What writes (or reads) this process's shards of a sharded checkpoint, for the run's engine."""
    if run.engine.name == "zero3":
        return partial(read_zero3 if read else write_zero3, run.policy)
    return partial(read_dcp if read else write_dcp, run.policy, run.optimizer)


def save(run: Run, step: int) -> None:
    """Checkpoint `step`: trainable weights, optimizer, every process's RNG, fp16's loss scale and the run's
    identity; by the main process, or under FSDP2 and ZeRO-3 by every process, each writing its shards."""
    progress = {"seed": run.config.seed, "total_steps": run.total_steps, "identity": run.identity()}
    if run.scaler is not None:
        progress["scaler"] = run.scaler.state_dict()  # plain numbers: scale, growth tracker, factors
    keep = run.config.keep_checkpoints
    if run.sharded:
        save_sharded_checkpoint(run.accelerator, run.run_dir, step, shard_io(run, read=False), progress, keep)
        return
    rng_states = gather_object([rng_state()])  # every process's, in process order (a collective)
    if run.accelerator.is_main_process:
        save_checkpoint(run.run_dir, step, run.model, run.optimizer, progress, keep, rng_states)


def run_steps(run: Run, start_step: int, log: MetricsLog, hooks: RunHooks) -> None:
    """Optimizer steps from `start_step` to the end, with metrics, evals, samples and checkpoints between."""
    config, accelerator = run.config, run.accelerator
    if start_step == 0:
        evaluate(run, 0, log, hooks)
        hooks.on_samples(run.model, 0, before_training=True)
    stop = StopRequested()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = progress(total=run.total_steps, initial=start_step, desc="training", unit="step")
    run.policy.train()
    try:
        for step in range(start_step, run.total_steps):
            record = train_step(run, step)
            if accelerator.is_main_process:
                log.write(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "split"}, step=step + 1)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{record['rewards/accuracies']:.2f}",
                pairs_s=f"{record['pairs_per_s']:.1f}",
            )
            hooks.on_record(record)
            done = step + 1
            last = done == run.total_steps  # the end of the run evaluates, samples and saves the last step
            if not last and config.eval_every and done % config.eval_every == 0:
                evaluate(run, done, log, hooks)
            if not last and config.sample_every and done % config.sample_every == 0:
                hooks.on_samples(run.model, done)
            stopping = stop.agreed(accelerator)
            if stopping or (not last and config.save_every and done % config.save_every == 0):
                save(run, done)
            if stopping:
                if accelerator.is_main_process:
                    name = signal.Signals(stopping).name
                    run.console.print(
                        f"[yellow]{name}: checkpoint saved at step {done}; continue with --resume[/yellow]"
                    )
                raise SystemExit(128 + stopping)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def finish(run: Run, log: MetricsLog, hooks: RunHooks) -> None:
    """The end of the run: last checkpoint, final weights, held-out metrics and samples after training."""
    save(run, run.total_steps)
    state = full_state_dict(run.policy) if run.sharded else None  # gathered from every process's shards
    if run.accelerator.is_main_process:
        save_final(run.model, run.tokenizer, run.run_dir / "final", state)
    evaluate(run, run.total_steps, log, hooks)
    hooks.on_samples(run.model, run.total_steps)
    hooks.summary()
    log.close()
    for tracker in run.accelerator.trackers:
        tracker.finish()
    if run.owns_process_group:
        run.accelerator.state.destroy_process_group()
