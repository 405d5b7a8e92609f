"""Set-up of a training run: accelerator, tokenizer, pairs, models, optimizer, schedule and resume state.

`setup_run` turns a config into a `Run`, the state that the reference pass (`train/reference_pass.py`), one
optimizer step (`train/step.py`) and the loop (`train/loop.py`) share. The benchmark and the on-policy loop
build a `Run` the same way, so they time and train exactly what `dpokit train` does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from dpokit.config import RunConfig
from dpokit.data.prepare import Rows, load_pairs, split_pairs, subset
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import (
    Engine,
    fill_from_rank0,
    make_accelerator,
    resolve_engine,
    shard_model,
    zero3_initialize,
)
from dpokit.errors import DpokitError
from dpokit.logprobs import LogpsFn, PairLogps
from dpokit.losses import LOSSES, LossFn, LossParams
from dpokit.models.loading import (
    adapter_base,
    add_lora,
    compile_layers,
    load_adapter,
    load_model,
    load_tokenizer,
)
from dpokit.packing import build_logps_fn
from dpokit.packing.attention import enable_checkpointing
from dpokit.reference.cache import pairs_fingerprint
from dpokit.train.precision import Precision, resolve_precision

GPU_MICRO_BATCH_TOKENS = 16384  # enough tokens per forward pass to keep a data-centre GPU's matmuls busy


@dataclass
class Datasets:
    """Tokenized train and held-out pairs, with their reference log-probs once computed."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    train_reference: PairLogps | None = None
    eval_reference: PairLogps | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """Everything one training run holds between set-up and the end."""

    config: RunConfig
    run_dir: Path
    console: Console
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: Datasets
    precision: Precision
    logps_fn: LogpsFn  # runs under `precision.autocast()`
    loss_fn: LossFn
    params: LossParams
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # a separate frozen reference; None: adapters disabled, or freed
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16-mixed only
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    pairs_per_step: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    engine: Engine = field(default_factory=Engine)
    # Whether this run joined the launcher's process group itself, and so leaves it at the end; a caller that
    # joined first (the on-policy loop, training round after round) keeps it.
    owns_process_group: bool = True

    @property
    def sharded(self) -> bool:
        """FSDP2 or ZeRO-3: each process holds a shard of the weights, so every forward pass (training,
        evaluation, samples) runs on all processes together, and checkpoints are written by all of them."""
        return self.engine.sharded

    @property
    def mode(self) -> str:
        """The reference mode in force: precompute, live or none."""
        return self.config.resolved_reference_mode

    @property
    def micro_batch_tokens(self) -> int | None:
        """Tokens per training forward pass; None: `micro_batch_size` pairs ('auto' is None on CPU, where
        the fixed pair count is as fast, and GPU_MICRO_BATCH_TOKENS on a GPU)."""
        tokens = self.config.micro_batch_tokens
        if tokens == "auto":
            return GPU_MICRO_BATCH_TOKENS if self.accelerator.device.type == "cuda" else None
        return tokens

    @property
    def model(self) -> torch.nn.Module:
        """The policy without accelerate's wrappers (for saving, sampling and evaluation)."""
        return self.accelerator.unwrap_model(self.policy)

    def identity(self) -> dict[str, Any]:
        """What decides which pairs each step sees and how they are weighed: stored in every checkpoint and
        compared on resume, so a changed dataset or setting never silently remaps the remaining steps."""
        config = self.config
        return {
            "train_data": pairs_fingerprint(self.data.train),
            "effective_batch_size": self.pairs_per_step,
            "seed": config.seed,
            "loss_type": config.loss_type,
            "beta": config.resolved_beta,
            "learning_rate": config.resolved_learning_rate,
            "num_epochs": config.num_epochs,
            "max_steps": config.max_steps,
        }


def prepare_datasets(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
) -> Datasets:
    """Tokenized train and held-out pairs from the config's files, or from rows held in memory."""
    train, report = load_pairs(
        train_rows if train_rows is not None else config.train_data,
        tokenizer,
        config.max_length,
        "train_data",
    )
    notes = report.warnings()
    eval_source = eval_rows if eval_rows is not None else config.eval_data
    if eval_source is not None:
        held, eval_report = load_pairs(eval_source, tokenizer, config.max_length, "eval_data")
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


def load_policy(
    config: RunConfig, precision: Precision, device: torch.device, engine: Engine | None = None
) -> torch.nn.Module:
    """The model to train: gradient checkpointing and LoRA/QLoRA adapters applied as configured.

    A full fine-tune stores every weight in the trainable dtype; LoRA stores its frozen base in the frozen
    dtype, and peft keeps the adapters themselves in float32 (it upcasts bf16/fp16 adapter weights). A LoRA
    run whose `model` is a saved adapter (a run's final/) trains that adapter on; its base, with adapters
    disabled, is the reference. Under FSDP2 it comes back sharded, read from disk by rank 0 alone (`place`).
    """
    dtype = precision.frozen_dtype if config.use_lora else precision.trainable_dtype
    adapter_of = adapter_base(config.model) if config.use_lora else None
    policy = load_model(
        adapter_of or config.model,
        dtype,
        config.trust_remote_code,
        config.load_in_4bit,
        on_meta=loads_from_rank0(engine) and torch.distributed.get_rank() != 0,
    )
    if config.gradient_checkpointing:
        enable_checkpointing(policy)  # the backward's reruns keep packed rows on their attention kernel
        policy.enable_input_require_grads()
    if adapter_of is not None:
        policy = load_adapter(config.model, policy, trainable=True)
    elif config.use_lora:
        policy = add_lora(
            policy,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
            config.load_in_4bit,
        )
    if config.compile:
        compile_layers(policy)  # after LoRA: changing a compiled layer would recompile it
    return place(policy, engine, precision, device)


def load_reference(
    config: RunConfig, precision: Precision, device: torch.device, engine: Engine | None = None
) -> torch.nn.Module | None:
    """A separate frozen reference, when one is needed: a given `reference_model`, or a frozen copy of
    `model` for full fine-tuning. LoRA runs use the base with adapters disabled (None here). Under FSDP2 it
    comes back sharded, read from disk by rank 0 alone (`place`), and never given to AdamW."""
    if config.resolved_reference_mode == "none" or (config.reference_model is None and config.use_lora):
        return None
    reference = load_model(
        config.reference_model or config.model,
        precision.frozen_dtype,
        config.trust_remote_code,
        on_meta=loads_from_rank0(engine) and torch.distributed.get_rank() != 0,
    )
    return place(reference, engine, precision, device).eval().requires_grad_(False)


def loads_from_rank0(engine: Engine | None) -> bool:
    """Under FSDP2 only rank 0 reads a model from disk; the other processes build it on the meta device."""
    return engine is not None and engine.name == "fsdp2"


def place(
    model: torch.nn.Module, engine: Engine | None, precision: Precision, device: torch.device
) -> torch.nn.Module:
    """`model` on this process's device; under FSDP2 sharded, every shard filled from rank 0's weights (rank
    0's model was loaded from disk, the others' built on the meta device). Rank 0 keeps its whole copy on
    the CPU until the last tensor is sent. Sharded before the reference pass and AdamW: both run on the
    shards (AdamW's state is created as shards)."""
    if not loads_from_rank0(engine):
        return model.to(device)
    full_state = model.state_dict() if torch.distributed.get_rank() == 0 else {}
    shard_model(model, engine, precision.compute_dtype if precision.mixed else None)
    fill_from_rank0(model, full_state, device, engine.offload)
    return model


def setup_run(
    config: RunConfig,
    console: Console,
    train_rows: Rows | None = None,
    eval_rows: Rows | None = None,
    distributed: str | None = None,
) -> Run:
    """Data, models and the run directory; the optimizer comes after the reference pass (`setup_optimizer`).

    distributed: a preset name or accelerate config file (`dpokit.distributed.resolve_engine`).
    """
    run_dir = Path(config.output_dir)
    engine = resolve_engine(distributed)
    if engine.sharded and config.load_in_4bit:
        raise DpokitError(
            f"load_in_4bit: QLoRA under {engine.name} is not supported (its 4-bit weights are not sharded); "
            "use ddp, where each process holds the 4-bit model"
        )
    joined_before = torch.distributed.is_available() and torch.distributed.is_initialized()
    accelerator = make_accelerator(log_with=config.report_to or None, project_dir=str(run_dir))
    set_seed(config.seed)
    precision = resolve_precision(config.precision, accelerator.device)
    if engine.offload and accelerator.device.type == "cpu":
        raise DpokitError(
            "--distributed: fsdp2-offload moves shards from accelerator memory to CPU memory; on CPU use fsdp2"
        )
    if engine.sharded and precision.name == "fp16-mixed":
        raise DpokitError(
            f"precision: fp16-mixed under {engine.name} would need a sharded gradient scaler; use bf16-mixed or fp32"
        )
    separate_reference = config.reference_model is not None or not config.use_lora
    if engine.name == "zero3" and config.resolved_reference_mode == "live" and separate_reference:
        raise DpokitError(
            "reference_mode: live under deepspeed-zero3 would need a second ZeRO-3 engine for the frozen "
            "reference; use reference_mode=precompute (or LoRA with its adapter-disabled base as the reference)"
        )
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = prepare_datasets(config, tokenizer, train_rows, eval_rows)
    for note in data.notes:
        warnings.warn(note, UserWarning, stacklevel=1)
    logps_fn = build_logps_fn(
        tokenizer.pad_token_id,
        config.packing,
        config.share_prompt,
        config.logps_chunk_size,
        max(config.token_budget, config.max_length),
    )
    return Run(
        config=config,
        run_dir=run_dir,
        console=console,
        accelerator=accelerator,
        tokenizer=tokenizer,
        data=data,
        precision=precision,
        logps_fn=precision.wrap(logps_fn),
        loss_fn=LOSSES[config.loss_type],
        params=LossParams(
            config.resolved_beta, config.label_smoothing, config.rdpo_alpha, config.simpo_gamma
        ),
        policy=load_policy(config, precision, accelerator.device, engine),
        reference=load_reference(config, precision, accelerator.device, engine),
        engine=engine,
        owns_process_group=not joined_before,
    )


def setup_optimizer(run: Run) -> None:
    """AdamW over the trainable weights, cosine schedule with warmup, the fp16 gradient scaler, and the step
    arithmetic."""
    config, accelerator = run.config, run.accelerator
    run.pairs_per_step = min(config.effective_batch_size, len(run.data.train))
    if run.pairs_per_step % accelerator.num_processes:
        raise DpokitError(
            f"effective_batch_size: {run.pairs_per_step} pairs per step do not split evenly over "
            f"{accelerator.num_processes} processes"
        )
    run.steps_per_epoch = len(run.data.train) // run.pairs_per_step
    run.total_steps = config.max_steps or run.steps_per_epoch * config.num_epochs
    run.trainable = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        run.trainable, lr=config.resolved_learning_rate, weight_decay=config.weight_decay
    )
    warmup = math.ceil(config.warmup_ratio * run.total_steps)
    run.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, run.total_steps)
    run.scaler = run.precision.grad_scaler()
    if run.engine.name == "zero3":
        # After the schedule: DeepSpeed steps the AdamW it wraps, whose learning rate the schedule sets.
        run.policy, run.optimizer = zero3_initialize(run.policy, optimizer, config.max_grad_norm)
    elif run.sharded:
        run.optimizer = optimizer
    else:
        run.policy, run.optimizer = accelerator.prepare(run.policy, optimizer)


def step_indices(
    num_pairs: int, pairs_per_step: int, step: int, steps_per_epoch: int, seed: int
) -> list[int]:
    """Pair indices of optimizer step `step`: a fresh seeded permutation per epoch, so resuming at any step
    sees exactly the pairs an uninterrupted run would."""
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[within * pairs_per_step : (within + 1) * pairs_per_step]


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run identity and this run's, one phrase per setting."""
    return [
        f"{name} changed" + ("" if name == "train_data" else f" ({saved[name]!r} -> {current[name]!r})")
        for name in current
        if name in saved and saved[name] != current[name]
    ]
