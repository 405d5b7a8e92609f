"""One self-contained HTML report of a run: metric plots, the doctor's findings, policy vs reference samples.

    dpokit report runs/my-run --out report.html
    dpokit report runs/iterate-sentiment        # an iterate run (it has rounds.jsonl): per-round plots

A `dpokit iterate` run directory gets the rounds report instead: judge reward (mean with a ±std band),
KL to the starting model and win rate against it, per round, and the held-out answers of every round.

The file works offline and alone: plots are inline SVG drawn here, styles are inline, no script.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from dpokit.atomic import write_atomic
from dpokit.diagnostics.doctor import load_run
from dpokit.diagnostics.findings import Finding, finite, sort_findings
from dpokit.diagnostics.rules import RunData, run_rules

# (title, [(split, metric key), ...]): one plot each, train and eval series together.
CHARTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Loss", [("train", "loss"), ("eval", "loss")]),
    ("Reward accuracy", [("train", "rewards/accuracies"), ("eval", "rewards/accuracies")]),
    ("Reward margin", [("train", "rewards/margins"), ("eval", "rewards/margins")]),
    (
        "Log-probs (nats per answer)",
        [
            ("train", "logps/chosen"),
            ("train", "logps/rejected"),
            ("eval", "logps/chosen"),
            ("eval", "logps/rejected"),
        ],
    ),
    ("KL: policy minus reference log-prob", [("train", "kl"), ("eval", "kl")]),
    ("Answer length (tokens)", [("train", "lengths/chosen"), ("train", "lengths/rejected")]),
    ("Learning rate", [("train", "lr")]),
]
CONFIG_KEYS = [
    "loss_type",
    "beta",
    "learning_rate",
    "num_epochs",
    "effective_batch_size",
    "warmup_ratio",
    "use_lora",
]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
SEVERITY_COLORS = {"critical": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}

# Plot geometry in SVG user units: the plot area sits inside these margins.
WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, BOTTOM = 64, 12, 34  # the top edge depends on how many legend rows there are
MARKER_MAX_POINTS = 40  # short series (eval) get point markers; long ones would be cluttered

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#666}.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
.chart{border:1px solid #e3e3e3;border-radius:6px;padding:4px}
.finding{border-left:6px solid;padding:8px 12px;margin:10px 0;background:#fafafa;border-radius:4px}
.finding h3{margin:0 0 6px;font-size:1.05em}.badge{color:#fff;border-radius:3px;padding:1px 6px;font-size:.8em}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em}
.meta{color:#666;font-size:.8em;margin-top:4px}
"""


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    spacing = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / spacing) * spacing
    return [
        first + i * spacing
        for i in range(int((high - first) / spacing + 1e-9) + 1)
        if first + i * spacing >= low - 1e-12
    ]


def _padded_range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or abs(high) * 0.1 or 1.0  # a flat series still gets a visible band
    return low - pad, high + pad


def _legend(labels: list[str]) -> tuple[list[tuple[float, float]], float]:
    """Legend entry positions, flowing left to right above the plot, and the plot's top edge below them."""
    positions, x, y = [], LEFT, 34.0
    for label in labels:
        width = 30 + 6.2 * len(label)  # swatch plus ~6 units per character at font-size 11
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, y = LEFT, y + 15
        positions.append((x, y))
        x += width
    return positions, y + 10


def svg_chart(
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    x_label: str = "step",
    band: Sequence[tuple[float, float, float]] = (),
) -> str:
    """An inline SVG line chart; each series is (label, [(x, value), ...]), non-finite values break the line.

    Series whose label starts with "eval" are dashed; short series get point markers with tooltips. `band`,
    [(x, low, high), ...], is shaded in the first series' color behind the lines (e.g. mean ± std).
    """
    band = [(x, low, high) for x, low, high in band if finite(low) and finite(high)]
    points = [(x, y) for _, data in series for x, y in data if finite(y)]
    points += [(x, y) for x, low, high in band for y in (low, high)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">',
        f'<text x="{LEFT}" y="18" font-size="14" font-weight="600">{escape(title)}</text>',
    ]
    if not points:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#888">no data</text></svg>'
        )
        return "".join(parts)
    legend, top = _legend([label for label, _ in series])
    x_low, x_high = _padded_range([x for x, _ in points])
    y_low, y_high = _padded_range([y for _, y in points])

    def sx(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    def sy(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y_low) / (y_high - y_low) * (HEIGHT - top - BOTTOM)

    for tick in _nice_ticks(y_low, y_high):
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 6}" y="{sy(tick) + 4:.1f}" font-size="11" text-anchor="end" fill="#555">{tick:.3g}</text>'
        )
    for tick in _nice_ticks(x_low, x_high):
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="11" text-anchor="middle" fill="#555">{tick:g}</text>'
        )
    parts.append(
        f'<rect x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - top - BOTTOM}" fill="none" stroke="#bbb"/>'
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" font-size="11" text-anchor="middle" fill="#555">{x_label}</text>'
    )
    if band:
        outline = [(x, high) for x, _, high in band] + [(x, low) for x, low, _ in reversed(band)]
        parts.append(
            f'<path class="band" d="M{" L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in outline)} Z" '
            f'fill="{COLORS[0]}" fill-opacity="0.15" stroke="none"/>'
        )
    for index, ((label, data), (legend_x, legend_y)) in enumerate(zip(series, legend)):
        color = COLORS[index % len(COLORS)]
        dash = ' stroke-dasharray="6 3"' if label.startswith("eval") else ""
        commands, pen_down = [], False
        for x, y in data:
            if not finite(y):
                pen_down = False
                continue
            commands.append(f"{'L' if pen_down else 'M'}{sx(x):.1f},{sy(y):.1f}")
            pen_down = True
        parts.append(
            f'<path class="series" d="{" ".join(commands)}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>'
        )
        if len(data) <= MARKER_MAX_POINTS:
            parts.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{escape(label)} {x_label} {x:g}: {y:.4g}</title></circle>'
                for x, y in data
                if finite(y)
            )
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{legend_x + 24}" y="{legend_y}" font-size="11">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _charts(run: RunData) -> str:
    by_split = {"train": run.train, "eval": run.eval}
    charts = []
    for title, keys in CHARTS:
        series = [
            (
                f"{split} {key}",
                [(r["step"], r[key]) for r in by_split[split] if isinstance(r.get(key), int | float)],
            )
            for split, key in keys
        ]
        charts.append(f'<div class="chart">{svg_chart(title, [s for s in series if s[1]])}</div>')
    return f'<div class="charts">{"".join(charts)}</div>'


def _findings(findings: list[Finding]) -> str:
    if not findings:
        return '<p style="color:#2e7d32"><b>No problems found.</b></p>'
    cards = []
    for finding in findings:
        color = SEVERITY_COLORS[finding.severity]
        step = f" · step {finding.step}" if finding.step is not None else ""
        cards.append(
            f'<div class="finding" style="border-color:{color}">'
            f'<h3><span class="badge" style="background:{color}">{finding.severity.upper()}</span> '
            f'{escape(finding.title)} <span class="muted">({escape(finding.code)}{step})</span></h3>'
            f"<div><b>Evidence:</b> {escape(finding.evidence)}</div>"
            f"<div><b>Cause:</b> {escape(finding.cause)}</div>"
            f"<div><b>Fix:</b> {escape(finding.fix)}</div></div>"
        )
    return "".join(cards)


def _sample_cell(sample: dict[str, Any] | None) -> str:
    if sample is None:
        return '<td class="muted">-</td>'
    ref_ppl = sample.get("ref_ppl")
    meta = f"{sample['num_tokens']} tokens · repetition {sample.get('repetition', 0.0):.2f}"
    meta += f" · ref ppl {ref_ppl:.3g}" if finite(ref_ppl) else ""
    judge = sample.get("judge")  # the trainer's judge score, when it has a judge
    meta += f" · judge {judge:+.2f}" if finite(judge) else ""
    return f'<td><div class="text">{escape(sample["text"])}</div><div class="meta">{meta}</div></td>'


def _samples(samples: list[dict[str, Any]]) -> str:
    """One table per policy step (latest first, older ones folded): prompt, reference, policy."""
    if not samples:
        return '<p class="muted">No samples.jsonl in this run.</p>'
    ordered = sorted(samples, key=lambda s: s["step"])
    reference = {s["prompt"]: s for s in ordered if s["source"] == "reference"}
    steps = sorted({s["step"] for s in samples if s["source"] == "policy"}, reverse=True) or [None]
    tables = []
    for index, step in enumerate(steps):
        policy = {s["prompt"]: s for s in ordered if s["source"] == "policy" and s["step"] == step}
        prompts = list(dict.fromkeys([*reference, *policy]))
        rows = "".join(
            f'<tr><td class="text">{escape(p)}</td>{_sample_cell(reference.get(p))}{_sample_cell(policy.get(p))}</tr>'
            for p in prompts
        )
        heading, column = (
            ("no policy samples", "Policy")
            if step is None
            else (f"policy at step {step}", f"Policy (step {step})")
        )
        table = f"<table><tr><th>Prompt</th><th>Reference</th><th>{column}</th></tr>{rows}</table>"
        tables.append(
            f"<details{' open' if index == 0 else ''}><summary>{heading}</summary>{table}</details>"
        )
    return "".join(tables)


def _summary(run: RunData) -> str:
    rows = [(key, run.config[key]) for key in CONFIG_KEYS if key in run.config]
    for split, records in (("train", run.train), ("eval", run.eval)):
        if records:
            last = records[-1]
            for key in ("loss", "rewards/accuracies", "rewards/margins"):
                rows.append((f"last {split} {key} (step {last['step']})", last.get(key, "-")))
    cells = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
        for k, v in rows
    )
    return f'<table style="width:auto">{cells}</table>'


def render_html(run: RunData, findings: list[Finding], title: str) -> str:
    """The report page for a loaded run and its findings."""
    counts = {s: sum(f.severity == s for f in findings) for s in ("critical", "warning", "info")}
    verdict = ", ".join(f"{n} {s}{'s' if s == 'warning' and n > 1 else ''}" for s, n in counts.items() if n)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f'<h1>dpokit report: {escape(title)}</h1><p class="muted">Doctor: {verdict or "healthy"}</p>'
        f"{_summary(run)}<h2>Findings</h2>{_findings(findings)}"
        f"<h2>Metrics</h2>{_charts(run)}<h2>Samples</h2>{_samples(run.samples)}</body></html>\n"
    )


# The rounds report: rounds.jsonl columns in its table, and its three plots (title, key).
ROUND_COLUMNS = [
    "round",
    "reward_mean",
    "reward_std",
    "kl",
    "length_mean",
    "win_rate_vs_reference",
    "judge_failures",
    "pairs",
]
ROUND_CHARTS = [
    ("KL to the starting model (nats per answer)", "kl"),
    ("Win rate vs the starting model", "win_rate_vs_reference"),
]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _round_charts(rounds: list[dict[str, Any]]) -> str:
    """Reward (mean, ±std band), KL and win rate against the round number; a missing value is a gap."""

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["round"], r[key] if finite(r.get(key)) else math.nan) for r in rounds]

    band = [
        (r["round"], r["reward_mean"] - r["reward_std"], r["reward_mean"] + r["reward_std"])
        for r in rounds
        if finite(r.get("reward_mean")) and finite(r.get("reward_std"))
    ]
    charts = [svg_chart("Judge reward (mean ± std)", [("reward_mean", points("reward_mean"))], "round", band)]
    charts += [svg_chart(title, [(key, points(key))], "round") for title, key in ROUND_CHARTS]
    cells = "".join(f'<div class="chart">{chart}</div>' for chart in charts)
    return f'<div class="charts">{cells}</div>'


def _rounds_table(rounds: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ROUND_COLUMNS)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(f'{v:.4g}' if isinstance(v, float) else '-' if v is None else str(v))}</td>"
            for v in (r.get(c) for c in ROUND_COLUMNS)
        )
        + "</tr>"
        for r in rounds
    )
    return f'<table style="width:auto"><tr>{head}</tr>{rows}</table>'


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _round_samples(run_dir: Path, rounds: list[dict[str, Any]]) -> str:
    """One table per round (latest first, open; older folded): prompt, the starting policy's answer, this
    round's answer, each with its judge score."""
    start = _read_jsonl(run_dir / "round-0" / "eval_samples.jsonl")
    tables = []
    for index, n in enumerate(sorted((r["round"] for r in rounds), reverse=True)):
        samples = _read_jsonl(run_dir / f"round-{n}" / "eval_samples.jsonl")
        if not samples:
            continue
        rows = "".join(
            f'<tr><td class="text">{escape(_prompt_text(s["prompt"]))}</td>'
            + (_round_cell(start[i]) if n and i < len(start) else "")
            + f"{_round_cell(s)}</tr>"
            for i, s in enumerate(samples)
        )
        columns = "<th>Round 0 (starting policy)</th>" if n else ""
        table = f"<table><tr><th>Prompt</th>{columns}<th>Round {n}</th></tr>{rows}</table>"
        tables.append(
            f"<details{' open' if index == 0 else ''}><summary>round {n}</summary>{table}</details>"
        )
    return "".join(tables) or '<p class="muted">No eval_samples.jsonl in this run.</p>'


# A pairwise judge scores no single answer; eval_samples.jsonl holds the outcome against round 0's answer.
OUTCOMES = {1.0: "preferred to round 0", 0.5: "tie with round 0", 0.0: "round 0 preferred"}


def _round_cell(sample: dict[str, Any]) -> str:
    score, outcome = sample.get("score"), sample.get("vs_reference")
    if finite(score):
        judged = f"{score:+.3g}"
    else:  # a pairwise judge's outcome, when it has one; else the judge failed on this answer
        judged = OUTCOMES.get(outcome, "failed") if outcome is not None else "failed"
    meta = f"{sample['num_tokens']} tokens · judge {judged}"
    return f'<td><div class="text">{escape(sample["text"])}</div><div class="meta">{meta}</div></td>'


def render_rounds_html(run_dir: Path, rounds: list[dict[str, Any]], title: str) -> str:
    """The report page of a `dpokit iterate` run directory from its rounds.jsonl records."""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f'<h1>dpokit report: {escape(title)}</h1><p class="muted">On-policy run, {len(rounds)} evaluations '
        f"(round 0 is the starting policy)</p>{_rounds_table(rounds)}"
        f"<h2>Rounds</h2>{_round_charts(rounds)}<h2>Held-out samples</h2>{_round_samples(run_dir, rounds)}"
        "</body></html>\n"
    )


def write_report(run_dir: Path, out_path: Path) -> Path:
    """Write the HTML report of the run in ``run_dir`` to ``out_path``; returns ``out_path``.

    A training run is diagnosed by the doctor; an iterate run (it holds rounds.jsonl) gets the rounds report.
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    title = run_dir.resolve().name
    rounds = _read_jsonl(run_dir / "rounds.jsonl")
    if rounds:
        html = render_rounds_html(run_dir, rounds, title)
    else:
        run = load_run(run_dir)
        html = render_html(run, sort_findings(run_rules(run)), title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, html)
    return out_path
