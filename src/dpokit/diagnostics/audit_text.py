"""Text-only checks of a preference dataset: length bias, surface shortcuts, refusals, similar and duplicate pairs.

Every check reads the answers as plain text (a conversational answer is the contents of its messages,
one per line) and returns ``(stats, findings)``: the numbers for the report, and a ``Finding`` for each
symptom of SPEC §5 that the numbers show. Thresholds are module constants, each with the reason for
its value. Example rows are ``PreferenceRow.line``: the line of a JSONL/CSV file, the row of a
JSON/Parquet file or saved dataset.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import numpy as np

from dpokit.data.rows import PreferenceRow, Text
from dpokit.diagnostics.findings import Finding, Severity, Symptom

Stats = dict[str, Any]
Check = tuple[Stats, list[Finding]]

# Below this many pairs a share is too noisy to call a bias (4 of 5 chosen longer happens by chance
# with probability 0.19); the statistical checks then report numbers but no findings.
MIN_PAIRS = 10

# Length bias: chosen longer (or shorter) in 70% of pairs. A fair coin gives more than 70% in
# 100 pairs with probability 0.00004, and real datasets with this bias train verbose (or terse) models.
LENGTH_BIAS_SHARE = 0.70

# Surface shortcut: a feature present in 20 points more of the chosen than of the rejected answers
# (or the reverse), and in at least 5 answers on its more frequent side, so that one or two odd
# rows in a small dataset do not count. A 20-point gap is a signal DPO picks up within one epoch.
# Fixed openings (the first 3 words) are compared with the same gap and minimum count.
SHORTCUT_RATE_GAP = 0.20
SHORTCUT_MIN_COUNT = 5
OPENING_WORDS = 3
OPENINGS_SHOWN = 3

# Over-refusal: chosen answers refuse 20 points more often than rejected ones (at least 5 of them).
# A refusal says so at once: only the first 200 characters are searched, so that "I can't stress
# this enough" deep in a helpful answer does not count.
REFUSAL_RATE_GAP = 0.20
REFUSAL_MIN_COUNT = 5
REFUSAL_WINDOW = 200
REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry", "as an ai",
    "as a language model", "i am unable", "i'm unable", "i'm not able to", "i am not able to", "i must decline",
    "i'm not comfortable", "i am not comfortable", "it is not appropriate", "it's not appropriate",
    "against my guidelines",
)  # fmt: skip

# Near-identical pairs: difflib's similarity ratio (2 * matched characters / total characters, close
# to 1 - normalised edit distance) or the Jaccard overlap of the lowercased word sets reaches 0.9.
# A few such pairs are useful hard negatives; when 10% of the pairs are, the data has little signal:
# their gradients (grad log p(chosen) - grad log p(rejected)) nearly cancel and the loss stays flat.
NEAR_IDENTICAL = 0.90
NEAR_IDENTICAL_SHARE = 0.10
# Identical pairs are skipped by training; 5% of them mean the pair-making pipeline is broken.
IDENTICAL_SHARE = 0.05
# Duplicated rows weigh some pairs double and leak between train and held-out splits; 1% is a warning.
DUPLICATE_SHARE = 0.01

# How many example rows a finding's evidence names (its data keeps up to EXAMPLES_KEPT).
EXAMPLES_SHOWN = 5
EXAMPLES_KEPT = 20

MARKDOWN = re.compile(r"^\s{0,3}(#{1,6}\s|[-*+]\s|\d+[.)]\s|```|>\s)|\*\*[^*\n]+\*\*|`[^`\n]+`", re.MULTILINE)
EMOJI = re.compile("[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff]")
APOLOGY = re.compile(r"\b(sorry|apologi[sz]e[sd]?|apologies)\b", re.IGNORECASE)

# Surface feature -> (its name in the evidence, its detector on an answer's text).
FEATURES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "exclamation": ("'!'", lambda text: "!" in text),
    "question": ("'?'", lambda text: "?" in text),
    "markdown": ("markdown (headings, lists, bold, code)", lambda text: MARKDOWN.search(text) is not None),
    "emoji": ("emoji", lambda text: EMOJI.search(text) is not None),
    "apology": ("an apology ('sorry', 'apologise')", lambda text: APOLOGY.search(text) is not None),
}

_SHORTCUT = Symptom(
    "warning",
    "",
    "A surface shortcut: DPO can widen the margin by learning this feature instead of the quality the labels "
    "were meant to capture (reward hacking: high reward accuracy, worse answers).",
    "Rebalance or filter the pairs so the feature appears about equally on both sides (or strip it), train "
    "fewer epochs, and check the policy's samples for the feature.",
)

# What each text finding means: severity (some checks lower it to "info" for a small share), title,
# likely cause and fix (SPEC §5).
SYMPTOMS: dict[str, Symptom] = {
    "length_bias": Symptom(
        "warning",
        "The data prefers longer answers",
        "The data prefers longer answers regardless of quality; DPO learns length as a shortcut (reward "
        "hacking via length, extreme verbosity).",
        "Use length-normalised DPO (loss_type=sigmoid_norm), R-DPO (loss_type=rdpo with rdpo_alpha > 0) or "
        "SimPO (loss_type=simpo), or rebalance the pairs so that chosen is longer in about half of them.",
    ),
    "brevity_bias": Symptom(
        "warning",
        "The data prefers shorter answers",
        "The data prefers shorter answers regardless of quality; DPO learns brevity as a shortcut and the "
        "policy's answers get terse or stop early.",
        "Rebalance the pairs so that chosen is shorter in about half of them, or use length-normalised DPO "
        "(loss_type=sigmoid_norm), which takes answer length out of the margin.",
    ),
    **{
        f"shortcut_{feature}": Symptom(
            _SHORTCUT.severity, f"{name} marks one side", _SHORTCUT.cause, _SHORTCUT.fix
        )
        for feature, (name, _) in FEATURES.items()
    },
    "shortcut_opening": Symptom(
        _SHORTCUT.severity, "A fixed opening marks one side", _SHORTCUT.cause, _SHORTCUT.fix
    ),
    "over_refusal": Symptom(
        "warning",
        "Chosen answers refuse far more often than rejected ones",
        "Safety pairs (chosen refuses, rejected complies) are over-represented: the policy learns that refusing "
        "wins and refuses harmless requests too (over-refusal).",
        "Rebalance with helpful, non-toxic pairs in which chosen answers the request and rejected refuses it "
        "needlessly, or down-sample the safety pairs.",
    ),
    "identical_pairs": Symptom(
        "warning",
        "Pairs whose chosen and rejected answers are identical",
        "The pair-making step produced the same answer twice (greedy sampling, a join on the wrong column), so "
        "these rows carry no preference.",
        "Drop them (training skips them), and if there are many, fix the step that builds the pairs.",
    ),
    "near_identical_pairs": Symptom(
        "warning",
        "Pairs whose answers are nearly identical",
        "Chosen and rejected too similar: their gradients nearly cancel, so the loss stays flat; or the labels "
        "mark formatting differences rather than quality.",
        "Check the labels of these pairs; keep a few as hard negatives, drop or regenerate the rest, and check "
        "that the pairs get different log-probs (`dpokit audit DATA --model MODEL`).",
    ),
    "duplicate_rows": Symptom(
        "warning",
        "Rows repeated verbatim",
        "Datasets merged from overlapping sources, or a pipeline step that ran twice.",
        "Deduplicate: repeated pairs weigh double in training and leak between train and held-out splits.",
    ),
    "contradicting_pairs": Symptom(
        "warning",
        "The same pair appears with opposite labels",
        "Labels are wrong or annotators disagree; opposite labels cancel and push the loss towards flat.",
        "Verify the labels of these pairs and keep one direction (or neither).",
    ),
    "empty_answers": Symptom(
        "warning",
        "Empty or whitespace-only answers",
        "Broken generation or extraction: an empty chosen answer teaches the policy to stop at once, an empty "
        "rejected one makes a pair that says nothing about quality.",
        "Drop or regenerate these rows.",
    ),
}


def report(
    symptoms: Mapping[str, Symptom], code: str, evidence: str, data: Stats, severity: Severity | None = None
) -> Finding:
    """A finding for one of ``symptoms``, with this dataset's evidence (and, optionally, a lower severity)."""
    symptom = symptoms[code]
    return Finding(
        code, severity or symptom.severity, symptom.title, evidence, symptom.cause, symptom.fix, data
    )


@dataclass(frozen=True)
class Pair:
    """The text of one preference pair, as the text checks read it."""

    line: int
    prompt: str
    chosen: str
    rejected: str


def plain_text(value: Text) -> str:
    """A field as text: a string as is, a message list as its contents joined by newlines."""
    return value if isinstance(value, str) else "\n".join(message["content"] for message in value)


def text_pairs(rows: list[PreferenceRow]) -> list[Pair]:
    return [
        Pair(row.line, plain_text(row.prompt), plain_text(row.chosen), plain_text(row.rejected))
        for row in rows
    ]


def examples(lines: list[int]) -> str:
    """'lines 3, 7, 12 (+4 more)' for a finding's evidence."""
    shown = ", ".join(map(str, lines[:EXAMPLES_SHOWN]))
    more = f" (+{len(lines) - EXAMPLES_SHOWN} more)" if len(lines) > EXAMPLES_SHOWN else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def length_bias(pairs: list[Pair]) -> Check:
    """Which side is longer (in characters), the length ratio, and how well length alone predicts the label.

    The label correlation is the point-biserial correlation over a symmetrised sample: each pair
    enters once as (d, +1) and once as (-d, -1), with d = len(chosen) - len(rejected), so that the
    label varies. It reduces to mean(d) / sqrt(mean(d^2)): 1 when chosen is always longer by the same
    amount, 0 when length says nothing about which answer was preferred.
    """
    chosen = np.array([len(pair.chosen) for pair in pairs], dtype=float)
    rejected = np.array([len(pair.rejected) for pair in pairs], dtype=float)
    diff = chosen - rejected
    longer, shorter = float(np.mean(diff > 0)), float(np.mean(diff < 0))
    # Pairs with an empty rejected answer have no ratio; the empty-answer check reports them.
    ratio = chosen[rejected > 0] / rejected[rejected > 0]
    rms = float(np.sqrt(np.mean(diff**2)))
    stats = {
        "unit": "characters",
        "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
        "chosen_longer": longer,
        "chosen_shorter": shorter,
        "ratio_median": float(np.median(ratio)) if ratio.size else None,
        "ratio_p10": float(np.percentile(ratio, 10)) if ratio.size else None,
        "ratio_p90": float(np.percentile(ratio, 90)) if ratio.size else None,
        "label_correlation": float(diff.mean()) / rms if rms else 0.0,
    }
    if len(pairs) < MIN_PAIRS or max(longer, shorter) < LENGTH_BIAS_SHARE:
        return stats, []
    code = "length_bias" if longer >= LENGTH_BIAS_SHARE else "brevity_bias"
    lines = [pair.line for pair, d in zip(pairs, diff) if (d > 0 if code == "length_bias" else d < 0)]
    ratios = (
        f"len(chosen)/len(rejected) has median {stats['ratio_median']:.2f} (p10 {stats['ratio_p10']:.2f}, "
        f"p90 {stats['ratio_p90']:.2f})"
        if ratio.size
        else "every rejected answer is empty"
    )
    evidence = (
        f"chosen is longer in {percent(longer)} of {len(pairs)} pairs and shorter in {percent(shorter)} "
        f"(characters), e.g. {examples(lines)}; {ratios}; length-label correlation "
        f"{stats['label_correlation']:.2f} (0 = length says nothing about the label)."
    )
    return stats, [report(SYMPTOMS, code, evidence, {**stats, "example_lines": lines[:EXAMPLES_KEPT]})]


def is_refusal(text: str) -> bool:
    """Whether an answer opens (within REFUSAL_WINDOW characters) with one of REFUSAL_PHRASES."""
    head = text[:REFUSAL_WINDOW].lower().replace("\u2019", "'")
    return any(phrase in head for phrase in REFUSAL_PHRASES)


def side_gap(
    code: str,
    name: str,
    pairs: list[Pair],
    detect: Callable[[str], bool],
    gap: float,
    min_count: int,
    one_sided: bool = False,
) -> Check:
    """Rates of a feature among chosen and rejected answers, and a finding when they differ by ``gap``.

    The finding needs ``min_count`` answers with the feature on its more frequent side; ``one_sided``
    flags only a feature more frequent among chosen answers.
    """
    n = len(pairs)
    chosen = [detect(pair.chosen) for pair in pairs]
    rejected = [detect(pair.rejected) for pair in pairs]
    c, r = sum(chosen), sum(rejected)
    stats = {"chosen": c / n, "rejected": r / n}
    if n < MIN_PAIRS or abs(c - r) / n < gap or max(c, r) < min_count or (one_sided and c < r):
        return stats, []
    on, off = (chosen, rejected) if c > r else (rejected, chosen)
    lines = [pair.line for pair, yes, no in zip(pairs, on, off) if yes and not no]
    evidence = (
        f"{name} appears in {percent(c / n)} of chosen answers ({c} of {n}) and {percent(r / n)} of rejected "
        f"answers ({r} of {n}); only the {'chosen' if c > r else 'rejected'} answer has it at {examples(lines)}."
    )
    data = {"chosen_rate": c / n, "rejected_rate": r / n, "chosen_count": c, "rejected_count": r}
    return stats, [report(SYMPTOMS, code, evidence, {**data, "example_lines": lines[:EXAMPLES_KEPT]})]


def surface_shortcuts(pairs: list[Pair]) -> Check:
    """Punctuation, markdown, emoji and apologies present far more often on one side than the other."""
    stats, findings = {}, []
    for feature, (name, detect) in FEATURES.items():
        stats[feature], found = side_gap(
            f"shortcut_{feature}", name, pairs, detect, SHORTCUT_RATE_GAP, SHORTCUT_MIN_COUNT
        )
        findings += found
    return stats, findings


def over_refusal(pairs: list[Pair]) -> Check:
    """Chosen answers that refuse far more often than rejected ones teach the policy to refuse."""
    name = "a refusal phrase ('I can't', 'I'm sorry', 'As an AI', ...)"
    return side_gap(
        "over_refusal", name, pairs, is_refusal, REFUSAL_RATE_GAP, REFUSAL_MIN_COUNT, one_sided=True
    )


def opening(text: str) -> str | None:
    """The first OPENING_WORDS words, lowercased without punctuation; None for shorter answers."""
    words = re.findall(r"[\w']+", text.lower())
    return " ".join(words[:OPENING_WORDS]) if len(words) >= OPENING_WORDS else None


def fixed_openings(pairs: list[Pair]) -> Check:
    """Openings ("Sure! Here is", "I think that") far more common on one side than the other."""
    n = len(pairs)
    sides = {side: [opening(getattr(pair, side)) for pair in pairs] for side in ("chosen", "rejected")}
    counts = {side: Counter(filter(None, openings)) for side, openings in sides.items()}
    chosen, rejected = counts["chosen"], counts["rejected"]
    gaps = sorted(
        ((abs(chosen[text] - rejected[text]), text) for text in chosen.keys() | rejected.keys()), reverse=True
    )
    biased = [
        text
        for gap, text in gaps
        if gap / n >= SHORTCUT_RATE_GAP and max(chosen[text], rejected[text]) >= SHORTCUT_MIN_COUNT
    ][:OPENINGS_SHOWN]
    stats = {side: counts[side].most_common(1) for side in sides}
    if n < MIN_PAIRS or not biased:
        return stats, []
    parts, openings = [], []
    for text in biased:
        side = "chosen" if chosen[text] > rejected[text] else "rejected"
        lines = [pair.line for pair, first in zip(pairs, sides[side]) if first == text]
        parts.append(
            f"'{text} ...' opens {chosen[text]} chosen and {rejected[text]} rejected answers of {n} "
            f"({examples(lines)})"
        )
        openings.append(
            {
                "opening": text,
                "chosen_count": chosen[text],
                "rejected_count": rejected[text],
                "example_lines": lines[:EXAMPLES_KEPT],
            }
        )
    return stats, [report(SYMPTOMS, "shortcut_opening", "; ".join(parts) + ".", {"openings": openings})]


def jaccard(chosen: str, rejected: str) -> float:
    """Overlap of the two answers' lowercased word sets (1.0 when both have no words)."""
    a, b = set(re.findall(r"\w+", chosen.lower())), set(re.findall(r"\w+", rejected.lower()))
    return len(a & b) / len(a | b) if a | b else 1.0


def near_identical(chosen: str, rejected: str) -> bool:
    """Whether the word-set Jaccard or difflib's character ratio of two answers reaches NEAR_IDENTICAL."""
    if jaccard(chosen, rejected) >= NEAR_IDENTICAL:
        return True
    matcher = SequenceMatcher(None, chosen, rejected, autojunk=False)
    # The exact ratio is quadratic in the answer length; its upper bounds, tried first, are cheap and rule
    # most pairs out.
    return all(
        bound() >= NEAR_IDENTICAL for bound in (matcher.real_quick_ratio, matcher.quick_ratio, matcher.ratio)
    )


def similar_pairs(pairs: list[Pair], identical_lines: list[int]) -> Check:
    """Pairs whose answers are identical (skipped on reading, given by line) or nearly so."""
    near = [pair.line for pair in pairs if near_identical(pair.chosen, pair.rejected)]
    total = len(pairs) + len(identical_lines)
    stats = {"identical": len(identical_lines), "near_identical": len(near)}
    findings = []
    if identical_lines:
        share = len(identical_lines) / total
        evidence = (
            f"{len(identical_lines)} of {total} rows ({percent(share)}) have chosen == rejected, at "
            f"{examples(identical_lines)}."
        )
        data = {"count": len(identical_lines), "share": share, "lines": identical_lines[:EXAMPLES_KEPT]}
        findings.append(
            report(
                SYMPTOMS, "identical_pairs", evidence, data, "warning" if share >= IDENTICAL_SHARE else "info"
            )
        )
    if near:
        share = len(near) / len(pairs)
        evidence = (
            f"{len(near)} of {len(pairs)} pairs ({percent(share)}) have answers at least "
            f"{NEAR_IDENTICAL:.0%} alike (character similarity or word overlap), at {examples(near)}."
        )
        data = {"count": len(near), "share": share, "lines": near[:EXAMPLES_KEPT]}
        findings.append(
            report(
                SYMPTOMS,
                "near_identical_pairs",
                evidence,
                data,
                "warning" if share >= NEAR_IDENTICAL_SHARE else "info",
            )
        )
    return stats, findings


def _key(prompt: Text, chosen: Text, rejected: Text) -> str:
    return json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)


def duplicates(rows: list[PreferenceRow]) -> Check:
    """Rows repeated verbatim, and pairs that appear again with chosen and rejected swapped."""
    keys = [
        (_key(row.prompt, row.chosen, row.rejected), _key(row.prompt, row.rejected, row.chosen))
        for row in rows
    ]
    groups: dict[str, list[int]] = defaultdict(list)
    for row, (key, _) in zip(rows, keys):
        groups[key].append(row.line)
    repeated = [lines for lines in groups.values() if len(lines) > 1]
    extra = sum(len(lines) - 1 for lines in repeated)
    # A contradiction is seen from both of its rows (and from every repeat): keep each once, by first lines.
    contradictions = sorted(
        {tuple(sorted((groups[key][0], groups[swapped][0]))) for key, swapped in keys if swapped in groups}
    )
    stats = {"duplicate_rows": extra, "contradicting_pairs": len(contradictions)}
    findings = []
    if repeated:
        share = extra / len(rows)
        shown = "; ".join(", ".join(map(str, lines[:EXAMPLES_SHOWN])) for lines in repeated[:EXAMPLES_SHOWN])
        evidence = f"{extra} of {len(rows)} rows ({percent(share)}) repeat an earlier row; same pair at lines {shown}."
        data = {"count": extra, "share": share, "groups": repeated[:EXAMPLES_KEPT]}
        findings.append(
            report(
                SYMPTOMS, "duplicate_rows", evidence, data, "warning" if share >= DUPLICATE_SHARE else "info"
            )
        )
    if contradictions:
        shown = ", ".join(f"{a} and {b}" for a, b in contradictions[:EXAMPLES_SHOWN])
        evidence = (
            f"{len(contradictions)} pairs appear twice with chosen and rejected swapped: lines {shown}."
        )
        data = {
            "count": len(contradictions),
            "pairs": [list(pair) for pair in contradictions[:EXAMPLES_KEPT]],
        }
        findings.append(report(SYMPTOMS, "contradicting_pairs", evidence, data))
    return stats, findings


def empty_answers(pairs: list[Pair]) -> Check:
    """Answers that are empty or whitespace only."""
    empty = {
        side: [pair.line for pair in pairs if not getattr(pair, side).strip()]
        for side in ("chosen", "rejected")
    }
    stats = {side: len(lines) for side, lines in empty.items()}
    if not any(empty.values()):
        return stats, []
    parts = [
        f"{len(lines)} {side} answer{'s' if len(lines) > 1 else ''} ({examples(lines)})"
        for side, lines in empty.items()
        if lines
    ]
    evidence = f"{' and '.join(parts)} of {len(pairs)} pairs are empty or whitespace only."
    data = {f"{side}_lines": lines[:EXAMPLES_KEPT] for side, lines in empty.items()}
    return stats, [report(SYMPTOMS, "empty_answers", evidence, data)]
