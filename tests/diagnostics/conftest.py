"""Synthetic runs for the diagnostics tests: a healthy run that symptom tests then break on purpose."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

STEPS, WARMUP, EVAL_EVERY = 200, 20, 50
PEAK_LR, BETA = 1e-6, 0.1
CHOSEN_LEN, REJECTED_LEN = 250.0, 230.0
# Per-token log-probs of the reference model on the chosen and rejected answers.
REF_CHOSEN_PER_TOKEN, REF_REJECTED_PER_TOKEN = -1.1, -1.3

HEALTHY_CONFIG = {
    "beta": BETA,
    "learning_rate": PEAK_LR,
    "num_epochs": 1,
    "loss_type": "sigmoid",
    "use_lora": False,
    "effective_batch_size": 128,
    "warmup_ratio": WARMUP / STEPS,
}


def _preference_metrics(rng: random.Random, step: int, final_margin: float, pairs: int) -> dict[str, float]:
    """Metrics of a batch of ``pairs`` pairs whose margins are drawn around a mean growing to ``final_margin``.

    The spread grows with the mean, so accuracy settles near 0.7 as in real DPO runs;
    chosen rewards take 10% of the margin, rejected the rest (both as log-ratios times beta).
    """
    mean = final_margin * (1 - math.exp(-step / 70))
    margins = [rng.gauss(mean, 0.05 + 1.9 * mean) for _ in range(pairs)]
    margin = sum(margins) / len(margins)
    chosen_reward = 0.1 * margin
    rejected_reward = chosen_reward - margin
    # Batch-to-batch length noise of +-10 tokens, deterministic.
    chosen_len, rejected_len = CHOSEN_LEN + 10 * math.sin(step), REJECTED_LEN + 10 * math.cos(step)
    return {
        "loss": sum(math.log1p(math.exp(-m)) for m in margins) / len(margins),
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": sum(m > 0 for m in margins) / len(margins),
        "rewards/margins": margin,
        "logps/chosen": REF_CHOSEN_PER_TOKEN * chosen_len + chosen_reward / BETA,
        "logps/rejected": REF_REJECTED_PER_TOKEN * rejected_len + rejected_reward / BETA,
        "kl": (chosen_reward + rejected_reward) / BETA / 2,
        "lengths/chosen": chosen_len,
        "lengths/rejected": rejected_len,
    }


def _records(final_margin: float, seed: int = 0, steps: int = STEPS) -> list[dict[str, Any]]:
    """A run of ``steps`` steps, logged every step: linear warmup to 1e-6 over 20 steps, then cosine decay;
    loss falls smoothly from ln 2, margins grow to ~0.9, accuracy to ~0.7, |kl| stays ~0.015 nat/token.
    Batches of 128 pairs; an eval record (512 pairs) follows every 50th train record. ``final_margin=0`` gives a run that learns nothing.
    """
    rng = random.Random(seed)
    records = []
    for step in range(1, steps + 1):
        if step <= WARMUP:
            lr = PEAK_LR * step / WARMUP
        else:
            lr = PEAK_LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (steps - WARMUP)))
        train = {"split": "train", "step": step, "epoch": step / steps}
        train |= _preference_metrics(rng, step, final_margin, pairs=128)
        records.append(train | {"lr": lr, "grad_norm": 4.0 + rng.random()})
        if step % EVAL_EVERY == 0:
            records.append(
                {"split": "eval", "step": step}
                | _preference_metrics(rng, step, 0.9 * final_margin, pairs=512)
            )
    return records


@pytest.fixture
def healthy_samples() -> list[dict[str, Any]]:
    """Reference samples at step 0 and policy samples at steps 100 and 200, alike in length and health."""
    prompts = [
        "Write a haiku about rain.",
        "Explain <b>bold</b> HTML tags.",
        "What is 2 + 2?",
        "Name a colour.",
    ]
    samples = []
    for step, source in ((0, "reference"), (100, "policy"), (200, "policy")):
        for index, prompt in enumerate(prompts):
            samples.append(
                {
                    "step": step,
                    "source": source,
                    "prompt": prompt,
                    "text": f"{source} answer {index} at step {step}: a short, fresh reply.",
                    "num_tokens": 40 + index + (2 if source == "policy" else 0),
                    "repetition": 0.02,
                    "ref_ppl": 3.5 if source == "policy" else 2.5,
                }
            )
    return samples


def _write_run(
    run_dir: Path,
    records: list[dict[str, Any]],
    config: dict[str, Any] | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a run directory as the trainer does (Python json writes NaN and Infinity as such)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config if config is not None else HEALTHY_CONFIG))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if samples is not None:
        (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run_dir


@pytest.fixture
def healthy_config() -> dict[str, Any]:
    return dict(HEALTHY_CONFIG)


@pytest.fixture
def healthy_records() -> list[dict[str, Any]]:
    return _records(final_margin=0.9)


@pytest.fixture
def long_records() -> list[dict[str, Any]]:
    """The healthy run stretched to 2000 steps: 2000 train and 40 eval records."""
    return _records(final_margin=0.9, steps=2000)


@pytest.fixture
def flat_records() -> list[dict[str, Any]]:
    """The healthy run's schedule, but margins stay at zero: the loss sits at ln 2."""
    return _records(final_margin=0.0)


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """``make_run(records, config=None, samples=None)`` writes a run under tmp_path and returns its dir."""

    def make(
        records: list[dict[str, Any]],
        config: dict[str, Any] | None = None,
        samples: list[dict[str, Any]] | None = None,
    ) -> Path:
        return _write_run(tmp_path / "run", records, config, samples)

    return make
