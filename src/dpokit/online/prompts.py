"""Read prompts for generation: a .txt file (one per line) or rows with a 'prompt' field, in training's formats."""

from __future__ import annotations

from pathlib import Path

from dpokit.data.prepare import read_prompts as read_text_prompts
from dpokit.data.prepare import resolve_path
from dpokit.data.reading import read_records
from dpokit.data.rows import Text, _check_field
from dpokit.errors import DpokitError, where


def read_prompts(source: str) -> list[Text]:
    """Prompts in file order, duplicates removed (a pairs file repeats a prompt once per pair).

    A prompt is a string or a list of {role, content} messages; errors name the file, line and field (an
    empty prompt in a rows file is an error; a .txt file's blank lines are skipped).
    """
    path = Path(resolve_path(source))
    if path.suffix.lower() == ".txt":
        prompts: list[Text] = list(read_text_prompts(source))  # the sample prompts' reader
    else:
        prompts = []
        for line, record in read_records(path):
            if not isinstance(record, dict) or "prompt" not in record:
                raise DpokitError(f"{where(path, line)}: expected a row with a 'prompt' field")
            prompt = _check_field(record["prompt"], path, line, "prompt")
            if not (prompt.strip() if isinstance(prompt, str) else prompt):
                raise DpokitError(f"{where(path, line)}: field 'prompt' is empty")
            prompts.append(prompt)
    unique = {repr(prompt): prompt for prompt in prompts}
    if not unique:
        raise DpokitError(f"{path}: no prompts")
    return list(unique.values())
