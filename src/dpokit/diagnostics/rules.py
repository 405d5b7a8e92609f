"""Pure rules that diagnose a DPO run from its metric records, its config and its generated samples.

Each rule maps a ``RunData`` to a list of ``Finding``; ``RULES`` names them and ``run_rules``
applies them all. The doctor runs them once over a finished run, the watchdog after every
logged step, so a rule must stay silent on any prefix of a healthy run, and must read a bounded
number of records (its windows, and ``RunData``'s running summaries for what lies before them)
so that a long run's watchdog costs the same per step as a short one's. Thresholds are module
constants, each with the reason for its value; causes and fixes follow SPEC §5.

Metric units: ``logps/*`` and ``kl`` are summed over answer tokens (nats per answer), so rules
divide by ``lengths/*`` to compare batches whose answers differ in length; ``rewards/*`` are
beta-scaled log-ratios.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
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
    """What the rules see: the config, train and eval metric records in step order, and samples.

    ``add`` and ``add_samples`` also keep running summaries of what lies outside the rules' windows,
    each updated in constant time per record, so the rules need not scan the whole history.
    """

    config: Mapping[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list, init=False)
    eval: list[dict[str, Any]] = field(default_factory=list, init=False)
    # The earliest record holding a non-finite float (train before eval at one step), its split and
    # keys; and how many records hold one.
    first_non_finite: tuple[dict[str, Any], str, list[str]] | None = field(default=None, init=False)
    non_finite_records: int = field(default=0, init=False)
    # The first finite value of each train metric.
    first_train: dict[str, Any] = field(default_factory=dict, init=False)
    # Whether any train record logs lr, and the index of the first whose lr is not above the one before.
    logs_lr: bool = field(default=False, init=False)
    lr_stopped_rising: int | None = field(default=None, init=False)
    # Over the train records with a finite accuracy: their steps, the last WINDOW accuracies, the mean
    # of the WINDOW ending at each (None before there are WINDOW), and the record where that mean first
    # reached SATURATED_ACCURACY. Then the latest eval record with a finite accuracy.
    accuracy_steps: list[int] = field(default_factory=list, init=False)
    last_accuracies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW), init=False)
    rolling_accuracy: list[float | None] = field(default_factory=list, init=False)
    saturated: dict[str, Any] | None = field(default=None, init=False)
    latest_eval_accuracy: dict[str, Any] | None = field(default=None, init=False)
    # The step of the latest policy samples and those samples by prompt; the latest reference sample
    # by prompt (the later one among samples of one step, as a step-ordered read of samples.jsonl keeps).
    policy_step: int | None = field(default=None, init=False)
    policy_samples: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    reference_samples: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        samples, self.samples = self.samples, []
        self.add_samples(samples)

    def add(self, record: dict[str, Any]) -> None:
        """Append one metric record to its split's list and update the summaries."""
        split = "eval" if record.get("split") == "eval" else "train"
        bad = [key for key, value in record.items() if isinstance(value, float) and not finite(value)]
        if bad:
            self.non_finite_records += 1
            first = self.first_non_finite
            if first is None or (record["step"], split == "eval") < (first[0]["step"], first[1] == "eval"):
                self.first_non_finite = (record, split, bad)
        if split == "eval":
            self.eval.append(record)
            if finite(record.get("rewards/accuracies")):
                self.latest_eval_accuracy = record
            return
        self.train.append(record)
        for key, value in record.items():
            if finite(value):
                self.first_train.setdefault(key, value)
        lr = record.get("lr")
        previous = self.train[-2].get("lr") if len(self.train) > 1 else None
        self.logs_lr = self.logs_lr or finite(lr)
        if self.lr_stopped_rising is None and finite(previous) and finite(lr) and lr <= previous:
            self.lr_stopped_rising = len(self.train) - 1
        if finite(record.get("rewards/accuracies")):
            self.last_accuracies.append(record["rewards/accuracies"])
            full = len(self.last_accuracies) == WINDOW
            self.accuracy_steps.append(record["step"])
            self.rolling_accuracy.append(_mean(list(self.last_accuracies)) if full else None)
            if self.saturated is None and full and self.rolling_accuracy[-1] >= SATURATED_ACCURACY:
                self.saturated = record

    def add_samples(self, samples: list[dict[str, Any]]) -> None:
        """Append samples.jsonl records and update the latest policy and reference samples."""
        for sample in samples:
            self.samples.append(sample)
            step, prompt = sample["step"], sample["prompt"]
            if sample.get("source") == "reference":
                kept = self.reference_samples.get(prompt)
                if kept is None or step >= kept["step"]:
                    self.reference_samples[prompt] = sample
            elif sample.get("source") == "policy":
                if self.policy_step is None or step > self.policy_step:
                    self.policy_step, self.policy_samples = step, {}
                if step == self.policy_step:
                    self.policy_samples[prompt] = sample

    @property
    def warmup_end(self) -> int:
        """Index of the first train record after lr stopped rising (0 when lr is not logged)."""
        if not self.logs_lr:
            return 0
        return len(self.train) if self.lr_stopped_rising is None else self.lr_stopped_rising


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


def non_finite_metrics(run: RunData) -> list[Finding]:
    """Any NaN or infinite metric value: the run is numerically broken from that step on."""
    if run.first_non_finite is None:
        return []
    record, split, keys = run.first_non_finite
    count = run.non_finite_records
    values = ", ".join(f"{key}={record[key]}" for key in keys)
    evidence = f"{values} at step {record['step']} ({split}); {count} record(s) hold non-finite values."
    data = {"step": record["step"], "split": split, "keys": keys, "records": count}
    return [diagnosed("non_finite_metrics", evidence, data, record["step"])]


def flat_loss(run: RunData) -> list[Finding]:
    """The loss stays at its first value (ln 2 for sigmoid DPO) and the margin at 0 after warmup."""
    window = run.train[max(run.warmup_end, len(run.train) - FLAT_WINDOW) :]
    first_loss, first_margin = run.first_train.get("loss"), run.first_train.get("rewards/margins")
    losses, margins = _column(window, "loss"), _column(window, "rewards/margins")
    if len(window) < FLAT_WINDOW or not losses or not margins:
        return []
    loss, margin = _mean(losses), _mean(margins)
    if abs(loss - first_loss) > FLAT_LOSS_REL_TOL * abs(first_loss):
        return []
    if abs(margin - first_margin) > FLAT_MARGIN_TOL:
        return []
    evidence = (
        f"train loss averaged {loss:.4f} over steps {_steps(window)}, against {first_loss:.4f} at the first "
        f"step (ln 2 = {LN2:.4f} is the sigmoid loss of a policy that has not moved); the reward margin "
        f"averaged {margin:.4f}; learning rate {run.config.get('learning_rate', 'unknown')}."
    )
    data = {"loss": loss, "first_loss": first_loss, "margin": margin, "steps": _steps(window)}
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
    latest = run.latest_eval_accuracy
    # Train accuracies logged up to the latest eval's step (train records come in step order).
    before = bisect_right(run.accuracy_steps, latest["step"]) if latest is not None else 0
    train_accuracy = run.rolling_accuracy[before - 1] if before else None
    if train_accuracy is None:
        return None
    eval_accuracy = latest["rewards/accuracies"]
    gap = train_accuracy - eval_accuracy
    if train_accuracy < SATURATED_ACCURACY or gap < ACCURACY_GAP:
        return None
    first = run.saturated  # reached by `before`: its rolling accuracy is saturated
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


def _longer(now: float, before: float) -> bool:
    return now >= VERBOSITY_RATIO * before and now - before >= VERBOSITY_MIN_EXTRA_TOKENS


def verbosity(run: RunData) -> list[Finding]:
    """Policy samples longer than the reference's, or chosen answers getting longer over the run."""
    parts, data, at = [], {}, None
    step, policy, reference = run.policy_step, run.policy_samples, run.reference_samples
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
    step, policy, reference = run.policy_step, run.policy_samples, run.reference_samples
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
