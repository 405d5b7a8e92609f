"""Every supported file format reads the same pairs (SPEC §7): JSONL, JSON, Parquet, CSV and `save_to_disk`.

The expected rows are the records the test writes; the writers are the usual ones (json, pyarrow, csv,
`datasets`), so these are files as users have them. Texts carry what breaks naive readers: a newline, a
Unicode line separator (U+2028, legal unescaped in JSON), a NEL (U+0085), commas and quotes (CSV), emoji,
and an answer that is itself JSON (a CSV cell must not turn it into a message list).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, load_dataset
from trl.data_utils import extract_prompt as trl_extract_prompt

from dpokit.data.prepare import load_pairs
from dpokit.data.reading import load_rows
from dpokit.data.rows import extract_prompt
from dpokit.data.tokenize import tokenize_rows
from dpokit.errors import DpokitError
from tiny_models import write_jsonl

STANDARD = [
    {"prompt": "The movie was", "chosen": ' wonderful, "truly" great.', "rejected": " boring."},
    {"prompt": "Line one\nline two", "chosen": " two\u2028lines 🙂", "rejected": " café\u0085ok"},
    {"prompt": "Hello there,", "chosen": " how are you today?", "rejected": " I hated the film."},
    {
        "prompt": "The ids as JSON:",
        "chosen": '[{"id": 1}, {"id": 2}]',
        "rejected": "[{oops}]",
    },  # text, not messages
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    for row in STANDARD
]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl_unescaped(path: Path, records: list[dict]) -> Path:
    """JSONL as `json.dumps(..., ensure_ascii=False)` writes it: U+2028 and NEL stay raw inside strings."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_csv(path: Path, records: list[dict], encoding: str = "utf-8") -> Path:
    """CSV as the csv module writes it; message lists are JSON-encoded cells."""
    with path.open("w", newline="", encoding=encoding) as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()})
    return path


def write_saved_dataset(path: Path, records: list[dict]) -> Path:
    Dataset.from_list(records).save_to_disk(str(path))
    return path


def write_saved_dataset_dict(path: Path, records: list[dict]) -> Path:
    DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda d, r: write_jsonl(d / "pairs.jsonl", r),
    "jsonl-unescaped": lambda d, r: write_jsonl_unescaped(d / "pairs.jsonl", r),
    "json": lambda d, r: write_json(d / "pairs.json", r),
    "parquet": lambda d, r: write_parquet(d / "pairs.parquet", r),
    "csv": lambda d, r: write_csv(d / "pairs.csv", r),
    "csv-bom": lambda d, r: write_csv(d / "pairs.csv", r, encoding="utf-8-sig"),
    "saved-dataset": lambda d, r: write_saved_dataset(d / "saved", r),
    "saved-dataset-dict": lambda d, r: write_saved_dataset_dict(d / "saved", r),
}


def fields(rows) -> list[tuple]:
    return [(row.prompt, row.chosen, row.rejected) for row in rows]


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("records", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_every_format_reads_the_written_pairs(fmt, records, tmp_path, tiny_tokenizer):
    """Each format gives back exactly the records written, in order, and therefore the same token ids as JSONL."""
    rows, identical = load_rows(WRITERS[fmt](tmp_path, records))
    assert identical == 0
    assert fields(rows) == [(r["prompt"], r["chosen"], r["rejected"]) for r in records]

    reference_rows, _ = load_rows(write_jsonl(tmp_path / "reference.jsonl", records))
    ours = tokenize_rows(tiny_tokenizer, rows, 1024).pairs
    expected = tokenize_rows(tiny_tokenizer, reference_rows, 1024).pairs
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ours] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_rows_match_what_datasets_reads(fmt, tmp_path):
    """The peer check for text formats: `datasets.load_dataset`, which TRL users load files with, reads the
    same strings from the same file (including the BOM-prefixed CSV that spreadsheet tools write)."""
    writer = {"jsonl": write_jsonl_unescaped, "csv": lambda p, r: write_csv(p, r, encoding="utf-8-sig")}[fmt]
    path = writer(tmp_path / f"pairs.{fmt}", STANDARD)
    peer = load_dataset("json" if fmt == "jsonl" else "csv", data_files=str(path), split="train")
    rows, _ = load_rows(path)
    assert fields(rows) == [(r["prompt"], r["chosen"], r["rejected"]) for r in peer]


def test_jsonl_line_numbers_count_newlines_only(tmp_path):
    """A raw U+2028 inside a string does not shift line numbers: errors point at the line an editor shows."""
    path = write_jsonl_unescaped(tmp_path / "pairs.jsonl", [*STANDARD, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DpokitError, match=rf"pairs\.jsonl:{len(STANDARD) + 1}: field 'rejected' is missing"):
        load_rows(path)


@pytest.mark.parametrize(
    "identical",
    [
        {"prompt": "Same?", "chosen": " yes", "rejected": " yes"},
        {"chosen": "Same? yes", "rejected": "Same? yes"},
        {
            "prompt": [{"role": "user", "content": "Same?"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "yes"}],
        },
    ],
    ids=["standard", "implicit", "conversational"],
)
def test_identical_pair_is_skipped_and_counted(identical, tmp_path, tiny_tokenizer):
    """A pair whose chosen equals its rejected teaches nothing (zero gradient): it is skipped, counted, reported."""
    others = STANDARD if isinstance(identical["chosen"], str) else CONVERSATIONAL
    path = write_jsonl(tmp_path / "pairs.jsonl", [others[0], identical, others[1]])
    rows, skipped = load_rows(path)
    assert skipped == 1
    assert fields(rows) == [(r["prompt"], r["chosen"], r["rejected"]) for r in others[:2]]
    assert [row.line for row in rows] == [1, 3]

    pairs, report = load_pairs(str(path), tiny_tokenizer, 1024)
    assert (len(pairs), report.rows, report.identical_skipped) == (2, 3, 1)
    assert report.warnings() == [f"{path}: skipped 1 pairs whose chosen equals rejected"]


def _messages(*contents: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        (
            "The sky is blue.",
            "The sky is green.",
        ),  # shared prefix ending in a space: the space stays with answers
        ("a  b", "a  c"),  # two spaces: only the last moves to the answers
        ("Hello there", "Hello there, friend"),  # a prefix of the other: TRL stops one character short
        ("Hello there, friend", "Hello there"),
        ("abc", "xyz"),  # nothing in common: empty prompt
        ("abc ", "xyz"),  # nothing in common, chosen ends in a space: TRL's index -1 quirk
        (_messages("Hi", "Hello!"), _messages("Hi", "Go away.")),
        (_messages("Hi", "Hello!"), _messages("Hi", "Hello!", "More?", "No.")),  # a prefix of the other
        (_messages("Hi", "Hello!", "Bye", "Ciao"), _messages("Hi", "Hello!", "Bye", "Later")),  # multi-turn
    ],
)
def test_extract_prompt_matches_trl(chosen, rejected):
    """dpokit's implicit-prompt split is TRL's `extract_prompt`, quirks included."""
    expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
