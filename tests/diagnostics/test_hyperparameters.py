"""Config values against SPEC §2's recommended ranges."""

from __future__ import annotations

import pytest

from dpokit.diagnostics.hyperparameters import hyperparameter_findings


def test_healthy_config_is_quiet(healthy_config):
    assert hyperparameter_findings(healthy_config) == []


@pytest.mark.parametrize(
    ("overrides", "code", "severity", "evidence"),
    [
        ({"beta": 0.5}, "beta_out_of_range", "warning", "config.yaml: beta = 0.5; recommended 0.01-0.1."),
        ({"beta": 0.15}, "beta_out_of_range", "info", "config.yaml: beta = 0.15; recommended 0.01-0.1."),
        ({"beta": 0.005}, "beta_out_of_range", "warning", "config.yaml: beta = 0.005; recommended 0.01-0.1."),
        ({"loss_type": "simpo", "beta": 0.1}, "beta_out_of_range", "warning", "recommended 1-10."),
        ({"learning_rate": 1e-4}, "learning_rate_out_of_range", "warning", "recommended 5e-07-2e-06."),
        ({"learning_rate": 1e-7}, "learning_rate_out_of_range", "warning", "learning_rate = 1e-07;"),
        (
            {"use_lora": True, "learning_rate": 2e-4},
            "learning_rate_out_of_range",
            "warning",
            "recommended 5e-06-0.0001.",
        ),
        ({"num_epochs": 5}, "num_epochs_out_of_range", "warning", "num_epochs = 5; recommended 1-3."),
        (
            {"effective_batch_size": 16},
            "effective_batch_size_out_of_range",
            "warning",
            "recommended 128-1024.",
        ),
    ],
)
def test_out_of_range_value(healthy_config, overrides, code, severity, evidence):
    [finding] = hyperparameter_findings(healthy_config | overrides)
    assert (finding.code, finding.severity) == (code, severity)
    assert evidence in finding.evidence


def test_lora_tolerates_higher_learning_rates(healthy_config):
    assert hyperparameter_findings(healthy_config | {"use_lora": True, "learning_rate": 2e-5}) == []


def test_simpo_beta_in_its_own_range(healthy_config):
    assert hyperparameter_findings(healthy_config | {"loss_type": "simpo", "beta": 2.5}) == []


def test_fix_says_which_way(healthy_config):
    [high] = hyperparameter_findings(healthy_config | {"learning_rate": 1e-4})
    [low] = hyperparameter_findings(healthy_config | {"beta": 0.001})
    assert high.fix == "Lower the learning rate into 5e-07-2e-06."
    assert low.fix == "Raise beta towards 0.1."
    assert "gibberish" in low.cause


def test_missing_keys_are_not_checked():
    assert hyperparameter_findings({}) == []
