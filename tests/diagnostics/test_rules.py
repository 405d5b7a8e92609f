"""Each rule against a synthetic run built to show its symptom, with the numbers worked by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dpokit.diagnostics.findings import Finding
from dpokit.diagnostics.rules import RULES, RunData, run_rules


def _run(
    records: list[dict[str, Any]], config: dict[str, Any], samples: list[dict[str, Any]] = ()
) -> RunData:
    run = RunData(config=config, samples=list(samples))
    for record in records:
        run.add(record)
    return run


def _only(findings: list[Finding], code: str) -> Finding:
    assert [f.code for f in findings] == [code], [(f.code, f.evidence) for f in findings]
    return findings[0]


def _train(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["split"] == "train"]


def test_healthy_run_has_no_findings(healthy_records, healthy_config, healthy_samples):
    assert run_rules(_run(healthy_records, healthy_config, healthy_samples)) == []


def test_rules_are_a_plain_table():
    assert all(callable(rule) for rule in RULES.values())
    assert {"flat_loss", "divergence", "reward_hacking", "verbosity", "gibberish"} <= set(RULES)


def test_flat_loss_reports_the_final_loss(flat_records, healthy_config):
    finding = _only(run_rules(_run(flat_records, healthy_config)), "flat_loss")
    last_20 = [r["loss"] for r in _train(flat_records)[-20:]]
    assert finding.severity == "warning"
    assert finding.data["loss"] == pytest.approx(sum(last_20) / 20)
    assert abs(finding.data["loss"] - math.log(2)) < 0.002
    assert f"train loss averaged {finding.data['loss']:.4f} over steps 181-200" in finding.evidence
    assert "ln 2 = 0.6931" in finding.evidence
    assert "learning rate 1e-06" in finding.evidence
    assert finding.step == 200


def test_flat_loss_waits_for_20_records_after_warmup(flat_records, healthy_config):
    """lr rises over steps 1-20, so step 21 is the first record after warmup and steps 21-40 the first window."""
    train = _train(flat_records)
    assert run_rules(_run(train[:39], healthy_config)) == []
    assert _only(run_rules(_run(train[:40], healthy_config)), "flat_loss").step == 40


def test_divergence_reports_the_chosen_collapse(healthy_records, healthy_config):
    """From step 100, chosen answers lose 1.5 * (step - 100) / 100 nats per token.

    Steps 1-5 sit at -1.10 per token (the reference's -1.1 plus a chosen reward of ~1e-4);
    steps 196-200 average a fraction of 0.98, so -1.1 - 1.5 * 0.98 = -2.57: a drop of 1.47.
    """
    for record in _train(healthy_records):
        if record["step"] > 100:
            fraction = (record["step"] - 100) / 100
            record["logps/chosen"] = record["lengths/chosen"] * (-1.1 - 1.5 * fraction)
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "divergence")
    assert finding.severity == "critical"
    assert (
        "fell from -1.10 (steps 1-5) to -2.57 (steps 196-200), a drop of 1.47 nats/token" in finding.evidence
    )
    assert "raise beta to 0.1-0.2" in finding.fix.lower()


def test_divergence_reports_a_large_kl(healthy_records, healthy_config):
    """kl = -300 nats over answers of 250 and 230 tokens: 300 / 240 = 1.25 nats per token."""
    for record in _train(healthy_records)[-5:]:
        record.update({"kl": -300.0, "lengths/chosen": 250.0, "lengths/rejected": 230.0})
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "divergence")
    assert "|kl| reached 1.25 nats per answer token over steps 196-200" in finding.evidence
    assert finding.data["kl_per_token"] == pytest.approx(1.25)


def test_likelihood_displacement_reports_both_drops(healthy_records, healthy_config):
    """Per token, chosen goes -1.10 -> -1.50 and rejected -1.30 -> -1.90 (constant over the first and last 5)."""
    train = _train(healthy_records)
    for index, record in enumerate(train):
        fraction = min(max((index - 4) / (len(train) - 10), 0.0), 1.0)  # 0 on the first 5, 1 on the last 5
        record["logps/chosen"] = record["lengths/chosen"] * (-1.1 - 0.4 * fraction)
        record["logps/rejected"] = record["lengths/rejected"] * (-1.3 - 0.6 * fraction)
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "likelihood_displacement")
    assert finding.evidence == (
        "chosen log-prob per token -1.10 -> -1.50 (-0.40); rejected log-prob per token -1.30 -> -1.90 (-0.60), "
        "from steps 1-5 to steps 196-200."
    )
    assert finding.data["chosen_drop"] == pytest.approx(0.4)


def test_reward_hacking_reports_the_accuracy_gap(healthy_records, healthy_config):
    """Train accuracy is 0.6 before step 30 and 1.0 from it: the 5-record mean first reaches 0.95 at
    step 34 (epoch 34 / 200 = 0.17); eval accuracy stays 0.62, so the gap at step 200 is 0.38."""
    for record in healthy_records:
        if record["split"] == "eval":
            record["rewards/accuracies"] = 0.62
        else:
            record["rewards/accuracies"] = 1.0 if record["step"] >= 30 else 0.6
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "reward_hacking")
    assert "train accuracy 1.00 against eval accuracy 0.62 at step 200 (gap 0.38)" in finding.evidence
    assert "first averaged >= 0.95 at step 34 (epoch 0.17)" in finding.evidence
    assert finding.data["gap"] == pytest.approx(0.38)
    assert finding.step == 200


def test_reward_hacking_reports_exploding_margins(healthy_records, healthy_config):
    for record in _train(healthy_records)[-5:]:
        record["rewards/margins"] = 12.0
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "reward_hacking")
    assert finding.evidence == "mean reward margin 12.00 over steps 196-200."


def test_verbosity_from_samples(healthy_records, healthy_config, healthy_samples):
    """Reference answers take 40-43 tokens (mean 41.5); the step-200 policy answers take 83: 2.00x."""
    for sample in healthy_samples:
        if sample["source"] == "policy" and sample["step"] == 200:
            sample["num_tokens"] = 83
    finding = _only(run_rules(_run(healthy_records, healthy_config, healthy_samples)), "verbosity")
    assert "policy samples at step 200 average 83.0 tokens against 41.5 for the reference" in finding.evidence
    assert "(2.00x)" in finding.evidence
    assert "length-normalised DPO" in finding.fix


def test_verbosity_ignores_a_few_extra_tokens(healthy_records, healthy_config, healthy_samples):
    for sample in healthy_samples:
        sample["num_tokens"] = 7 if sample["source"] == "policy" else 5  # 1.4x, but only 2 tokens
    assert run_rules(_run(healthy_records, healthy_config, healthy_samples)) == []


def test_verbosity_from_chosen_lengths(healthy_records, healthy_config):
    train = _train(healthy_records)
    for record in train[:5]:
        record["lengths/chosen"] = 250.0
    for record in train[-5:]:
        record["lengths/chosen"] = 400.0
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "verbosity")
    assert finding.evidence == "chosen answers grew from 250.0 tokens (steps 1-5) to 400.0 (steps 196-200)."


def test_gibberish_from_repetition(healthy_records, healthy_config, healthy_samples):
    latest = [s for s in healthy_samples if s["source"] == "policy" and s["step"] == 200]
    for sample in latest[:3]:
        sample["repetition"] = 0.8
    finding = _only(run_rules(_run(healthy_records, healthy_config, healthy_samples)), "gibberish")
    assert finding.severity == "critical"
    assert finding.evidence.startswith("3 of 4 policy samples at step 200 are degenerate")
    assert "against 0% of reference samples" in finding.evidence
    assert finding.data["prompts"] == [s["prompt"] for s in latest[:3]]


def test_gibberish_from_reference_perplexity(healthy_records, healthy_config, healthy_samples):
    for sample in healthy_samples:
        if sample["source"] == "policy" and sample["step"] == 200:
            sample["ref_ppl"] = 500.0
    finding = _only(run_rules(_run(healthy_records, healthy_config, healthy_samples)), "gibberish")
    assert finding.evidence.startswith("4 of 4 policy samples")
    assert "reference perplexity 500.0" in finding.evidence


def test_gibberish_quiet_when_the_reference_loops_as_much(healthy_records, healthy_config, healthy_samples):
    """A small model loops under greedy decoding whether trained or not: that is no drift."""
    for sample in healthy_samples:
        sample["repetition"] = 0.8
    assert run_rules(_run(healthy_records, healthy_config, healthy_samples)) == []


def test_non_finite_reports_the_first_step(healthy_records, healthy_config):
    """From step 150 every metric is NaN (grad_norm inf): 51 train and 2 eval records (150, 200)."""
    for record in healthy_records:
        if record["step"] >= 150:
            record.update(
                {key: math.nan for key in record if key.startswith(("loss", "rewards/", "logps/", "kl"))}
            )
            if record["split"] == "train":
                record["grad_norm"] = math.inf
    finding = _only(run_rules(_run(healthy_records, healthy_config)), "non_finite_metrics")
    assert finding.evidence.startswith("loss=nan, rewards/chosen=nan")
    assert "grad_norm=inf at step 150 (train); 53 record(s) hold non-finite values." in finding.evidence
    assert finding.step == 150
