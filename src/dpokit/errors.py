"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations


class DpokitError(Exception):
    """A user-facing error: its message is printed alone, without a traceback."""


class InMemory(str):
    """The name of rows held in memory (``train_data``), numbered from 0: errors read ``train_data row 3``."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location as ``file:line: field 'x'`` (``name row 3: field 'x'`` for rows in memory)."""
    text = str(path)
    if line is not None:
        text += f" row {line}" if isinstance(path, InMemory) else f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
