"""The metrics.jsonl writer, and cutting a JSONL log back to the records a resumed run keeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpokit.atomic import write_atomic
from dpokit.errors import DpokitError


def cut_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Rewrite a JSONL log with only the records `keep` accepts, atomically; returns them.

    A kill can tear the last line in half (the process died inside a write): such a line is dropped with
    the records after the point we resume from, never parsed as a record.
    """
    if not path.exists():
        return []
    kept = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a torn final write
                break
            raise DpokitError(
                f"{path}:{number}: not a JSON record; move the file away to start it afresh"
            ) from None
        if keep(record):
            kept.append(record)
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
