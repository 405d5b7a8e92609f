"""Diagnose a run while it trains: the rules of ``rules.py`` after every logged metric record.

In the training loop::

    watchdog = Watchdog(config_dict, stop_on_critical=True)
    ...
    for finding in watchdog.update(record):  # raises WatchdogStop on a critical finding
        log.warning("%s: %s", finding.title, finding.evidence)
    ...
    watchdog.update_samples(generate_samples(...))  # the gibberish and verbosity rules read samples

On ``WatchdogStop`` the run stops where it is, keeping the checkpoints already written (it does not save
the state the finding condemns); the CLI prints its one-line message. Under several processes every
process's watchdog reads the same records and samples, so all of them stop at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpokit.diagnostics.findings import Finding, sort_findings
from dpokit.diagnostics.rules import RunData, run_rules
from dpokit.errors import DpokitError


class WatchdogStop(DpokitError):
    """A critical finding under ``stop_on_critical``; ``findings`` holds all new ones, worst first."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        worst = findings[0]
        super().__init__(
            f"watchdog stopped training at step {worst.step}: {worst.title} ({worst.code}): {worst.evidence}"
        )


class Watchdog:
    """Feeds metric records to the rules and reports each finding code once, when it first appears."""

    def __init__(self, config: Mapping[str, Any], stop_on_critical: bool = False) -> None:
        self.stop_on_critical = stop_on_critical
        self.run = RunData(config=config)
        self.reported: set[str] = set()

    def update(self, record: dict[str, Any]) -> list[Finding]:
        """Add one train or eval record; return the findings not reported before, worst first.

        Config findings (hyperparameters) come with the first record. Raises ``WatchdogStop`` when
        ``stop_on_critical`` is set and a new finding is critical. Each call re-runs every rule, but a
        rule reads only its windows and ``RunData``'s running summaries: the cost per record stays the
        same however long the run.
        """
        self.run.add(record)
        return self._new_findings()

    def update_samples(self, samples: list[dict[str, Any]]) -> list[Finding]:
        """Add samples.jsonl records (from ``generate_samples``); like ``update``."""
        self.run.add_samples(samples)
        return self._new_findings()

    def _new_findings(self) -> list[Finding]:
        new = sort_findings([f for f in run_rules(self.run) if f.code not in self.reported])
        self.reported.update(finding.code for finding in new)
        if self.stop_on_critical and any(finding.severity == "critical" for finding in new):
            raise WatchdogStop(new)
        return new
