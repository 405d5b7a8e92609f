"""The report of a `dpokit iterate` run directory: three per-round plots, the rounds table, held-out samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dpokit.diagnostics.report import write_report

ROUNDS = [
    {"round": 0, "reward_mean": 0.6, "reward_std": 0.2, "kl": 0.0, "length_mean": 30.0,
     "win_rate_vs_reference": 0.5, "judge_failures": 0},
    {"round": 1, "reward_mean": 0.75, "reward_std": 0.15, "kl": 0.4, "length_mean": 31.0,
     "win_rate_vs_reference": 0.7, "judge_failures": 1, "pairs": 40},
    {"round": 2, "reward_mean": 0.9, "reward_std": 0.1, "kl": 1.1, "length_mean": 29.5,
     "win_rate_vs_reference": None, "judge_failures": 0, "pairs": 38},
]  # fmt: skip
PROMPTS = ["Review <i>Alien</i>.", "Review a cafe."]


def make_iterate_run(root: Path) -> Path:
    run = root / "iterate-run"
    run.mkdir()
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROUNDS))
    for n in range(len(ROUNDS)):
        (run / f"round-{n}").mkdir()
        samples = [
            {
                "prompt": p,
                "text": f"answer {i} of round {n}",
                "num_tokens": 10 + n,
                "score": None if n == i else 0.5,
            }
            for i, p in enumerate(PROMPTS)
        ]
        (run / f"round-{n}" / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


def markers(svg: str) -> int:
    return len(re.findall(r"<circle ", svg))


def test_rounds_report_plots_and_samples(tmp_path) -> None:
    html = write_report(make_iterate_run(tmp_path), tmp_path / "report.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", html)
    assert len(svgs) == 3
    reward, kl, win = svgs
    assert "Judge reward (mean ± std)" in reward and "KL to the starting model" in kl and "Win rate" in win
    # One point per round; the missing win rate of round 2 is a gap, not a point.
    assert [markers(s) for s in svgs] == [3, 3, 2]
    assert reward.count('class="band"') == 1 and 'class="band"' not in kl
    assert "reward_mean round 2: 0.9<" in reward and ">round</text>" in reward
    # The table has every round; the samples are escaped, one folded table per round, latest open.
    assert html.count("<tr><td>") == 3 and "<td>40</td>" in html
    assert "<details open><summary>round 2</summary>" in html and html.count("<details") == 3
    assert "Review &lt;i&gt;Alien&lt;/i&gt;." in html and "<i>Alien</i>" not in html
    for n in range(3):
        assert f"answer 0 of round {n}" in html and f"answer 1 of round {n}" in html
    assert "12 tokens · judge +0.5<" in html and "11 tokens · judge failed<" in html
    assert "<script" not in html and "<link" not in html


def test_pairwise_samples_show_the_outcome_against_round_0(tmp_path) -> None:
    """A pairwise judge scores no single answer: the cells say how each answer fared against round 0's."""
    run = make_iterate_run(tmp_path)
    outcomes = [1.0, 0.5, 0.0, None]
    samples = [
        {"prompt": f"p{i}", "text": f"t{i}", "num_tokens": 5, "score": None, "vs_reference": o}
        for i, o in enumerate(outcomes)
    ]
    (run / "round-2" / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    html = write_report(run, tmp_path / "report.html").read_text()
    for text in ("preferred to round 0", "tie with round 0", "round 0 preferred"):
        assert f"5 tokens · judge {text}<" in html
    assert html.count("5 tokens · judge failed<") == 1
