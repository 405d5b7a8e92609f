"""`dpokit audit`: each symptom on a dataset built to show it, with the numbers checked; a clean dataset is quiet."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from transformers import AutoTokenizer

from dpokit.data.reading import load_rows
from dpokit.data.tokenize import tokenize_rows
from dpokit.diagnostics.audit import audit_command, audit_dataset
from dpokit.errors import DpokitError
from dpokit.logprobs import padded_pair_logps
from dpokit.models.loading import load_model, load_tokenizer

TOPICS = [
    "Apples", "Rivers", "Trains", "Violins", "Chess games", "Clouds", "Bread loaves", "Tigers", "Glass jars",
    "Paper kites", "Rockets", "Gardens", "Copper pipes", "Owls", "Deserts", "Maple trees", "Bicycles",
    "Lanterns", "Oceans", "Pencils",
]  # fmt: skip


def clean_rows() -> list[dict]:
    """20 pairs with no bias: chosen is the longer answer in every other row, no feature on either side."""
    rows = []
    for i, topic in enumerate(TOPICS):
        long = f"{topic} are worth a closer look, for many good and practical reasons."
        short = f"{topic} seem plain."
        chosen, rejected = (long, short) if i % 2 == 0 else (short, long)
        rows.append({"prompt": f"Tell me about {topic.lower()}.", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    # The root conftest's write_jsonl cannot be imported here: tests/diagnostics/conftest.py shadows the name.
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def audit(tmp_path, rows: list[dict], model: str | None = None, max_length: int = 1024):
    """(stats, {code: finding}) of a dataset written to JSONL (lines are 1-based row numbers)."""
    stats, findings = audit_dataset(str(write_jsonl(tmp_path / "data.jsonl", rows)), model, max_length)
    codes = [finding.code for finding in findings]
    assert len(codes) == len(set(codes)), codes
    return stats, {finding.code: finding for finding in findings}


def test_clean_dataset_raises_nothing(tmp_path):
    stats, findings = audit(tmp_path, clean_rows())
    assert findings == {}
    assert stats["length"]["chosen_longer"] == 0.5
    assert stats["length"]["label_correlation"] == pytest.approx(0.0)


def test_clean_dataset_with_model_raises_no_warning(tmp_path, tiny_model_dir):
    _, findings = audit(tmp_path, clean_rows(), model=str(tiny_model_dir))
    assert {finding.severity for finding in findings.values()} <= {"info"}


def test_length_bias_numbers(tmp_path):
    """8 of 10 chosen answers are 20 characters against 10 rejected; 2 are 5 against 10.

    d = len(chosen) - len(rejected) = [10]*8 + [-5]*2: mean 7, mean d^2 = 85, correlation 7/sqrt(85).
    Ratios [2]*8 + [0.5]*2: median 2.0, p10 0.5, p90 2.0.
    """
    rows = [
        {
            "prompt": f"Q{i}",
            "chosen": f"long answer {i}".ljust(20, "."),
            "rejected": f"short {i}".ljust(10, "."),
        }
        for i in range(8)
    ] + [{"prompt": f"Q{i}", "chosen": f"okay{i}", "rejected": f"short {i}".ljust(10, ".")} for i in (8, 9)]
    stats, findings = audit(tmp_path, rows)
    assert set(findings) == {"length_bias"}
    finding = findings["length_bias"]
    assert finding.severity == "warning"
    assert "chosen is longer in 80.0% of 10 pairs and shorter in 20.0%" in finding.evidence
    assert "median 2.00 (p10 0.50, p90 2.00)" in finding.evidence
    assert finding.data["example_lines"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert stats["length"]["label_correlation"] == pytest.approx(7 / 85**0.5)
    assert "sigmoid_norm" in finding.fix and "rdpo_alpha" in finding.fix and "simpo" in finding.fix


def test_brevity_bias(tmp_path):
    """Chosen is the shorter answer in 16 of the 20 clean pairs."""
    rows = clean_rows()
    for index, row in enumerate(rows):
        row["chosen"], row["rejected"] = sorted(
            (row["chosen"], row["rejected"]), key=len, reverse=index >= 16
        )
    _, findings = audit(tmp_path, rows)
    assert set(findings) == {"brevity_bias"}
    assert "chosen is longer in 20.0% of 20 pairs and shorter in 80.0%" in findings["brevity_bias"].evidence


def test_few_pairs_report_numbers_but_no_bias(tmp_path):
    rows = clean_rows()[:5]
    for row in rows:
        row["chosen"] = row["chosen"] + "!!"
    stats, findings = audit(tmp_path, rows)
    assert set(findings) == {"few_pairs"} and findings["few_pairs"].severity == "info"
    assert stats["features"]["exclamation"] == {"chosen": 1.0, "rejected": 0.0}


@pytest.mark.parametrize(
    ("feature", "snippet"),
    [
        ("exclamation", "!"),
        ("question", "?"),
        ("markdown", " **Note.**"),
        ("emoji", " 🙂"),
        ("apology", " Sorry."),
    ],
)
def test_surface_shortcut(tmp_path, feature, snippet):
    """The feature is in 12 of 20 chosen answers (rows 1-12) and 2 of 20 rejected ones (rows 1-2)."""
    rows = clean_rows()
    for index, row in enumerate(rows):
        if index < 12:
            row["chosen"] += snippet
        if index < 2:
            row["rejected"] += snippet
    stats, findings = audit(tmp_path, rows)
    assert set(findings) == {f"shortcut_{feature}"}
    finding = findings[f"shortcut_{feature}"]
    assert finding.data["chosen_rate"] == 0.6 and finding.data["rejected_rate"] == 0.1
    assert "60.0% of chosen answers (12 of 20) and 10.0% of rejected answers (2 of 20)" in finding.evidence
    assert finding.data["example_lines"] == list(range(3, 13))
    assert stats["features"][feature] == {"chosen": 0.6, "rejected": 0.1}


def test_shortcut_needs_a_minimum_count(tmp_path):
    """4 of 10 chosen answers with '!' is a 40-point gap, but under SHORTCUT_MIN_COUNT answers."""
    rows = clean_rows()[:10]
    for row in rows[:4]:
        row["chosen"] += "!"
    _, findings = audit(tmp_path, rows)
    assert findings == {}


def test_fixed_opening(tmp_path):
    rows = clean_rows()
    for row in rows[:8]:
        row["chosen"] = "Sure, here is more: " + row["chosen"]
        row["rejected"] = "Well. " + row["rejected"]  # keeps the length balance
    _, findings = audit(tmp_path, rows)
    assert set(findings) == {"shortcut_opening"}
    [opening] = findings["shortcut_opening"].data["openings"]
    assert opening == {"opening": "sure here is", "chosen_count": 8, "rejected_count": 0,
                       "example_lines": [1, 2, 3, 4, 5, 6, 7, 8]}  # fmt: skip


def test_over_refusal_shares(tmp_path):
    """15 of 20 chosen answers refuse (five phrasings, three each), no rejected answer does."""
    refusals = ["I can't help with {}.", "I cannot discuss {}.", "As an AI, I will not cover {}.",
                "I'm unable to talk about {}.", "I won’t describe {}."]  # fmt: skip
    rows = clean_rows()
    for index, row in enumerate(rows[:15]):
        row["chosen"] = refusals[index % 5].format(TOPICS[index].lower())
        row["rejected"] = f"{TOPICS[index]} are {'fun' if index % 2 else 'a long and fascinating subject'}."
    stats, findings = audit(tmp_path, rows)
    assert stats["refusal"] == {"chosen": 0.75, "rejected": 0.0}
    finding = findings["over_refusal"]
    assert finding.data["chosen_rate"] == 0.75 and finding.data["rejected_rate"] == 0.0
    assert finding.data["example_lines"] == list(range(1, 16))
    assert "shortcut_opening" not in findings


def test_refusal_on_the_rejected_side_is_not_over_refusal(tmp_path):
    rows = clean_rows()
    for row in rows[:15]:
        row["rejected"] = "I'm sorry, I cannot help with that."
    _, findings = audit(tmp_path, rows)
    assert "over_refusal" not in findings


def test_identical_near_identical_duplicate_and_contradicting_pairs(tmp_path):
    rows = clean_rows() + [
        {"prompt": "Same?", "chosen": "Yes, the same.", "rejected": "Yes, the same."},  # line 21
        {
            "prompt": "Capital?",
            "chosen": "The capital of France is Paris.",
            "rejected": "The capital of France is Paris",
        },
        clean_rows()[0],  # line 23 repeats line 1
        {
            **clean_rows()[1],
            "chosen": clean_rows()[1]["rejected"],
            "rejected": clean_rows()[1]["chosen"],
        },  # swaps 2
    ]
    stats, findings = audit(tmp_path, rows)
    assert set(findings) == {
        "identical_pairs",
        "near_identical_pairs",
        "duplicate_rows",
        "contradicting_pairs",
    }
    assert findings["identical_pairs"].data["lines"] == [21]
    assert findings["identical_pairs"].severity == "info"  # 1 of 24 rows, under IDENTICAL_SHARE
    assert findings["near_identical_pairs"].data["lines"] == [22]
    assert findings["duplicate_rows"].data["groups"] == [[1, 23]]
    assert findings["contradicting_pairs"].data["pairs"] == [[2, 24]]
    assert stats["identical_skipped"] == 1 and stats["pairs"] == 23


def test_all_pairs_identical(tmp_path):
    stats, findings = audit(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3)
    assert findings["no_pairs"].severity == "critical"
    assert findings["identical_pairs"].data["lines"] == [1, 2, 3]


def test_empty_answers(tmp_path):
    rows = clean_rows()
    rows[2]["chosen"] = "  \n"
    rows[4]["rejected"] = ""
    _, findings = audit(tmp_path, rows)
    finding = findings["empty_answers"]
    assert finding.data == {"chosen_lines": [3], "rejected_lines": [5]}


def test_estimated_truncation(tmp_path):
    """At 4 characters per token: a 400-character prompt is 100 tokens (dropped at max_length 64);
    a 40-character prompt with a 240-character answer is 10 + 60 = 70 tokens (cut)."""
    rows = clean_rows()
    rows[3]["prompt"] = "p" * 400
    rows[6]["prompt"], rows[6]["chosen"] = "q" * 40, "a" * 240
    stats, findings = audit(tmp_path, rows, max_length=64)
    finding = findings["truncation"]
    assert finding.data["dropped_lines"] == [4] and finding.data["truncated_lines"] == [7]
    assert finding.data["estimated"] is True and "estimated at 4 characters per token" in finding.evidence
    assert finding.severity == "warning"


def test_exact_truncation_matches_tokenize_rows(tmp_path, tiny_model_dir):
    rows = clean_rows()
    rows[3]["prompt"] = "Tell me more. " * 20
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    stats, _ = audit_dataset(str(path), str(tiny_model_dir), 24)
    expected = tokenize_rows(load_tokenizer(str(tiny_model_dir)), load_rows(path)[0], 24)
    assert stats["truncation"]["estimated"] is False
    assert stats["truncation"]["dropped"] == expected.dropped_long_prompts == 1
    assert stats["truncation"]["truncated"] == expected.truncated > 0


def test_margins_equal_padded_pair_logps(standard_file, tiny_model_dir):
    stats, _ = audit_dataset(str(standard_file), str(tiny_model_dir), 64)
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).eval()
    pairs = tokenize_rows(tokenizer, load_rows(standard_file)[0], 64).pairs
    with torch.no_grad():
        logps = padded_pair_logps(model, pairs, tokenizer.pad_token_id)
    expected = logps.chosen - logps.rejected
    reference = stats["reference"]
    torch.testing.assert_close(torch.tensor(reference["margins"]), expected, rtol=1e-5, atol=1e-4)
    assert reference["lines"] == list(range(1, 17))
    assert reference["margin_mean"] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert reference["margin_median"] == pytest.approx(np.median(expected.numpy()), abs=1e-4)
    assert reference["reference_accuracy"] == pytest.approx((expected > 0).float().mean().item())


def test_easy_pairs(tmp_path, tiny_model_dir):
    """Chosen is the shorter answer in 16 of 20 pairs: a random model gives its fewer tokens a far higher
    summed log-prob (about 5.8 nats per token for 320 tokens), so those pairs are easy."""
    rows = clean_rows()
    for index, row in enumerate(rows):
        row["chosen"], row["rejected"] = sorted(
            (row["chosen"], row["rejected"]), key=len, reverse=index >= 16
        )
    stats, findings = audit(tmp_path, rows, model=str(tiny_model_dir))
    margins = dict(zip(stats["reference"]["lines"], stats["reference"]["margins"]))
    easy = [line for line, margin in margins.items() if margin >= 5.0]
    assert easy == list(range(1, 17))
    assert findings["easy_pairs"].severity == "info"
    assert findings["easy_pairs"].data["lines"] == easy and findings["easy_pairs"].data["share"] == 0.8


def test_pairs_cut_to_the_same_tokens_are_reference_ties(tmp_path, tiny_model_dir):
    """Answers that share their first words, cut inside that shared part: margin 0 for every pair."""
    rows = [{"prompt": "What color is the sky?", "chosen": f" The sky is blue and bright {i}.",
             "rejected": f" The sky is blue and grey, I think {i}."} for i in range(10)]  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    max_length = len(tokenizer(rows[0]["prompt"])["input_ids"]) + 3
    _, findings = audit(tmp_path, rows, model=str(tiny_model_dir), max_length=max_length)
    assert findings["reference_ties"].data["lines"] == list(range(1, 11))
    assert findings["reference_ties"].data["share"] == 1.0
    assert findings["truncation"].data["identical_lines"] == list(range(1, 11))
    assert findings["truncation"].severity == "warning"


def model_with_template(tmp_path, tiny_model_dir, template: str | None) -> str:
    """The tiny model with its tokenizer's chat template replaced (or removed)."""
    path = tmp_path / "model"
    path.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, path / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return str(path)


def conversational(rows: list[dict]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in rows
    ]


def test_chat_template_missing(tmp_path, tiny_model_dir):
    model = model_with_template(tmp_path, tiny_model_dir, None)
    _, findings = audit(tmp_path, conversational(clean_rows()), model=model)
    assert findings["chat_template_missing"].severity == "critical"


def test_chat_template_error_names_the_rows(tmp_path, tiny_model_dir):
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = conversational(clean_rows())
    for row in (rows[1], rows[3]):
        row["prompt"] = [{"role": "system", "content": "Be brief."}, *row["prompt"]]
    _, findings = audit(tmp_path, rows, model=model_with_template(tmp_path, tiny_model_dir, template))
    finding = findings["chat_template_error"]
    assert finding.severity == "critical" and finding.data["lines"] == [2, 4]
    assert "System role not supported" in finding.evidence


def test_template_without_stop_token_is_missing_eos(tmp_path, tiny_model_dir):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    _, findings = audit(
        tmp_path, conversational(clean_rows()), model=model_with_template(tmp_path, tiny_model_dir, template)
    )
    finding = findings["missing_eos"]
    assert finding.data == {"chosen": list(range(1, 21)), "rejected": list(range(1, 21))}


def test_prompts_in_another_template(tmp_path, tiny_model_dir):
    rows = clean_rows()
    for row in rows[:3]:
        row["prompt"] = f"<|start_header_id|>user<|end_header_id|>\n\n{row['prompt']}<|eot_id|>"
    _, findings = audit(tmp_path, rows, model=str(tiny_model_dir))
    finding = findings["chat_template_mismatch"]
    assert finding.data == {"foreign_markers": {"Llama 3": [1, 2, 3]}}


def test_command_prints_and_writes_json_atomically(tmp_path):
    out = tmp_path / "audit.json"
    buffer = io.StringIO()
    rows = clean_rows()
    rows[0]["rejected"] = rows[0]["chosen"]
    findings = audit_command(str(write_jsonl(tmp_path / "data.jsonl", rows)), None, 1024, out,
                             console=Console(file=buffer, width=120))  # fmt: skip
    report = json.loads(out.read_text())
    assert [finding["code"] for finding in report["findings"]] == [finding.code for finding in findings]
    assert report["findings"][0]["data"]["lines"] == [1]
    assert report["stats"]["pairs"] == 19
    assert sorted(path.name for path in tmp_path.iterdir()) == ["audit.json", "data.jsonl"]
    assert "identical_pairs" in buffer.getvalue() and "chosen longer / shorter" in buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the dataset is empty"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3, "rejected": "b"}\n',
         "data.jsonl:2: field 'chosen'"),
        ('{"prompt": "p", "chosen": "a"}\n', "data.jsonl:1: field 'rejected' is missing"),
    ],
)  # fmt: skip
def test_bad_input_raises_dpokit_error(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DpokitError, match=message):
        audit_dataset(str(path), None, 1024)


def test_missing_file_raises_dpokit_error(tmp_path):
    with pytest.raises(DpokitError, match="no such file"):
        audit_dataset(str(tmp_path / "missing.jsonl"), None, 1024)
