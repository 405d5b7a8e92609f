"""The dpokit training loop, top to bottom: data, model, reference log-probs, optimisation, checkpoints.

dpokit train                       # the built-in demo: SmolLM2-135M + LoRA on sentiment pairs
dpokit train my.yaml beta=0.2      # your config, with overrides
"""

from __future__ import annotations

import gc
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from dpokit.config import RunConfig
from dpokit.data.prepare import load_pairs, split_pairs, subset
from dpokit.data.tokenize import TokenizedPair
from dpokit.errors import DpokitError
from dpokit.evaluate import evaluate_pairs
from dpokit.logprobs import PairLogps, compute_logps, select
from dpokit.losses import LOSSES, LossParams, chosen_nll
from dpokit.models.loading import add_lora, load_model, load_tokenizer, reference_context
from dpokit.packing import build_logps_fn
from dpokit.pair_stats import PairStats
from dpokit.reference.cache import cached_reference_logps
from dpokit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dpokit.train.hooks import RunHooks
from dpokit.train.metrics import MetricsLog, is_finite
from dpokit.train.output import save_final


@dataclass
class Datasets:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    train_reference: PairLogps | None = None
    eval_reference: PairLogps | None = None
    notes: list[str] = field(default_factory=list)


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checks it between optimizer steps, saves, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


def prepare_datasets(config: RunConfig, tokenizer) -> Datasets:
    train, report = load_pairs(config.train_data, tokenizer, config.max_length)
    notes = report.warnings()
    if config.eval_data is not None:
        held, eval_report = load_pairs(config.eval_data, tokenizer, config.max_length)
        notes += eval_report.warnings()
    elif config.eval_split > 0:
        train, held = split_pairs(train, config.eval_split, config.seed)
    else:
        held = []
    return Datasets(
        subset(train, config.train_subset, config.seed),
        subset(held, config.eval_subset, config.seed),
        notes=notes,
    )


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def step_indices(
    num_pairs: int, pairs_per_step: int, step: int, steps_per_epoch: int, seed: int
) -> list[int]:
    """Pair indices of optimizer step `step`: a fresh seeded permutation per epoch, so resuming at any step
    sees exactly the pairs an uninterrupted run would."""
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[within * pairs_per_step : (within + 1) * pairs_per_step]


def train(config: RunConfig, resume: bool = False, console: Console | None = None) -> Path:
    """Run DPO training as configured; returns the run directory."""
    console = console or Console(stderr=True)
    run_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "checkpoints").exists():
        raise DpokitError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.resolved(), sort_keys=False))

    accelerator = Accelerator(log_with=config.report_to or None, project_dir=str(run_dir))
    set_seed(config.seed)
    params = LossParams(config.resolved_beta, config.label_smoothing, config.rdpo_alpha, config.simpo_gamma)
    loss_fn = LOSSES[config.loss_type]
    mode = config.resolved_reference_mode

    # --- data ---
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = prepare_datasets(config, tokenizer)
    for note in data.notes:
        warnings.warn(note, UserWarning, stacklevel=1)
    logps_fn = build_logps_fn(
        tokenizer.pad_token_id,
        config.packing,
        config.share_prompt,
        config.logps_chunk_size,
        max(config.token_budget, config.max_length),
    )

    # --- models ---
    policy = load_model(config.model, config.dtype, config.trust_remote_code, config.load_in_4bit)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.enable_input_require_grads()
    if config.use_lora:
        policy = add_lora(
            policy,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
            config.load_in_4bit,
            config.gradient_checkpointing,
        )
    policy.to(accelerator.device)
    reference = None
    if mode != "none" and (config.reference_model is not None or not config.use_lora):
        reference = load_model(config.reference_model or config.model, config.dtype, config.trust_remote_code)
        reference.to(accelerator.device).eval().requires_grad_(False)

    # --- reference log-probs: once for the whole dataset, then the reference is freed ---
    if mode == "precompute":
        cache_dir = Path(config.cache_dir) / "reference"
        # Packed and chunked log-probs equal padded ones only up to float rounding: part of the key.
        method = f"packing={config.packing},share={config.share_prompt},chunk={config.logps_chunk_size}"
        with reference_context(policy, reference) as ref:
            data.train_reference, hit = cached_reference_logps(
                ref, data.train, logps_fn, cache_dir, config.micro_batch_size * 2, method
            )
            console.print(
                f"reference log-probs of {len(data.train)} train pairs: {'cache hit' if hit else 'computed'}"
            )
            if data.eval:
                data.eval_reference, _ = cached_reference_logps(
                    ref, data.eval, logps_fn, cache_dir, config.micro_batch_size * 2, method
                )
        reference = None
        gc.collect()
    elif mode == "live" and data.eval:
        with reference_context(policy, reference) as ref:
            data.eval_reference = compute_logps(
                ref, data.eval, logps_fn, config.micro_batch_size * 2, "reference"
            )

    # --- optimisation set-up ---
    pairs_per_step = min(config.effective_batch_size, len(data.train))
    if pairs_per_step % accelerator.num_processes:
        raise DpokitError(
            f"effective_batch_size: {pairs_per_step} pairs per step do not split evenly over "
            f"{accelerator.num_processes} processes"
        )
    steps_per_epoch = len(data.train) // pairs_per_step
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.resolved_learning_rate, weight_decay=config.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, total_steps, config.warmup_ratio)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    start_step = 0
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, accelerator.unwrap_model(policy), optimizer)
        start_step = progress["step"]
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # stepping the schedule to where it was, before any optimizer step
            for _ in range(start_step):
                scheduler.step()
        console.print(f"resuming from {checkpoint} (step {start_step} of {total_steps})")

    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if checkpoint else None)
    hooks = RunHooks(config, run_dir, tokenizer, console, accelerator)
    accelerator.init_trackers(
        "dpokit",
        config={k: v for k, v in config.resolved().items() if isinstance(v, (int, float, str, bool))},
    )

    def evaluate(step: int) -> None:
        if not data.eval or not accelerator.is_main_process:
            return
        record = {
            "split": "eval",
            "step": step,
            **evaluate_pairs(
                accelerator.unwrap_model(policy),
                data.eval,
                data.eval_reference,
                config.loss_type,
                params,
                logps_fn,
                config.micro_batch_size,
            ),
        }
        log.write(record)
        accelerator.log({f"eval/{k}": v for k, v in record.items() if k != "split"}, step=step)
        hooks.on_record(record)

    if checkpoint is None:
        evaluate(0)
        hooks.on_samples(accelerator.unwrap_model(policy), 0, before_training=True)

    stop = StopRequested()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    local_scale = accelerator.num_processes / pairs_per_step  # DDP averages over processes: see the docstring
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    policy.train()
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            indices = step_indices(len(data.train), pairs_per_step, step, steps_per_epoch, config.seed)
            local = indices[accelerator.process_index :: accelerator.num_processes]
            stats = PairStats()
            micro_batches = [
                local[i : i + config.micro_batch_size] for i in range(0, len(local), config.micro_batch_size)
            ]
            for number, micro in enumerate(micro_batches):
                last = number == len(micro_batches) - 1
                with nullcontext() if last else accelerator.no_sync(policy):
                    batch = [data.train[i] for i in micro]
                    out = logps_fn(policy, batch)
                    ref = None
                    if mode == "precompute":
                        ref = select(data.train_reference, micro)
                    elif mode == "live":
                        with reference_context(accelerator.unwrap_model(policy), reference) as model:
                            ref = logps_fn(model, batch)
                    if ref is not None:
                        ref = PairLogps(*(t.to(out.chosen.device) for t in vars(ref).values()))
                    losses, chosen_rewards, rejected_rewards = loss_fn(out, ref, params)
                    total = losses + config.nll_alpha * chosen_nll(out) if config.nll_alpha else losses
                    # Each pair weighs 1/pairs_per_step in the step's gradient, whatever the micro-batching.
                    accelerator.backward(total.sum() * local_scale)
                    stats.add(losses, chosen_rewards, rejected_rewards, out, ref)
            record = {
                "split": "train",
                "step": step + 1,
                "epoch": (step + 1) / steps_per_epoch,
                **stats.means(accelerator.reduce(stats.totals().to(accelerator.device), "sum").cpu()),
            }
            if not is_finite(record):
                raise DpokitError(
                    f"step {step + 1}: non-finite loss or metric ({record['loss']}); stopped without "
                    "saving. Lower learning_rate or raise beta; the last good checkpoint is kept"
                )
            record["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, config.max_grad_norm))
            record["lr"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record["pairs_per_s"] = pairs_per_step / (time.perf_counter() - started)
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
            if config.eval_every and done % config.eval_every == 0 and done < total_steps:
                evaluate(done)
            if config.sample_every and done % config.sample_every == 0 and done < total_steps:
                hooks.on_samples(accelerator.unwrap_model(policy), done)
            if accelerator.is_main_process and (
                stop.signal or (config.save_every and done % config.save_every == 0)
            ):
                save_checkpoint(
                    run_dir,
                    done,
                    accelerator.unwrap_model(policy),
                    optimizer,
                    {"seed": config.seed, "total_steps": total_steps},
                    config.keep_checkpoints,
                )
            if stop.signal:
                name = signal.Signals(stop.signal).name
                console.print(
                    f"[yellow]{name}: checkpoint saved at step {done}; continue with --resume[/yellow]"
                )
                raise SystemExit(128 + stop.signal)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    # --- the end: final weights, held-out metrics and samples after training ---
    if accelerator.is_main_process:
        save_checkpoint(
            run_dir,
            total_steps,
            accelerator.unwrap_model(policy),
            optimizer,
            {"seed": config.seed, "total_steps": total_steps},
            config.keep_checkpoints,
        )
        save_final(accelerator.unwrap_model(policy), tokenizer, run_dir / "final")
    evaluate(total_steps)
    hooks.on_samples(accelerator.unwrap_model(policy), total_steps)
    hooks.summary()
    log.close()
    accelerator.end_training()
    return run_dir
