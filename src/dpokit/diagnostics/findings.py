"""What a diagnostic rule reports: a symptom, its evidence in numbers, its likely cause and the fix."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

Severity = Literal["info", "warning", "critical"]

# Sorting key: the worst findings are shown first.
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
SEVERITY_STYLE: dict[str, str] = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


@dataclass(frozen=True)
class Finding:
    """One diagnosed symptom of a training run.

    ``code`` is a stable identifier (e.g. ``"flat_loss"``) that tools and tests match on;
    ``evidence`` is the human sentence with the numbers (and steps) behind it, and ``data``
    holds the same numbers raw. ``step`` is the training step at which the symptom shows.
    """

    code: str
    severity: Severity
    title: str
    evidence: str
    cause: str
    fix: str
    data: dict[str, Any] = field(default_factory=dict)
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-safe dict: non-finite floats become the strings "NaN"/"Infinity"/"-Infinity"."""
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class Symptom:
    """What a finding code means for the user: how bad, the likely root cause, the fix."""

    severity: Severity
    title: str
    cause: str
    fix: str


_DRIFT = Symptom(
    "critical",
    "",
    "The policy drifted too far from the reference: learning rate too high or beta too low "
    "(or a chat template that differs from the SFT one).",
    "Raise beta to 0.1-0.2, lower the learning rate, and use the SFT model's chat template.",
)

# The symptoms that training metrics and samples reveal, with causes and fixes from SPEC §5.
SYMPTOMS: dict[str, Symptom] = {
    "non_finite_metrics": Symptom(
        "critical",
        "NaN or infinite metrics",
        "Numerical overflow: learning rate too high, fp16 overflow, no gradient clipping, or an empty "
        "answer (a log of zero or a division by a zero length).",
        "Lower the learning rate, train in bf16 rather than fp16, clip gradients, and check the data for "
        "empty answers with `dpokit audit DATA`; resume from a checkpoint before this step.",
    ),
    "divergence": replace(_DRIFT, title="Policy is diverging from the reference (gibberish ahead)"),
    "gibberish": replace(_DRIFT, title="Policy samples look like gibberish"),
    "flat_loss": Symptom(
        "warning",
        "Loss is flat: the model is not learning the preferences",
        "Chosen and rejected answers too similar, labels wrong, or learning rate too low.",
        "Verify the labels (`dpokit audit DATA`), check that chosen and rejected get different "
        "log-probs, and raise the learning rate a little.",
    ),
    "reward_hacking": Symptom(
        "warning",
        "Reward hacking: preference metrics look too good",
        "A shortcut in the data (length, punctuation, fixed phrases) separates chosen from rejected.",
        "Audit chosen vs rejected for length and other surface biases (`dpokit audit DATA`); "
        "train fewer epochs.",
    ),
    "likelihood_displacement": Symptom(
        "warning",
        "Likelihood displacement: chosen answers lose probability too",
        "DPO only asks for a wider margin, which it can get by pushing both answers down; the freed "
        "probability goes to answers in neither set.",
        "Add an SFT/NLL term on the chosen answer, raise beta, lower the learning rate, or train "
        "fewer epochs.",
    ),
    "verbosity": Symptom(
        "warning",
        "Answers are getting longer (verbosity)",
        "The data prefers longer answers regardless of quality.",
        "Use length-normalised DPO (or R-DPO / SimPO) or a length-ratio penalty; audit chosen vs "
        "rejected lengths with `dpokit audit DATA`.",
    ),
}


def diagnosed(code: str, evidence: str, data: dict[str, Any], step: int | None) -> Finding:
    """A finding for one of ``SYMPTOMS``, with this run's evidence."""
    symptom = SYMPTOMS[code]
    return Finding(code, symptom.severity, symptom.title, evidence, symptom.cause, symptom.fix, data, step)


def finite(value: Any) -> bool:
    """True for a real number that is neither NaN nor infinite (bools are not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats, which strict JSON parsers (jq, browsers) reject."""
    if isinstance(value, float) and not finite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Worst first; the rule order is kept among findings of equal severity."""
    return sorted(findings, key=lambda finding: -SEVERITY_RANK[finding.severity])


def render_finding(finding: Finding) -> Panel:
    """A rich panel: severity-coloured title, then evidence, cause and fix."""
    style = SEVERITY_STYLE[finding.severity]
    body = Text()
    for label, text in (("Evidence", finding.evidence), ("Cause", finding.cause), ("Fix", finding.fix)):
        body.append(f"{label}: ", style="bold")
        body.append(text + "\n")
    body.rstrip()
    title = f"[{style}]{finding.severity.upper()}[/] {finding.title}"
    step = f" at step {finding.step}" if finding.step is not None else ""
    return Panel(
        body,
        title=title,
        title_align="left",
        subtitle=f"{finding.code}{step}",
        subtitle_align="right",
        border_style=style,
    )


def print_findings(findings: list[Finding], console: Console) -> None:
    """Print each finding as a panel, worst first, or a green all-clear line."""
    if not findings:
        console.print("[green]No problems found.[/]")
        return
    for finding in sort_findings(findings):
        # Wrap inside the panel even on a soft-wrapping console, which would crop the lines instead.
        console.print(render_finding(finding), soft_wrap=False)
