"""Validate raw records into preference rows (TRL's standard, conversational and implicit-prompt forms)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dpokit.errors import DpokitError, InMemory, where

ROLES = ("system", "user", "assistant", "tool", "developer")
FIELDS = ("prompt", "chosen", "rejected")

Text = str | list[dict[str, Any]]


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair. Each field is a string (standard) or a list of {role, content} messages."""

    prompt: Text
    chosen: Text
    rejected: Text
    line: int  # 1-based line (JSONL, CSV) or row number (JSON, Parquet, datasets) in the source

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def _check_field(value: Any, path: object, line: int, name: str) -> Text:
    """Return a field's value if it is a string or a list of valid messages, else raise naming the field."""
    if value is None:
        raise DpokitError(f"{where(path, line, name)} is null")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DpokitError(
            f"{where(path, line, name)} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DpokitError(
                f"{where(path, line, name)} message {number} must be an object with 'role' and 'content'"
            )
        if message["role"] not in ROLES:
            raise DpokitError(
                f"{where(path, line, name)} message {number} has unknown role {message['role']!r} "
                f"(expected one of {', '.join(ROLES)})"
            )
        if not isinstance(message["content"], str):
            raise DpokitError(f"{where(path, line, name)} message {number} content must be a string")
    return value


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split an implicit prompt off two answers: their longest common prefix (of characters or messages).

    Mirrors TRL's ``extract_prompt`` exactly, including its quirk of keeping a space that ends the common
    prefix with the answers, so that implicit-prompt datasets tokenize as they do under TRL.
    """
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def validate_record(record: Any, path: object, line: int) -> PreferenceRow:
    """Turn one raw record into a PreferenceRow, or raise a DpokitError naming file, line and field."""
    if not isinstance(record, dict):
        raise DpokitError(
            f"{where(path, line)}: expected an object with 'chosen' and 'rejected' (and usually 'prompt'), "
            f"got {type(record).__name__}"
        )
    for name in ("chosen", "rejected"):
        if name not in record:
            raise DpokitError(f"{where(path, line, name)} is missing")
    chosen = _check_field(record["chosen"], path, line, "chosen")
    rejected = _check_field(record["rejected"], path, line, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DpokitError(f"{where(path, line, 'rejected')} mixes a string and a message list with 'chosen'")
    if "prompt" not in record:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    else:
        prompt = _check_field(record["prompt"], path, line, "prompt")
        if isinstance(prompt, list) != isinstance(chosen, list):
            raise DpokitError(
                f"{where(path, line, 'prompt')} is {'a message list' if isinstance(prompt, list) else 'a string'} "
                f"but 'chosen' is {'a message list' if isinstance(chosen, list) else 'a string'}"
            )
    if isinstance(chosen, list) and not chosen:
        raise DpokitError(f"{where(path, line, 'chosen')} has no messages after the prompt")
    return PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, line=line)


def validate_records(records: Iterable[tuple[int, Any]], path: object) -> tuple[list[PreferenceRow], int]:
    """Validate every record; return the rows and the number of pairs skipped because chosen == rejected.

    Raises on the first bad record, and when standard and conversational rows are mixed in one file.
    """
    rows: list[PreferenceRow] = []
    identical = 0
    first: PreferenceRow | None = None
    for line, record in records:
        row = validate_record(record, path, line)
        if first is None:
            first = row
        elif row.conversational != first.conversational:
            kinds = {True: "conversational", False: "standard"}
            raise DpokitError(
                f"{where(path, line, 'chosen')} is {kinds[row.conversational]} but "
                f"{'row' if isinstance(path, InMemory) else 'line'} {first.line} is "
                f"{kinds[first.conversational]}; a dataset must use one format"
            )
        if row.chosen == row.rejected:
            identical += 1
            continue
        rows.append(row)
    if first is None:
        raise DpokitError(f"{path}: the dataset is empty (no rows)")
    return rows, identical
