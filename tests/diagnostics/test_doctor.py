"""The doctor reads a run directory, names the right symptom, and reports bad input on one line."""

from __future__ import annotations

import json

import pytest

from dpokit.diagnostics.doctor import diagnose, load_run
from dpokit.errors import DpokitError


def test_healthy_run(make_run, healthy_records, healthy_samples):
    run_dir = make_run(healthy_records, samples=healthy_samples)
    assert diagnose(run_dir) == []
    run = load_run(run_dir)
    assert (len(run.train), len(run.eval), len(run.samples)) == (200, 4, 12)
    assert run.config["beta"] == 0.1


def test_flat_run_names_flat_loss(make_run, flat_records):
    [finding] = diagnose(make_run(flat_records))
    assert finding.code == "flat_loss"
    assert f"train loss averaged {finding.data['loss']:.4f} over steps 181-200" in finding.evidence


def test_findings_worst_first(make_run, flat_records, healthy_config):
    flat_records[-2]["grad_norm"] = float("inf")  # train step 200, written as Infinity, read back as inf
    findings = diagnose(make_run(flat_records, config=healthy_config | {"num_epochs": 5}))
    assert [f.code for f in findings] == ["non_finite_metrics", "num_epochs_out_of_range", "flat_loss"]
    assert "grad_norm=inf at step 200 (train)" in findings[0].evidence


def test_without_config_hyperparameters_are_not_checked(make_run, healthy_records):
    run_dir = make_run(healthy_records)
    (run_dir / "config.yaml").unlink()
    assert diagnose(run_dir) == []


def _error(run_dir) -> str:
    with pytest.raises(DpokitError) as error:
        diagnose(run_dir)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_run_dir(tmp_path):
    assert _error(tmp_path / "nope") == f"{tmp_path / 'nope'}: run directory not found"


def test_missing_metrics(tmp_path):
    assert _error(tmp_path).startswith(f"{tmp_path / 'metrics.jsonl'}: not found")


def test_truncated_line_names_its_number(make_run, healthy_records):
    run_dir = make_run(healthy_records[:2])
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"split": "train", "step": 3, "loss": 0.6')  # the trainer died mid-write
    message = _error(run_dir)
    assert message.startswith(f"{run_dir / 'metrics.jsonl'}:3: invalid JSON")
    assert "cut-off line" in message


def test_empty_metrics(make_run):
    run_dir = make_run([])
    assert (
        _error(run_dir)
        == f"{run_dir / 'metrics.jsonl'}: no metric records (the run has not logged a step yet)"
    )


def test_record_without_step(make_run, healthy_records):
    del healthy_records[1]["step"]
    run_dir = make_run(healthy_records)
    assert _error(run_dir) == f"{run_dir / 'metrics.jsonl'}:2: field 'step': missing"


def test_record_that_is_not_an_object(make_run, healthy_records):
    run_dir = make_run(healthy_records[:1])
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write("[1, 2]\n")
    assert _error(run_dir) == f"{run_dir / 'metrics.jsonl'}:2: expected a JSON object, got list"


def test_bad_sample_source(make_run, healthy_records, healthy_samples):
    healthy_samples[0]["source"] = "judge"
    run_dir = make_run(healthy_records, samples=healthy_samples)
    assert _error(run_dir) == f"{run_dir / 'samples.jsonl'}:1: field 'source': invalid value 'judge'"


def test_invalid_yaml_names_its_line(make_run, healthy_records):
    run_dir = make_run(healthy_records)
    (run_dir / "config.yaml").write_text("beta: 0.1\nlearning_rate: [1e-6\n")
    assert _error(run_dir).startswith(f"{run_dir / 'config.yaml'}:3: invalid YAML")


def test_config_that_is_not_a_mapping(make_run, healthy_records):
    run_dir = make_run(healthy_records)
    (run_dir / "config.yaml").write_text("- beta\n")
    assert _error(run_dir) == f"{run_dir / 'config.yaml'}: expected a mapping of settings, got list"


def test_unreadable_metrics(make_run, healthy_records):
    run_dir = make_run(healthy_records)
    (run_dir / "metrics.jsonl").write_bytes(json.dumps(healthy_records[0]).encode() + b"\xff\n")
    assert _error(run_dir).startswith(f"{run_dir / 'metrics.jsonl'}: not UTF-8 text")
