"""Diagnose a run from its directory (config.yaml, metrics.jsonl, samples.jsonl), after or during training.

    dpokit doctor runs/my-run --json findings.json

Bad input is a ``DpokitError`` whose one line names the file, and the line and field where
there is one. A missing config.yaml skips the hyperparameter checks; samples.jsonl is optional.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dpokit.diagnostics.findings import Finding, sort_findings
from dpokit.diagnostics.rules import RunData, run_rules
from dpokit.errors import DpokitError, where

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


# The fields the rules index directly, with their check; the others are read with .get.
METRIC_FIELDS: dict[str, Callable[[Any], bool]] = {"split": lambda v: v in ("train", "eval"), "step": _is_int}
SAMPLE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "step": _is_int,
    "source": lambda v: v in ("policy", "reference"),
    "prompt": _is_str,
    "text": _is_str,
    "num_tokens": _is_int,
}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise DpokitError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise DpokitError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_jsonl(path: Path, fields: dict[str, Callable[[Any], bool]]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped), each checked for ``fields``.

    Python's json reads the NaN and Infinity that the trainer writes for non-finite metrics.
    """
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DpokitError(
                f"{where(path, number)}: invalid JSON ({error.msg} at column {error.colno}); "
                "a cut-off line means the run stopped while writing it"
            ) from None
        if not isinstance(record, dict):
            raise DpokitError(f"{where(path, number)}: expected a JSON object, got {type(record).__name__}")
        for name, valid in fields.items():
            if name not in record:
                raise DpokitError(f"{where(path, number, name)}: missing")
            if not valid(record[name]):
                raise DpokitError(f"{where(path, number, name)}: invalid value {record[name]!r}")
        records.append(record)
    return records


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise DpokitError(
            f"{where(path, line)}: invalid YAML ({getattr(error, 'problem', None) or error})"
        ) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise DpokitError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    return config


def load_run(run_dir: Path) -> RunData:
    """Read a run directory into ``RunData``, metric records in the order the trainer logged them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DpokitError(f"{run_dir}: run directory not found")
    metrics_path, config_path, samples_path = (
        run_dir / name for name in (METRICS_FILE, CONFIG_FILE, SAMPLES_FILE)
    )
    if not metrics_path.is_file():
        raise DpokitError(f"{metrics_path}: not found; is {run_dir} a dpokit run directory?")
    records = read_jsonl(metrics_path, METRIC_FIELDS)
    if not records:
        raise DpokitError(f"{metrics_path}: no metric records (the run has not logged a step yet)")
    run = RunData(
        config=_read_config(config_path) if config_path.is_file() else {},
        samples=read_jsonl(samples_path, SAMPLE_FIELDS) if samples_path.is_file() else [],
    )
    for record in records:
        run.add(record)
    return run


def diagnose(run_dir: Path) -> list[Finding]:
    """All findings for the run in ``run_dir``, worst first."""
    return sort_findings(run_rules(load_run(run_dir)))
