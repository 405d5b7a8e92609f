"""Read preference records from JSONL, JSON, Parquet, CSV, a saved `datasets` directory, or a Hub name."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.data.rows import PreferenceRow, validate_records
from dpokit.errors import DpokitError, where


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        # A leading byte-order mark (spreadsheet tools write one) is not content: left in, it renames the
        # first CSV column ("\ufeffprompt") and makes the first JSON line invalid.
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DpokitError(
            f"{where(path, line)}: bytes that are not valid UTF-8 (at byte {error.start})"
        ) from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085 and others, which JSON strings may
    # hold unescaped (json.dumps(..., ensure_ascii=False) writes them raw). A trailing "\r" is JSON whitespace.
    for line, text in enumerate(_read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as error:
            raise DpokitError(
                f"{where(path, line)}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DpokitError(f"{where(path, error.lineno)}: invalid JSON ({error.msg})") from None
    if isinstance(data, dict) and all(isinstance(value, list) for value in data.values()) and data:
        # Column-oriented JSON, as `Dataset.to_dict()` writes it.
        lengths = {len(value) for value in data.values()}
        if len(lengths) != 1:
            raise DpokitError(f"{path}: column-oriented JSON whose columns have different lengths")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DpokitError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    # A JSON array has no useful line numbers; report the 1-based row number instead.
    yield from enumerate(data, start=1)


def _csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    # newline="" as the csv module requires: quoted cells keep their line breaks, and only real record
    # separators end a row.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    for record in reader:
        # Cells holding JSON message lists are decoded, so conversational data survives a CSV round trip.
        yield (
            reader.line_num,
            {key: _maybe_messages(value) for key, value in record.items() if key is not None},
        )


def _maybe_messages(value: str | None) -> Any:
    """A cell holding a JSON list of messages (objects with a 'role') becomes that list; any other text stays
    text, even JSON: a standard answer may itself be '[{"id": 1}]'."""
    if value is None or not value.startswith("[{"):
        return value
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    is_messages = isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m for m in decoded)
    return decoded if is_messages else value


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DpokitError(f"{path}: not a readable Parquet file ({error})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _saved_dataset_records(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a foreign or half-written directory fails with several unrelated types
        raise DpokitError(f"{path}: not a readable dataset saved with `save_to_disk` ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DpokitError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(loaded)})")
        loaded = loaded["train"]
    yield from enumerate(loaded, start=1)


def _hub_records(name: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, gated: all end the same way for the user
        raise DpokitError(f"{name}: no such file, and loading it from the Hub failed ({error})") from None
    yield from enumerate(loaded, start=1)


READERS = {
    ".jsonl": _jsonl_records,
    ".json": _json_records,
    ".parquet": _parquet_records,
    ".csv": _csv_records,
}


def read_records(source: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, raw record) from a file, a saved dataset directory, or a Hub dataset name."""
    path = Path(source)
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DpokitError(f"{path}: a directory that is not a dataset saved with `save_to_disk`")
        return _saved_dataset_records(path)
    if path.exists():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DpokitError(
                f"{path}: unknown file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)"
            )
        return reader(path)
    if "/" in str(source) and not str(source).startswith((".", "/")) and path.suffix == "":
        return _hub_records(str(source))
    raise DpokitError(f"{path}: no such file or directory")


def load_rows(source: str | Path) -> tuple[list[PreferenceRow], int]:
    """Read and validate a preference dataset; returns (rows, pairs skipped because chosen == rejected)."""
    return validate_records(read_records(source), source)
