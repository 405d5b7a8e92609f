"""Finding serialisation and console rendering."""

from __future__ import annotations

import io
import json
import math

from rich.console import Console

from dpokit.diagnostics.findings import SYMPTOMS, Finding, diagnosed, print_findings, sort_findings


def _console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


def test_to_dict_is_strict_json():
    finding = Finding("x", "info", "t", "e", "c", "f", {"a": math.nan, "b": [math.inf, -math.inf], "c": 1.5})
    text = json.dumps(finding.to_dict(), allow_nan=False)
    assert json.loads(text)["data"] == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": 1.5}


def test_diagnosed_takes_cause_and_fix_from_the_symptom_table():
    finding = diagnosed("flat_loss", "evidence", {"loss": 0.69}, 40)
    assert (finding.severity, finding.cause, finding.fix) == (
        "warning",
        SYMPTOMS["flat_loss"].cause,
        SYMPTOMS["flat_loss"].fix,
    )
    assert finding.step == 40


def test_sort_puts_critical_first_and_keeps_order_among_equals():
    a, b, c = (
        Finding(code, severity, "", "", "", "")
        for code, severity in (("a", "info"), ("b", "warning"), ("c", "critical"))
    )
    d = Finding("d", "warning", "", "", "", "")
    assert [f.code for f in sort_findings([a, b, c, d])] == ["c", "b", "d", "a"]


def test_print_findings():
    console = _console()
    print_findings([diagnosed("flat_loss", "loss 0.6931 over steps 21-40", {}, 40)], console)
    out = console.file.getvalue()
    assert "WARNING Loss is flat" in out and "flat_loss at step 40" in out
    assert "Evidence: loss 0.6931 over steps 21-40" in out
    assert "Fix: Verify the labels" in out


def test_long_lines_wrap_on_a_soft_wrapping_console():
    console = Console(file=io.StringIO(), width=60, color_system=None, soft_wrap=True)
    print_findings([diagnosed("flat_loss", "word " * 40 + "END", {}, 40)], console)
    out = console.file.getvalue()
    assert "END" in out and max(len(line) for line in out.splitlines()) <= 60


def test_print_no_findings():
    console = _console()
    print_findings([], console)
    assert console.file.getvalue() == "No problems found.\n"
