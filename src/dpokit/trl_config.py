"""A TRL 1.16 `DPOConfig` (or a mapping of its fields) as a dpokit `RunConfig`, for users migrating from TRL.

    dpokit train --from-trl trl.yaml model=./sft-model train_data=pairs.jsonl

    from dpokit import RunConfig
    config = RunConfig.from_trl(dpo_config, model="./sft-model", train_data="pairs.jsonl")

Three kinds of TRL fields:
- MAPPED: a dpokit field does the same thing (beta, loss_type, learning_rate, the batch arithmetic, ...).
- Fields that change the numbers and that dpokit lacks (a linear schedule, keep_end truncation, another
  optimizer, ...): a one-line DpokitError naming the field, unless the value is the one dpokit computes.
- Everything else (logging, saving, hub, dataloader, kernels) does not change the numbers: a warning names
  those a mapping sets, and apart the names that are no DPOConfig field (a typo); a DPOConfig object's other
  fields are not read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from enum import Enum
from typing import Any

from pydantic import ValidationError

from dpokit.config import RunConfig, range_warnings, validation_error
from dpokit.errors import DpokitError

# TRL 1.16 DPOConfig defaults of every field read here (tests/test_from_trl.py checks them against TRL).
TRL_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "label_smoothing": 0.0,
    "learning_rate": 1e-6,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 1024,
    "precompute_ref_log_probs": False,
    "gradient_checkpointing": True,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "seed": 42,
    "output_dir": None,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "bf16": None,
    "fp16": False,
    "trust_remote_code": False,
    # Change the numbers; dpokit computes only the default (or the listed accepted values).
    "truncation_mode": "keep_start",
    "loss_weights": None,
    "use_weighting": False,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "sync_ref_model": False,
    "disable_dropout": True,
    "optim": "adamw_torch_fused",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_scheduler_kwargs": None,
    "neftune_noise_alpha": None,
    "router_aux_loss_coef": None,
    "train_sampling_strategy": "random",
    "data_seed": None,
    "model_init_kwargs": None,
}

# The other fields of TRL 1.16's DPOConfig (with transformers 5): none changes the numbers dpokit computes
# (logging, saving, evaluation cadence, hub, devices, dataloader, kernels, options of refused features).
# A name in neither list is not a DPOConfig field: misspelt, or from an older TRL or transformers.
TRL_IGNORED = frozenset(
    """
    accelerator_config activation_checkpointing_kwargs activation_offloading
    auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16_full_eval dataloader_drop_last
    dataloader_in_order dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers
    dataloader_pin_memory dataloader_prefetch_factor dataset_num_proc ddp_backend ddp_broadcast_buffers
    ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug deepspeed disable_tqdm
    discopop_tau do_eval do_predict do_train enable_jit_checkpoint eval_accumulation_steps eval_delay
    eval_do_concat_batches eval_on_start eval_steps eval_strategy eval_use_gather_object f_alpha_divergence_coef
    fp16_full_eval fsdp fsdp_config full_determinism gradient_checkpointing_kwargs greater_is_better
    hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token ignore_data_skip
    include_for_metrics include_num_input_tokens_seen label_names label_smoothing_factor length_column_name
    liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica log_on_each_node
    logging_first_step logging_nan_inf_filter logging_steps logging_strategy metric_for_best_model
    optim_args optim_target_modules pad_to_multiple_of pad_token padding_free parallelism_config
    per_device_eval_batch_size precompute_ref_batch_size prediction_loss_only project push_to_hub
    ref_model_mixup_alpha ref_model_sync_steps remove_unused_columns report_to
    restore_callback_states_from_checkpoint resume_from_checkpoint run_name save_on_each_node save_only_model
    save_steps save_strategy save_total_limit skip_memory_metrics tf32 torch_compile torch_compile_backend
    torch_compile_mode torch_empty_cache_steps trackio_bucket_id trackio_space_id trackio_static_space_id
    use_cache use_cpu use_liger_kernel
    """.split()
)

# TRL loss names with a dpokit loss of the same formula.
LOSS_NAMES = {
    "sigmoid": "sigmoid",
    "robust": "robust",
    "hinge": "hinge",
    "ipo": "ipo",
    "sigmoid_norm": "sigmoid_norm",
}

# Fields that change the numbers, with the values dpokit computes and why others are refused.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "truncation_mode": (("keep_start",), "dpokit keeps the start of prompt + answer (keep_start) only"),
    "loss_weights": ((None, [1.0]), "dpokit trains one loss at a time"),
    "use_weighting": ((False,), "WPO weighting is not implemented"),
    "ld_alpha": ((None,), "LD-DPO is not implemented"),
    "f_divergence_type": (("reverse_kl",), "dpokit's DPO losses use the reverse KL only"),
    "sync_ref_model": ((False,), "the reference stays frozen (TR-DPO is not implemented)"),
    "disable_dropout": ((True,), "dpokit always disables dropout"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "dpokit steps torch's AdamW"),
    "adam_beta1": ((0.9,), "dpokit's AdamW uses betas (0.9, 0.999)"),
    "adam_beta2": ((0.999,), "dpokit's AdamW uses betas (0.9, 0.999)"),
    "adam_epsilon": ((1e-8,), "dpokit's AdamW uses eps 1e-8"),
    "lr_scheduler_kwargs": ((None, {}), "dpokit's cosine schedule takes no options"),
    "neftune_noise_alpha": ((None,), "NEFTune noise is not implemented"),
    "router_aux_loss_coef": ((None, 0.0), "dpokit adds no Mixture-of-Experts load-balancing loss"),
    "train_sampling_strategy": (("random",), "dpokit draws each epoch's pairs in a seeded random order"),
    "lr_scheduler_type": (
        ("cosine",),
        "dpokit decays the learning rate by cosine after warmup, TRL by default linearly; set "
        "lr_scheduler_type: cosine to train with dpokit's schedule",
    ),
}

# TRL fields that do not change the numbers (logging, saving, evaluation cadence, hub, devices, kernels):
# set away from TRL's default in a mapping, they are named in one warning with the dpokit field to use.
IGNORED_HINTS = {
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "eval_steps": "eval_every",
    "report_to": "report_to",
    "per_device_eval_batch_size": "micro_batch_size",
}


def _plain(value: Any) -> Any:
    """An enum's value (TRL stores lr_scheduler_type and optim as str enums), other values unchanged."""
    return value.value if isinstance(value, Enum) else value


def _read(trl_config: Any) -> tuple[dict[str, Any], list[str]]:
    """The fields read here (TRL's default where absent), and the other keys a mapping sets."""
    if isinstance(trl_config, Mapping):
        given = dict(trl_config)
        if isinstance(given.get("loss_type"), str):
            given["loss_type"] = [given["loss_type"]]  # DPOConfig accepts one name as a string
        if "activation_checkpointing" in given:  # transformers 5's name; DPOConfig keeps both in step
            given.setdefault("gradient_checkpointing", given.pop("activation_checkpointing"))
        fields = {**TRL_DEFAULTS, **{k: v for k, v in given.items() if k in TRL_DEFAULTS}}
        if "warmup_ratio" in given:  # transformers < 5 had warmup_ratio beside integer warmup_steps
            fields["warmup_ratio"] = given["warmup_ratio"]
        others = [k for k in given if k not in TRL_DEFAULTS and k != "warmup_ratio"]
        return fields, others
    if not hasattr(trl_config, "to_dict"):  # TrainingArguments and DPOConfig have it
        raise DpokitError(
            f"from_trl: expected a trl.DPOConfig or a mapping of its fields, got {type(trl_config).__name__}"
        )
    fields = {name: _plain(getattr(trl_config, name, default)) for name, default in TRL_DEFAULTS.items()}
    if getattr(trl_config, "warmup_ratio", None):
        fields["warmup_ratio"] = trl_config.warmup_ratio
    return fields, []


def _loss(fields: dict[str, Any]) -> dict[str, Any]:
    names = fields["loss_type"]
    if len(names) != 1:
        raise DpokitError(f"field 'loss_type': {names} combines losses; dpokit trains one loss at a time")
    name = names[0]
    if name not in LOSS_NAMES:
        raise DpokitError(
            f"field 'loss_type': TRL's {name!r} has no dpokit equivalent (supported: {', '.join(LOSS_NAMES)})"
        )
    smoothing = fields["label_smoothing"]
    if name == "robust":
        return {"loss_type": "robust", "label_smoothing": smoothing}
    if smoothing > 0:  # TRL 1.16 reads it for robust (and EXO) only: its sigmoid is not conservative DPO
        warnings.warn(
            f"from_trl: field 'label_smoothing' is ignored by {name}, in TRL 1.16 as here (dpokit's "
            "loss_type: conservative is label-smoothed DPO)",
            UserWarning,
            stacklevel=3,
        )
    return {"loss_type": LOSS_NAMES[name]}


def _steps(fields: dict[str, Any]) -> dict[str, Any]:
    """Epochs, max_steps and warmup: dpokit counts whole epochs and sets warmup as a share of the steps."""
    mapped: dict[str, Any] = {}
    max_steps = fields["max_steps"]
    if max_steps > 0:
        mapped["max_steps"] = max_steps  # TRL ignores num_train_epochs then, as dpokit does
    else:
        epochs = fields["num_train_epochs"]
        if epochs != int(epochs) or epochs < 1:
            raise DpokitError(
                f"field 'num_train_epochs': {epochs}; dpokit trains whole epochs (1, 2, 3, ...)"
            )
        mapped["num_epochs"] = int(epochs)
    warmup = fields["warmup_steps"]
    if fields.get("warmup_ratio"):
        if warmup:
            raise DpokitError("field 'warmup_steps': set either warmup_steps or warmup_ratio, not both")
        warmup = fields["warmup_ratio"]
    if warmup < 1:  # a share of the steps; both round it up (math.ceil)
        mapped["warmup_ratio"] = warmup
    elif max_steps <= 0:
        raise DpokitError(
            f"field 'warmup_steps': {warmup} steps; dpokit sets warmup as a share of the steps, so give a "
            "fraction below 1 (or set max_steps)"
        )
    elif int(warmup) > max_steps:
        raise DpokitError(
            f"field 'warmup_steps': {warmup} steps is more than max_steps {max_steps}; dpokit's warmup ends "
            "within the run"
        )
    else:
        mapped["warmup_ratio"] = _share(int(warmup), max_steps)  # TRL: int(warmup_steps) from 1 up
    return mapped


def _share(warmup: int, steps: int) -> float:
    """The ratio r with ceil(r * steps) == warmup, dpokit's warmup arithmetic. warmup / steps itself can round
    up one step (7 / 25 * 25 == 7.000000000000001), so it is lowered by ulps until it does not."""
    ratio = warmup / steps
    while math.ceil(ratio * steps) > warmup:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def _precision(fields: dict[str, Any]) -> str:
    """TRL's bf16/fp16 flags: mixed precision (autocast over fp32 weights), as dpokit's *-mixed."""
    if fields["fp16"]:
        return "fp16-mixed"
    if fields["bf16"] is None:
        return "auto"  # TRL: bf16 where the device has it; dpokit: bf16-mixed on CUDA, fp32 on CPU
    return "bf16-mixed" if fields["bf16"] else "fp32"


def run_config_from_trl(trl_config: Any, *, processes: int = 1, **overrides: Any) -> RunConfig:
    """A RunConfig that trains as the TRL 1.16 `DPOConfig` (or mapping of its fields) `trl_config` does.

    processes: how many processes (GPUs) the TRL run used; the effective batch is per-device batch x
    gradient accumulation x processes. overrides: dpokit fields TRL's config does not hold (model,
    train_data, eval_data, use_lora, ...). Like TRL without a peft_config, the mapped run fine-tunes all
    weights (use_lora: false) unless an override says otherwise.

    >>> config = RunConfig.from_trl({"beta": 0.1, "lr_scheduler_type": "cosine"}, model="./sft-model")
    """
    if processes < 1:
        raise DpokitError(f"from_trl: processes must be at least 1, got {processes}")
    fields, others = _read(trl_config)
    for name, (accepted, why) in UNSUPPORTED.items():
        value = _plain(fields[name])
        if value not in accepted:
            raise DpokitError(f"field '{name}': {value!r} is not supported ({why})")
    if fields["max_length"] is None:
        raise DpokitError(
            "field 'max_length': None (no truncation) is not supported; give a length in tokens"
        )
    if fields["data_seed"] not in (None, fields["seed"]):
        raise DpokitError(
            f"field 'data_seed': {fields['data_seed']!r} is not supported (dpokit orders the pairs by seed; "
            "leave data_seed unset or equal to seed)"
        )
    init_kwargs = fields["model_init_kwargs"] or {}
    dtype = str(init_kwargs.get("dtype", init_kwargs.get("torch_dtype", "float32"))).removeprefix("torch.")
    if dtype != "float32":
        raise DpokitError(
            f"field 'model_init_kwargs': dtype {dtype} is not supported here (TRL trains the weights in that "
            "dtype; set dpokit's precision instead: bf16-pure casts every weight to bf16)"
        )
    if not fields["max_grad_norm"]:
        raise DpokitError("field 'max_grad_norm': 0 (no clipping) is not supported; dpokit always clips")
    micro = fields["per_device_train_batch_size"]
    mapped: dict[str, Any] = {
        "beta": fields["beta"],
        **_loss(fields),
        "learning_rate": fields["learning_rate"],
        **_steps(fields),
        "effective_batch_size": micro * fields["gradient_accumulation_steps"] * processes,
        "micro_batch_size": micro,
        "max_length": fields["max_length"],
        "reference_mode": "precompute" if fields["precompute_ref_log_probs"] else "live",
        "gradient_checkpointing": fields["gradient_checkpointing"],
        "seed": fields["seed"],
        "weight_decay": fields["weight_decay"],
        "max_grad_norm": fields["max_grad_norm"],
        "precision": _precision(fields),
        "trust_remote_code": fields["trust_remote_code"],
        "use_lora": False,
    }
    if fields["output_dir"] is not None:
        mapped["output_dir"] = str(fields["output_dir"])
    ignored = [name for name in others if name in TRL_IGNORED]
    unknown = [name for name in others if name not in TRL_IGNORED]
    if ignored:
        hints = [
            f"{name} (dpokit: {IGNORED_HINTS[name]})" if name in IGNORED_HINTS else name for name in ignored
        ]
        warnings.warn(
            f"from_trl: ignored TRL fields that do not change the numbers here: {', '.join(hints)}",
            UserWarning,
            stacklevel=2,
        )
    if unknown:
        warnings.warn(
            f"from_trl: ignored names that are not fields of TRL 1.16's DPOConfig (misspelt, or from another "
            f"version?): {', '.join(unknown)}",
            UserWarning,
            stacklevel=2,
        )
    try:
        config = RunConfig(**{**mapped, **overrides})
    except ValidationError as error:
        raise validation_error(error, None) from None
    for note in range_warnings(config):
        warnings.warn(note, UserWarning, stacklevel=2)
    return config
