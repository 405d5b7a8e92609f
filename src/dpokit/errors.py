"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations


class DpokitError(Exception):
    """A user-facing error: its message is printed alone, without a traceback."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location as ``file:line: field 'x'`` for error messages."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
