"""The HTML report: self-contained, every plot drawn, findings and samples shown, written atomically."""

from __future__ import annotations

import math
import re

from dpokit.diagnostics.report import CHARTS, svg_chart, write_report

# The synthetic runs log every key, so every series of every chart has data.
SERIES = sum(len(keys) for _, keys in CHARTS)


def test_healthy_report(make_run, healthy_records, healthy_samples, tmp_path):
    out = write_report(make_run(healthy_records, samples=healthy_samples), tmp_path / "out" / "report.html")
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("<svg") == len(CHARTS) == 7
    assert html.count('class="series"') == SERIES == 15
    assert "Doctor: healthy" in html and "No problems found." in html
    # Offline and alone: no script, no external resource; the only URL is the SVG namespace.
    assert "<script" not in html and "src=" not in html and "<link" not in html
    assert set(re.findall(r"https?://[^\"'\s>]+", html)) == {"http://www.w3.org/2000/svg"}


def test_samples_side_by_side_and_escaped(make_run, healthy_records, healthy_samples, tmp_path):
    html = write_report(make_run(healthy_records, samples=healthy_samples), tmp_path / "r.html").read_text()
    assert "Explain &lt;b&gt;bold&lt;/b&gt; HTML tags." in html and "<b>bold</b>" not in html
    assert html.count("<details") == 2  # policy steps 200 (open) and 100
    assert "<details open><summary>policy at step 200</summary>" in html
    assert "reference answer 0 at step 0" in html and "policy answer 0 at step 200" in html
    assert "40 tokens · repetition 0.02 · ref ppl 2.5<" in html


def test_judge_score_shown_when_present(make_run, healthy_records, healthy_samples, tmp_path):
    healthy_samples[0]["judge"] = 0.4215
    html = write_report(make_run(healthy_records, samples=healthy_samples), tmp_path / "r.html").read_text()
    assert "40 tokens · repetition 0.02 · ref ppl 2.5 · judge +0.42<" in html


def test_findings_in_report(make_run, flat_records, tmp_path):
    html = write_report(make_run(flat_records), tmp_path / "r.html").read_text()
    assert "Doctor: 1 warning" in html
    assert 'style="border-color:#ef6c00"' in html
    assert "(flat_loss · step 200)" in html
    assert "over steps 181-200" in html and "Verify the labels" in html
    assert "No samples.jsonl in this run." in html


def test_non_finite_values_break_the_line():
    svg = svg_chart("loss", [("train loss", [(1, 1.0), (2, math.nan), (3, 2.0), (4, 3.0)])])
    [path] = re.findall(r'<path class="series" d="([^"]*)"', svg)
    assert [command[0] for command in path.split()] == ["M", "M", "L"]


def test_chart_without_data():
    assert "no data" in svg_chart("kl", [])


def test_reference_samples_only(make_run, healthy_records, healthy_samples, tmp_path):
    reference = [s for s in healthy_samples if s["source"] == "reference"]
    html = write_report(make_run(healthy_records, samples=reference), tmp_path / "r.html").read_text()
    assert "<summary>no policy samples</summary>" in html and "<th>Policy</th>" in html
