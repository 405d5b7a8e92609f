"""Findings for config values outside SPEC §2's recommended ranges (the ranges live in ``dpokit.ranges``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpokit.diagnostics.findings import Finding
from dpokit.ranges import out_of_range


def hyperparameter_findings(config: Mapping[str, Any]) -> list[Finding]:
    """A warning per config value outside its range (info in beta's tolerated band)."""
    return [
        Finding(
            code=f"{found.range.key}_out_of_range",
            severity="info" if found.tolerated else "warning",
            title=found.title,
            evidence=f"config.yaml: {found.range.key} = {found.value:g}; {found.recommended}.",
            cause=found.range.why,
            fix=found.fix,
            data={"value": found.value, "low": found.range.low, "high": found.range.high},
        )
        for found in out_of_range(config)
    ]
