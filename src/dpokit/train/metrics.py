"""The metrics.jsonl writer, and the finiteness check of a record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            # Drop records written after the checkpoint we resume from, so the curve continues exactly.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def is_finite(record: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))
