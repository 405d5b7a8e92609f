"""One optimizer step: micro-batches → loss → backward → clip → finite check → optimizer step → metrics.

`dpokit train`, the benchmark and the on-policy loop all step through `train_step`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

from dpokit.data.batching import token_batches
from dpokit.distributed import clip_grad_norm, zero3_step
from dpokit.errors import DpokitError
from dpokit.logprobs import PairLogps, select
from dpokit.losses import chosen_nll
from dpokit.models.loading import reference_context
from dpokit.pair_stats import PairStats
from dpokit.train.run import Run, step_indices


class NonFiniteStep(DpokitError):
    """A step whose loss, metrics or gradient norm is NaN or infinite; raised before the optimizer steps."""


def micro_batches(run: Run, step: int) -> list[list[int]]:
    """This process's pair indices for optimizer step `step` (0-based), cut into forward passes of
    `micro_batch_size` pairs, or of as many pairs as `micro_batch_tokens` tokens hold."""
    indices = step_indices(
        len(run.data.train), run.pairs_per_step, step, run.steps_per_epoch, run.config.seed
    )
    local = indices[run.accelerator.process_index :: run.accelerator.num_processes]
    if run.micro_batch_tokens is not None:
        groups = token_batches([run.data.train[i].num_tokens for i in local], run.micro_batch_tokens)
        return [[local[j] for j in group] for group in groups]
    size = run.config.micro_batch_size
    return [local[i : i + size] for i in range(0, len(local), size)]


def reference_logps(run: Run, micro: list[int], policy_logps: PairLogps) -> PairLogps | None:
    """Reference log-probs of the pairs at `micro`: from the precomputed table, a live forward, or None."""
    if run.mode == "precompute":
        ref = select(run.data.train_reference, micro)
    elif run.mode == "live":
        with reference_context(run.model, run.reference) as model:
            ref = run.logps_fn(model, [run.data.train[i] for i in micro])
    else:
        return None
    device = policy_logps.chosen.device
    return PairLogps(*(t.to(device, non_blocking=True) for t in vars(ref).values()))


def check_finite(record: dict[str, Any], step: int) -> None:
    """Raise `NonFiniteStep` when a number of the step's record is NaN or infinite."""
    bad = [name for name, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise NonFiniteStep(
            f"step {step + 1}: non-finite {', '.join(bad)} (loss {record['loss']}, grad_norm {record.get('grad_norm')}); "
            "stopped before the optimizer step. Lower learning_rate or raise beta; the last good checkpoint is kept"
        )


def train_step(run: Run, step: int) -> dict[str, Any]:
    """Run optimizer step `step` (0-based) and return its metrics record (step numbered from 1).

    Each pair weighs 1/pairs_per_step in the gradient whatever the micro-batching and the number of
    processes (DDP, FSDP2 and ZeRO-3 average over processes, hence the scale). A non-finite loss, metric or gradient norm
    raises `NonFiniteStep` before the optimizer touches the weights.

    The forward runs under the run's precision (`run.logps_fn` autocasts). Under fp16-mixed the loss is
    scaled before backward and the gradients unscaled before clipping; an infinite gradient norm there is
    the scaler's overflow signal, not a fault: the scaler skips the optimizer step and lowers its scale,
    and the record says `skipped: 1.0` in place of `grad_norm`. The loss and metrics are checked as always.
    Under ZeRO-3 DeepSpeed computes the gradient norm inside its step, and skips that step when the norm is
    not finite: the loss and metrics are checked before it, the norm after it, the weights untouched either way.
    """
    started = time.perf_counter()
    config, accelerator = run.config, run.accelerator
    local_scale = accelerator.num_processes / run.pairs_per_step
    stats = PairStats()
    zero3 = run.engine.name == "zero3"
    batches = micro_batches(run, step)
    for number, micro in enumerate(batches):
        # FSDP2 reduce-scatters every micro-batch's gradients into the shards: skipping it would hold whole
        # unsharded gradients on each process until the last one.
        sync = number == len(batches) - 1 or run.sharded
        with nullcontext() if sync else accelerator.no_sync(run.policy):
            out = run.logps_fn(run.policy, [run.data.train[i] for i in micro])
            ref = reference_logps(run, micro, out)
            losses, chosen_rewards, rejected_rewards = run.loss_fn(out, ref, run.params)
            total = losses + config.nll_alpha * chosen_nll(out) if config.nll_alpha else losses
            loss = total.sum() * local_scale
            if zero3:
                run.policy.backward(
                    loss
                )  # DeepSpeed's hooks reduce-scatter the gradients into the partitions
            else:
                accelerator.backward(run.scaler.scale(loss) if run.scaler else loss)
            stats.add(losses, chosen_rewards, rejected_rewards, out, ref)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip and report the true gradients
    record: dict[str, Any] = {
        "split": "train",
        "step": step + 1,
        "epoch": (step + 1) / run.steps_per_epoch,
        **stats.means(accelerator.reduce(stats.totals(), "sum")),
    }
    if not zero3:  # DeepSpeed clips inside its step (below)
        record["grad_norm"] = clip_grad_norm(accelerator, run.policy, run.trainable, config.max_grad_norm)
    if run.scaler and not math.isfinite(record["grad_norm"]):
        del record["grad_norm"]
        record["skipped"] = 1.0
    check_finite(record, step)
    record["lr"] = run.scheduler.get_last_lr()[0]
    if zero3:
        record["grad_norm"] = zero3_step(run.policy)  # skips the update itself when the norm is not finite
        check_finite(record, step)
    elif run.scaler:
        run.scaler.step(run.optimizer)  # skips the step when the unscaled gradients hold an inf or NaN
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # DeepSpeed's step has already zeroed its partitions: harmless
    record["pairs_per_s"] = run.pairs_per_step / (time.perf_counter() - started)
    return record
