"""Pure rules that diagnose a DPO run from its metric records, its config and its generated samples.

Each rule maps a ``RunData`` to a list of ``Finding``; ``RULES`` names them and ``run_rules``
applies them all. The doctor runs them once over a finished run, the watchdog after every
logged step, so a rule must stay silent on any prefix of a healthy run. Thresholds are module
constants, each with the reason for its value; causes and fixes follow SPEC §5.

Metric units: ``logps/*`` and ``kl`` are summed over answer tokens (nats per answer), so rules
divide by ``lengths/*`` to compare batches whose answers differ in length; ``rewards/*`` are
beta-scaled log-ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpokit.diagnostics.findings import Finding, diagnosed, finite
from dpokit.diagnostics.hyperparameters import hyperparameter_findings

LN2 = math.log(2)  # sigmoid DPO loss when the policy has not moved from the reference (margin 0)

# Records averaged at each end of a run when comparing "now" with "at the start": one batch is
# noisy, five smooth it while still reacting within a few logging steps.
WINDOW = 5

# Flat loss: the last FLAT_WINDOW post-warmup train records average a loss within
# FLAT_LOSS_REL_TOL of the first logged loss (ln 2 for sigmoid DPO: 0.0104 nats) and a margin
# within FLAT_MARGIN_TOL of the first margin. A margin of 0.02 moves sigmoid loss by only 0.01,
# while healthy runs pass both within a few dozen steps after warmup.
FLAT_WINDOW = 20
FLAT_LOSS_REL_TOL = 0.015
FLAT_MARGIN_TOL = 0.02

# Divergence: the chosen answers lose 1 nat per token (each token e times less likely) against
# the first records, or |kl| reaches 1 nat per answer token. Healthy DPO runs move chosen answers
# by a few tenths of a nat per token at most.
DIVERGENCE_DROP_PER_TOKEN = 1.0
DIVERGENCE_KL_PER_TOKEN = 1.0

# Likelihood displacement: chosen and rejected both lose at least 0.25 nat per token, short of
# divergence (above that the divergence finding says it, more urgently).
DISPLACEMENT_DROP_PER_TOKEN = 0.25

# Reward hacking: train accuracy saturates while eval lags by 20 points, or the mean margin
# passes 10 (sigmoid loss 4.5e-5: pairs pushed far beyond what the loss asks; high enough for
# SimPO, whose beta is 2-10).
SATURATED_ACCURACY = 0.95
ACCURACY_GAP = 0.2
EXPLODED_MARGIN = 10.0

# Verbosity: answers 30% and at least 10 tokens longer (the token floor keeps 5 -> 7 tokens quiet).
VERBOSITY_RATIO = 1.3
VERBOSITY_MIN_EXTRA_TOKENS = 10

# Gibberish samples: half of the 3-grams repeat an earlier one (a loop), or the reference model
# finds the text less likely than a 100-way guess per token. Flagged when the share of such
# policy samples exceeds the reference's own share (small models loop too) by 25 points.
DEGENERATE_REPETITION = 0.5
DEGENERATE_REF_PPL = 100.0
GIBBERISH_SHARE_GAP = 0.25


@dataclass
class RunData:
    """What the rules see: the config, train and eval metric records in step order, and samples."""

    config: Mapping[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        """Append one metric record to its split's list."""
        (self.eval if record.get("split") == "eval" else self.train).append(record)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _column(records: list[dict[str, Any]], key: str) -> list[float]:
    """The finite values of ``key``; NaN/inf are the non-finite rule's business, not every rule's."""
    return [record[key] for record in records if finite(record.get(key))]


def _per_token(records: list[dict[str, Any]], logp_key: str, length_key: str) -> list[float]:
    """Per-record log-prob per answer token, so batches of long and short answers compare."""
    return [
        record[logp_key] / record[length_key]
        for record in records
        if finite(record.get(logp_key)) and finite(record.get(length_key)) and record[length_key] > 0
    ]


def _steps(records: list[dict[str, Any]]) -> str:
    return f"{records[0]['step']}-{records[-1]['step']}"


def _warmup_end(train: list[dict[str, Any]]) -> int:
    """Index of the first record after the learning rate stopped rising (0 when lr is not logged)."""
    if not _column(train, "lr"):
        return 0
    for index in range(1, len(train)):
        previous, current = train[index - 1].get("lr"), train[index].get("lr")
        if finite(previous) and finite(current) and current <= previous:
            return index
    return len(train)


def non_finite_metrics(run: RunData) -> list[Finding]:
    """Any NaN or infinite metric value: the run is numerically broken from that step on."""
    bad = [
        (
            record,
            split,
            [key for key, value in record.items() if isinstance(value, float) and not finite(value)],
        )
        for split, records in (("train", run.train), ("eval", run.eval))
        for record in records
    ]
    bad = [item for item in bad if item[2]]
    if not bad:
        return []
    # The earliest step; train before eval, as the trainer logs them.
    record, split, keys = min(bad, key=lambda item: (item[0]["step"], item[1] == "eval"))
    values = ", ".join(f"{key}={record[key]}" for key in keys)
    evidence = f"{values} at step {record['step']} ({split}); {len(bad)} record(s) hold non-finite values."
    data = {"step": record["step"], "split": split, "keys": keys, "records": len(bad)}
    return [diagnosed("non_finite_metrics", evidence, data, record["step"])]


def flat_loss(run: RunData) -> list[Finding]:
    """The loss stays at its first value (ln 2 for sigmoid DPO) and the margin at 0 after warmup."""
    window = run.train[_warmup_end(run.train) :][-FLAT_WINDOW:]
    first_loss, first_margin = _column(run.train, "loss")[:1], _column(run.train, "rewards/margins")[:1]
    losses, margins = _column(window, "loss"), _column(window, "rewards/margins")
    if len(window) < FLAT_WINDOW or not losses or not margins:
        return []
    loss, margin = _mean(losses), _mean(margins)
    if abs(loss - first_loss[0]) > FLAT_LOSS_REL_TOL * abs(first_loss[0]):
        return []
    if abs(margin - first_margin[0]) > FLAT_MARGIN_TOL:
        return []
    evidence = (
        f"train loss averaged {loss:.4f} over steps {_steps(window)}, against {first_loss[0]:.4f} at the first "
        f"step (ln 2 = {LN2:.4f} is the sigmoid loss of a policy that has not moved); the reward margin "
        f"averaged {margin:.4f}; learning rate {run.config.get('learning_rate', 'unknown')}."
    )
    data = {"loss": loss, "first_loss": first_loss[0], "margin": margin, "steps": _steps(window)}
    return [diagnosed("flat_loss", evidence, data, window[-1]["step"])]


def _kl_per_token(record: dict[str, Any]) -> float | None:
    """|kl| per answer token (kl is averaged over chosen and rejected, so is the length)."""
    values = [record.get(key) for key in ("kl", "lengths/chosen", "lengths/rejected")]
    if not all(finite(value) for value in values) or values[1] + values[2] <= 0:
        return None
    return abs(values[0]) / ((values[1] + values[2]) / 2)


def divergence(run: RunData) -> list[Finding]:
    """Chosen log-probs collapsing against their start, or |kl| per token growing large."""
    if len(run.train) < 2 * WINDOW:
        return []
    head, tail = run.train[:WINDOW], run.train[-WINDOW:]
    start = _per_token(head, "logps/chosen", "lengths/chosen")
    now = _per_token(tail, "logps/chosen", "lengths/chosen")
    kls = [kl for kl in map(_kl_per_token, tail) if kl is not None]
    parts, data = [], {}
    if start and now:
        data.update(chosen_per_token_start=_mean(start), chosen_per_token_now=_mean(now))
        if _mean(start) - _mean(now) >= DIVERGENCE_DROP_PER_TOKEN:
            parts.append(
                f"chosen answers' log-prob per token fell from {_mean(start):.2f} (steps {_steps(head)}) to "
                f"{_mean(now):.2f} (steps {_steps(tail)}), a drop of {_mean(start) - _mean(now):.2f} nats/token"
            )
    if kls:
        data["kl_per_token"] = _mean(kls)
        if _mean(kls) >= DIVERGENCE_KL_PER_TOKEN:
            parts.append(f"|kl| reached {_mean(kls):.2f} nats per answer token over steps {_steps(tail)}")
    if not parts:
        return []
    return [diagnosed("divergence", "; ".join(parts) + ".", data, tail[-1]["step"])]


def likelihood_displacement(run: RunData) -> list[Finding]:
    """Chosen and rejected log-probs both falling substantially (short of divergence)."""
    if len(run.train) < 2 * WINDOW:
        return []
    head, tail = run.train[:WINDOW], run.train[-WINDOW:]
    moves = {}
    for side in ("chosen", "rejected"):
        start = _per_token(head, f"logps/{side}", f"lengths/{side}")
        now = _per_token(tail, f"logps/{side}", f"lengths/{side}")
        if not start or not now:
            return []
        moves[side] = (_mean(start), _mean(now))
    chosen_drop = moves["chosen"][0] - moves["chosen"][1]
    rejected_drop = moves["rejected"][0] - moves["rejected"][1]
    if not DISPLACEMENT_DROP_PER_TOKEN <= chosen_drop < DIVERGENCE_DROP_PER_TOKEN:
        return []
    if rejected_drop < DISPLACEMENT_DROP_PER_TOKEN:
        return []
    evidence = "; ".join(
        f"{side} log-prob per token {start:.2f} -> {now:.2f} (-{start - now:.2f})"
        for side, (start, now) in moves.items()
    )
    evidence += f", from steps {_steps(head)} to steps {_steps(tail)}."
    data = {"chosen_drop": chosen_drop, "rejected_drop": rejected_drop}
    return [diagnosed("likelihood_displacement", evidence, data, tail[-1]["step"])]


def _accuracy_gap(run: RunData) -> tuple[str, dict[str, Any], int] | None:
    """Train accuracy saturated by the latest eval while eval accuracy lags by ACCURACY_GAP."""
    evals = [record for record in run.eval if finite(record.get("rewards/accuracies"))]
    if not evals:
        return None
    latest = evals[-1]
    before = [r for r in run.train if r["step"] <= latest["step"] and finite(r.get("rewards/accuracies"))]
    rolling = [
        _mean([r["rewards/accuracies"] for r in before[i + 1 - WINDOW : i + 1]])
        for i in range(WINDOW - 1, len(before))
    ]
    if not rolling:
        return None
    train_accuracy, eval_accuracy = rolling[-1], latest["rewards/accuracies"]
    gap = train_accuracy - eval_accuracy
    if train_accuracy < SATURATED_ACCURACY or gap < ACCURACY_GAP:
        return None
    first = before[WINDOW - 1 + next(i for i, acc in enumerate(rolling) if acc >= SATURATED_ACCURACY)]
    text = (
        f"train accuracy {train_accuracy:.2f} against eval accuracy {eval_accuracy:.2f} at step "
        f"{latest['step']} (gap {gap:.2f}); train accuracy first averaged >= {SATURATED_ACCURACY} at step "
        f"{first['step']} (epoch {first.get('epoch', float('nan')):.2f})"
    )
    data = {"train_accuracy": train_accuracy, "eval_accuracy": eval_accuracy, "gap": gap}
    return text, data | {"saturated_step": first["step"]}, latest["step"]


def reward_hacking(run: RunData) -> list[Finding]:
    """Train accuracy saturated while eval lags far behind, or margins exploding."""
    gap = _accuracy_gap(run)
    parts, data, step = ([gap[0]], gap[1], gap[2]) if gap else ([], {}, None)
    tail = run.train[-WINDOW:]
    margins = _column(tail, "rewards/margins")
    if len(tail) == WINDOW and margins and _mean(margins) >= EXPLODED_MARGIN:
        parts.append(f"mean reward margin {_mean(margins):.2f} over steps {_steps(tail)}")
        data["margin"], step = _mean(margins), tail[-1]["step"]
    if not parts:
        return []
    return [diagnosed("reward_hacking", "; ".join(parts) + ".", data, step)]


def _latest_samples(samples: list[dict[str, Any]]) -> tuple[int | None, dict[str, dict], dict[str, dict]]:
    """(latest policy step, its samples by prompt, the latest reference sample by prompt)."""
    policy = [s for s in samples if s.get("source") == "policy"]
    if not policy:
        return None, {}, {}
    step = max(s["step"] for s in policy)
    latest = {s["prompt"]: s for s in policy if s["step"] == step}
    ordered = sorted(samples, key=lambda s: s["step"])
    return step, latest, {s["prompt"]: s for s in ordered if s.get("source") == "reference"}


def _longer(now: float, before: float) -> bool:
    return now >= VERBOSITY_RATIO * before and now - before >= VERBOSITY_MIN_EXTRA_TOKENS


def verbosity(run: RunData) -> list[Finding]:
    """Policy samples longer than the reference's, or chosen answers getting longer over the run."""
    parts, data, at = [], {}, None
    step, policy, reference = _latest_samples(run.samples)
    prompts = [prompt for prompt in policy if prompt in reference]
    if prompts:
        policy_len = _mean([policy[p]["num_tokens"] for p in prompts])
        reference_len = _mean([reference[p]["num_tokens"] for p in prompts])
        if _longer(policy_len, reference_len):
            parts.append(
                f"policy samples at step {step} average {policy_len:.1f} tokens against {reference_len:.1f} "
                f"for the reference on the same {len(prompts)} prompt(s) ({policy_len / reference_len:.2f}x)"
            )
            data.update(policy_tokens=policy_len, reference_tokens=reference_len)
            at = step
    head, tail = run.train[:WINDOW], run.train[-WINDOW:]
    start, now = _column(head, "lengths/chosen"), _column(tail, "lengths/chosen")
    if len(run.train) >= 2 * WINDOW and start and now and _longer(_mean(now), _mean(start)):
        parts.append(
            f"chosen answers grew from {_mean(start):.1f} tokens (steps {_steps(head)}) to {_mean(now):.1f} "
            f"(steps {_steps(tail)})"
        )
        data.update(chosen_tokens_start=_mean(start), chosen_tokens_now=_mean(now))
        at = at if at is not None else tail[-1]["step"]
    if not parts:
        return []
    return [diagnosed("verbosity", "; ".join(parts) + ".", data, at)]


def _degenerate(sample: dict[str, Any]) -> bool:
    ref_ppl = sample.get("ref_ppl")
    looping = sample.get("repetition", 0.0) >= DEGENERATE_REPETITION
    return looping or (finite(ref_ppl) and ref_ppl >= DEGENERATE_REF_PPL)


def gibberish(run: RunData) -> list[Finding]:
    """More policy samples loop or look unlikely to the reference than the reference's own samples."""
    step, policy, reference = _latest_samples(run.samples)
    if not policy:
        return []
    bad = [prompt for prompt, sample in policy.items() if _degenerate(sample)]
    policy_share = len(bad) / len(policy)
    reference_share = _mean([float(_degenerate(s)) for s in reference.values()]) if reference else 0.0
    if policy_share - reference_share < GIBBERISH_SHARE_GAP:
        return []
    example = policy[bad[0]]
    evidence = (
        f"{len(bad)} of {len(policy)} policy samples at step {step} are degenerate (3-gram repetition >= "
        f"{DEGENERATE_REPETITION} or reference perplexity >= {DEGENERATE_REF_PPL:g}) against "
        f"{reference_share:.0%} of reference samples; e.g. prompt {example['prompt'][:60]!r}: repetition "
        f"{example.get('repetition', 0.0):.2f}, reference perplexity {example.get('ref_ppl')}."
    )
    data = {"policy_share": policy_share, "reference_share": reference_share, "prompts": bad}
    return [diagnosed("gibberish", evidence, data, step)]


def hyperparameters(run: RunData) -> list[Finding]:
    """Config values outside SPEC §2's recommended ranges."""
    return hyperparameter_findings(run.config)


Rule = Callable[[RunData], list[Finding]]

# Every rule, in the order its findings are listed among equals; the doctor and the watchdog run all.
RULES: dict[str, Rule] = {
    "non_finite_metrics": non_finite_metrics,
    "hyperparameters": hyperparameters,
    "divergence": divergence,
    "gibberish": gibberish,
    "flat_loss": flat_loss,
    "reward_hacking": reward_hacking,
    "likelihood_displacement": likelihood_displacement,
    "verbosity": verbosity,
}


def run_rules(run: RunData) -> list[Finding]:
    """Apply every rule in ``RULES`` to the run."""
    return [finding for rule in RULES.values() for finding in rule(run)]
