"""SPEC §2's recommended hyperparameter ranges, with the reason behind each and the check against them.

A leaf module: the config reads it to validate and warn at load time, the diagnostics to report
findings, so neither has to import the other and the ranges are written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# LoRA trains a low-rank update scaled by alpha/r, so it needs larger steps than full fine-tuning to move as far;
# the alignment-handbook's QLoRA DPO recipes use 5e-6, and small models like SmolLM2 tolerate up to ~1e-4.
LORA_LR_RANGE = (5e-6, 1e-4)
FULL_LR_RANGE = (5e-7, 2e-6)
BETA_RANGE = (0.01, 0.1)
SIMPO_BETA_RANGE = (1.0, 10.0)  # SimPO's beta scales per-token log-probs, so its useful range is far higher
# Beta above its range is only noted up to here (SPEC §2: "up to 0.2 when drifting").
BETA_TOLERATED_HIGH = 0.2
EPOCHS = (1, 3)
EFFECTIVE_BATCH_SIZE = (128, 1024)


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


@dataclass(frozen=True)
class OutOfRange:
    """A config value outside its recommended range; ``tolerated`` when it is only in the noted band above."""

    range: Recommended
    value: float

    @property
    def below(self) -> bool:
        return self.value < self.range.low

    @property
    def tolerated(self) -> bool:
        return not self.below and self.value <= self.range.tolerated_high

    @property
    def title(self) -> str:
        side = "below" if self.below else "above"
        return f"{self.range.key} = {self.value:g} is {side} the recommended range"

    @property
    def recommended(self) -> str:
        return f"recommended {self.range.low:g}-{self.range.high:g}"

    @property
    def fix(self) -> str:
        return self.range.fix_low if self.below else self.range.fix_high


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


def out_of_range(config: Mapping[str, Any]) -> list[OutOfRange]:
    """Each of ``config``'s values outside the range that applies to it, in ``recommended_ranges`` order.

    Only finite numbers are checked: a config.yaml read back by the doctor may lack a key or hold
    something else there, which is not this check's business.
    """
    found = []
    for rec in recommended_ranges(config):
        value = config.get(rec.key)
        numeric = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if numeric and not rec.low <= value <= rec.high:
            found.append(OutOfRange(rec, value))
    return found
