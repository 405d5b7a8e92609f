"""`dpokit doctor` and `dpokit report` as functions: output, exit code, JSON file, default paths."""

from __future__ import annotations

import io
import json

from rich.console import Console

from dpokit.diagnostics.commands import doctor_command, report_command


def _reject_constant(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


def _console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


def test_doctor_healthy_exits_0(make_run, healthy_records):
    console = _console()
    assert doctor_command(make_run(healthy_records), None, console) == 0
    assert "No problems found." in console.file.getvalue()


def test_doctor_info_only_exits_0(make_run, healthy_records, healthy_config):
    console = _console()
    assert (
        doctor_command(make_run(healthy_records, config=healthy_config | {"beta": 0.15}), None, console) == 0
    )
    assert "INFO" in console.file.getvalue()


def test_doctor_warning_exits_1_and_writes_strict_json(make_run, flat_records, tmp_path):
    console = _console()
    run_dir = make_run(flat_records)
    out = tmp_path / "findings.json"
    assert doctor_command(run_dir, out, console) == 1
    assert "flat_loss at step 200" in console.file.getvalue()
    payload = json.loads(out.read_text(), parse_constant=_reject_constant)
    assert payload["run_dir"] == str(run_dir)
    [finding] = payload["findings"]
    assert finding["code"] == "flat_loss" and finding["severity"] == "warning" and finding["step"] == 200
    assert set(finding) == {"code", "severity", "title", "evidence", "cause", "fix", "data", "step"}


def test_report_default_path(make_run, healthy_records):
    run_dir = make_run(healthy_records)
    console = _console()
    assert report_command(run_dir, None, console) == run_dir / "report.html"
    assert (run_dir / "report.html").is_file()
    assert f"Report written to {run_dir / 'report.html'}" in console.file.getvalue()
