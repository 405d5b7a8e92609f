"""`dpokit audit`: what in a preference dataset will hurt DPO, found before a GPU-hour is spent (SPEC §5).

    dpokit audit pairs.jsonl
    dpokit audit pairs.jsonl --model smollm2 --max-length 1024 --json audit.json

Without a model the audit reads the text (``audit_text``): length bias, surface shortcuts,
over-refusal, identical, near-identical, duplicated and contradicting pairs, empty answers, and
truncation estimated from characters. With ``--model`` it also tokenizes every row as training does,
checks the chat template and stop tokens, counts truncation exactly, and scores every pair with the
model as the step-0 reference (``audit_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpokit.atomic import write_atomic
from dpokit.data.prepare import Rows, resolve_path
from dpokit.data.reading import read_records
from dpokit.data.rows import PreferenceRow, validate_records
from dpokit.diagnostics.audit_model import estimated_truncation, model_checks
from dpokit.diagnostics.audit_text import (
    MIN_PAIRS,
    Stats,
    duplicates,
    empty_answers,
    fixed_openings,
    length_bias,
    over_refusal,
    percent,
    similar_pairs,
    surface_shortcuts,
    text_pairs,
)
from dpokit.diagnostics.findings import Finding, print_findings, sort_findings
from dpokit.errors import InMemory


def read_rows(source: str | Rows) -> tuple[list[PreferenceRow], list[int]]:
    """Validated rows of a file (or of rows held in memory, numbered from 0), and the lines of the pairs that
    reading skips because chosen == rejected.

    Raises DpokitError (naming file, line and field) for a missing, empty or malformed dataset.
    """
    if isinstance(source, str):
        records = list(read_records(source))
    else:
        records, source = list(enumerate(source)), InMemory("data")
    rows, _ = validate_records(records, source)
    kept = {row.line for row in rows}
    return rows, [line for line, _ in records if line not in kept]


def audit_dataset(data: str | Rows, model: str | None, max_length: int) -> tuple[Stats, list[Finding]]:
    """Every check on one dataset, a path or rows held in memory: (stats for the report, findings worst first)."""
    source = resolve_path(data) if isinstance(data, str) else data
    rows, identical = read_rows(source)
    pairs = text_pairs(rows)
    stats: Stats = {
        "data": source if isinstance(source, str) else "<rows in memory>",
        "model": model,
        "pairs": len(rows),
        "identical_skipped": len(identical),
    }
    stats["similarity"], findings = similar_pairs(pairs, identical)
    if not rows:
        evidence = f"All {len(identical)} rows have chosen == rejected: there is nothing to train on."
        findings.append(
            Finding(
                "no_pairs",
                "critical",
                "No usable pairs",
                evidence,
                "The pair-making step produced the same answer twice for every prompt.",
                "Rebuild the pairs so that chosen and rejected differ.",
            )
        )
        return stats, sort_findings(findings)
    stats["format"] = "conversational" if rows[0].conversational else "standard"
    if len(rows) < MIN_PAIRS:
        findings.append(
            Finding(
                "few_pairs",
                "info",
                "Too few pairs for the bias checks",
                f"{len(rows)} pairs: the length, shortcut, refusal and margin checks need {MIN_PAIRS} to report a bias.",
                "A small dataset, or a sample of one.",
                "Audit the full dataset.",
            )
        )
    checks = {
        "length": length_bias,
        "features": surface_shortcuts,
        "openings": fixed_openings,
        "refusal": over_refusal,
        "empty": empty_answers,
    }
    for name, check in checks.items():
        stats[name], found = check(pairs)
        findings += found
    stats["duplicates"], found = duplicates(rows)
    findings += found
    if model is None:
        stats["truncation"], found = estimated_truncation(pairs, max_length)
    else:
        model_stats, found = model_checks(rows, model, max_length)
        stats.update(model_stats)
    findings += found
    return stats, sort_findings(findings)


def summary_table(stats: Stats) -> Table:
    """The headline numbers, one line per check."""
    table = Table(title=f"dpokit audit: {stats['data']}", title_justify="left", show_header=False)
    table.add_column("check", style="bold")
    table.add_column("value")
    table.add_row(
        "pairs",
        f"{stats['pairs']} {stats.get('format', '')} ({stats['identical_skipped']} identical skipped)",
    )
    table.add_row("near-identical pairs", str(stats["similarity"]["near_identical"]))
    if not stats["pairs"]:
        return table
    length = stats["length"]
    table.add_row(
        "chosen longer / shorter", f"{percent(length['chosen_longer'])} / {percent(length['chosen_shorter'])}"
    )
    if length["ratio_median"] is not None:
        table.add_row(
            "length ratio chosen/rejected",
            f"median {length['ratio_median']:.2f} "
            f"(p10 {length['ratio_p10']:.2f}, p90 {length['ratio_p90']:.2f})",
        )
    table.add_row("length-label correlation", f"{length['label_correlation']:.2f}")
    for feature, rates in {**stats["features"], "refusal": stats["refusal"]}.items():
        table.add_row(
            f"{feature}: chosen / rejected", f"{percent(rates['chosen'])} / {percent(rates['rejected'])}"
        )
    table.add_row(
        "empty answers: chosen / rejected", f"{stats['empty']['chosen']} / {stats['empty']['rejected']}"
    )
    table.add_row(
        "duplicate rows / contradicting pairs",
        f"{stats['duplicates']['duplicate_rows']} / {stats['duplicates']['contradicting_pairs']}",
    )
    if "truncation" in stats:
        cut = stats["truncation"]
        table.add_row(
            f"max_length {cut['max_length']}: dropped / truncated",
            f"{cut['dropped']} / {cut['truncated']}" + (" (estimate)" if cut["estimated"] else ""),
        )
    if "reference" in stats:
        ref = stats["reference"]
        table.add_row(
            "reference margin (nats)", f"mean {ref['margin_mean']:.2f}, median {ref['margin_median']:.2f}"
        )
        table.add_row(
            "reference accuracy / ties / easy",
            f"{percent(ref['reference_accuracy'])} / {percent(ref['ties'])} / {percent(ref['easy'])}",
        )
    return table


def audit_command(
    data: str, model: str | None, max_length: int, json_out: Path | None, console: Console | None = None
) -> list[Finding]:
    """Audit a preference dataset: print the summary table and the findings, write both as JSON if asked."""
    stats, findings = audit_dataset(data, model, max_length)
    console = console or Console()
    console.print(summary_table(stats))
    print_findings(findings, console)
    if json_out is not None:
        report = {"stats": stats, "findings": [finding.to_dict() for finding in findings]}
        write_atomic(json_out, json.dumps(report, indent=2, ensure_ascii=False))
    return findings
