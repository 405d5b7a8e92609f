"""The `dpokit doctor` and `dpokit report` commands as plain functions; cli.py wires them to typer.

dpokit doctor runs/my-run --json findings.json
dpokit report runs/my-run --out report.html
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from dpokit.atomic import write_atomic
from dpokit.diagnostics.doctor import diagnose
from dpokit.diagnostics.findings import print_findings
from dpokit.diagnostics.report import write_report


def doctor_command(run_dir: Path, json_out: Path | None = None, console: Console | None = None) -> int:
    """Print the run's findings; return the exit code: 0 healthy (info only), 1 warnings or critical.

    Like a linter, so `dpokit doctor RUN_DIR && deploy` gates on a healthy run. Unreadable input
    raises ``DpokitError`` instead, which the CLI reports on one line. ``json_out`` receives
    ``{"run_dir", "findings": [Finding.to_dict(), ...]}`` in strict JSON.
    """
    console = console or Console()
    findings = diagnose(run_dir)
    console.print(f"[bold]dpokit doctor[/] {run_dir}: {len(findings)} finding(s)")
    print_findings(findings, console)
    if json_out is not None:
        payload = {"run_dir": str(run_dir), "findings": [finding.to_dict() for finding in findings]}
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(json_out), json.dumps(payload, indent=2, allow_nan=False) + "\n")
        console.print(f"Findings written to {json_out}")
    return int(any(finding.severity != "info" for finding in findings))


def report_command(run_dir: Path, out: Path | None = None, console: Console | None = None) -> Path:
    """Write the HTML report (default RUN_DIR/report.html) and return its path."""
    path = write_report(run_dir, Path(out) if out is not None else Path(run_dir) / "report.html")
    (console or Console()).print(f"Report written to {path}")
    return path
