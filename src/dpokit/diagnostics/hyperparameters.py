"""Findings for config values outside SPEC §2's recommended ranges.

The beta and learning-rate ranges (LoRA's included, with its reasons) live in ``dpokit.config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpokit.config import BETA_RANGE, FULL_LR_RANGE, LORA_LR_RANGE, SIMPO_BETA_RANGE
from dpokit.diagnostics.findings import Finding, finite


@dataclass(frozen=True)
class Recommended:
    """A hyperparameter's recommended range; values above it up to ``tolerated_high`` only inform."""

    key: str
    low: float
    high: float
    tolerated_high: float
    why: str
    fix_low: str
    fix_high: str


# Beta above its range is only noted up to here (SPEC §2: "up to 0.2 when drifting"); config.py agrees.
BETA_TOLERATED_HIGH = 0.2
EPOCHS = (1, 3)
EFFECTIVE_BATCH_SIZE = (128, 1024)


def recommended_ranges(config: Mapping[str, Any]) -> list[Recommended]:
    """The ranges that apply to this config (LoRA changes the learning rate, SimPO the beta)."""
    simpo = config.get("loss_type") == "simpo"
    beta_low, beta_high = SIMPO_BETA_RANGE if simpo else BETA_RANGE
    lr_low, lr_high = LORA_LR_RANGE if config.get("use_lora") else FULL_LR_RANGE
    return [
        Recommended(
            key="beta",
            low=beta_low,
            high=beta_high,
            tolerated_high=beta_high if simpo else BETA_TOLERATED_HIGH,
            why="Beta sets how far the policy may move from the reference: a low beta follows preferences "
            "aggressively and risks gibberish, a high one is stable and keeps pre-trained knowledge.",
            fix_low=f"Raise beta towards {beta_high:g}.",
            fix_high=f"Lower beta to {beta_high:g}"
            + ("." if simpo else f"; go up to {BETA_TOLERATED_HIGH:g} only if the policy drifts."),
        ),
        Recommended(
            key="learning_rate",
            low=lr_low,
            high=lr_high,
            tolerated_high=lr_high,
            why="DPO needs rates far below SFT rates: high rates diverge at once, low ones leave the loss flat"
            + (" (LoRA adapters tolerate larger rates)." if config.get("use_lora") else "."),
            fix_low=f"Raise the learning rate into {lr_low:g}-{lr_high:g}.",
            fix_high=f"Lower the learning rate into {lr_low:g}-{lr_high:g}.",
        ),
        Recommended(
            key="num_epochs",
            low=EPOCHS[0],
            high=EPOCHS[1],
            tolerated_high=EPOCHS[1],
            why="One epoch is usually best; more epochs tend to reward hacking (metrics up, quality down).",
            fix_low="Train at least one epoch.",
            fix_high="Train 1 epoch (at most 3).",
        ),
        Recommended(
            key="effective_batch_size",
            low=EFFECTIVE_BATCH_SIZE[0],
            high=EFFECTIVE_BATCH_SIZE[1],
            tolerated_high=EFFECTIVE_BATCH_SIZE[1],
            why="Preference pairs need large batches for stable gradient estimates.",
            fix_low="Reach 128 pairs per optimizer step with gradient accumulation.",
            fix_high="Use at most 1024 pairs per optimizer step, so the run takes enough steps.",
        ),
    ]


def hyperparameter_findings(config: Mapping[str, Any]) -> list[Finding]:
    """A warning per config value outside its range (info in beta's tolerated band)."""
    findings = []
    for rec in recommended_ranges(config):
        value = config.get(rec.key)
        if not finite(value) or rec.low <= value <= rec.high:
            continue
        below = value < rec.low
        findings.append(
            Finding(
                code=f"{rec.key}_out_of_range",
                severity="warning" if below or value > rec.tolerated_high else "info",
                title=f"{rec.key} = {value:g} is {'below' if below else 'above'} the recommended range",
                evidence=f"config.yaml: {rec.key} = {value:g}; recommended {rec.low:g}-{rec.high:g}.",
                cause=rec.why,
                fix=rec.fix_low if below else rec.fix_high,
                data={"value": value, "low": rec.low, "high": rec.high},
            )
        )
    return findings
