"""From config paths to tokenized train and held-out pairs, with every skipped row counted and reported."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from dpokit.data.reading import load_rows
from dpokit.data.rows import validate_records
from dpokit.data.tokenize import TokenizedPair, tokenize_rows
from dpokit.errors import DpokitError, InMemory

Rows = Sequence[Mapping[str, Any]]  # preference rows held in memory, in any of TRL's formats

BUILTIN = {
    "builtin:sentiment": "sentiment_pairs.jsonl",
    "builtin:sentiment-heldout": "sentiment_pairs_heldout.jsonl",
    "builtin:sentiment-prompts": "sentiment_prompts_heldout.txt",
    "builtin:demo": "demo.yaml",
}


def resolve_path(name: str) -> str:
    """Map 'builtin:...' names to files shipped in the package; other names pass through."""
    if name.startswith("builtin:"):
        if name not in BUILTIN:
            raise DpokitError(f"{name}: unknown built-in (choose from {', '.join(BUILTIN)})")
        return str(resources.files("dpokit") / "resources" / BUILTIN[name])
    return name


def read_prompts(name: str) -> list[str]:
    path = Path(resolve_path(name))
    if not path.exists():
        raise DpokitError(f"{path}: no such prompts file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class DataReport:
    """What happened to the rows of one dataset on the way to training."""

    source: str
    rows: int
    identical_skipped: int
    dropped_long_prompts: int
    truncated: int

    def warnings(self) -> list[str]:
        notes = []
        if self.identical_skipped:
            notes.append(
                f"{self.source}: skipped {self.identical_skipped} pairs whose chosen equals rejected"
            )
        if self.dropped_long_prompts:
            notes.append(
                f"{self.source}: dropped {self.dropped_long_prompts} rows whose prompt alone reaches "
                "max_length (raise max_length to keep them)"
            )
        if self.truncated:
            notes.append(f"{self.source}: truncated {self.truncated} pairs at max_length")
        return notes


def load_pairs(
    source: str | Rows, tokenizer: PreTrainedTokenizerBase, max_length: int, name: str = "data"
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenized pairs from a file, directory or Hub name, or from rows held in memory (errors name them
    `name row 3`, numbered from 0), with a report of what was skipped, dropped or truncated.

    >>> tokenizer = transformers.AutoTokenizer.from_pretrained("./sft-model")
    >>> pairs, report = load_pairs([{"prompt": "Hi", "chosen": " hello", "rejected": " go"}], tokenizer, 1024)
    """
    if isinstance(source, str):
        path = resolve_path(source)
        rows, identical = load_rows(path)
    else:
        path = InMemory(name)
        rows, identical = validate_records(enumerate(source), path)
    tokenized = tokenize_rows(tokenizer, rows, max_length)
    if not tokenized.pairs:
        raise DpokitError(
            f"{path}: no usable pairs left after skipping identical pairs and over-long prompts"
        )
    report = DataReport(
        path, len(rows) + identical, identical, tokenized.dropped_long_prompts, tokenized.truncated
    )
    return tokenized.pairs, report


def subset(pairs: list[TokenizedPair], size: int | None, seed: int) -> list[TokenizedPair]:
    """A seeded random subset of `size` pairs, kept in dataset order; all pairs when size is None or larger."""
    if size is None or size >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), size))
    return [pairs[i] for i in keep]


def split_pairs(
    pairs: list[TokenizedPair], share: float, seed: int
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Hold out `share` of the pairs (at least one), chosen by a seeded shuffle."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = max(1, round(share * len(pairs)))
    if held >= len(pairs):
        raise DpokitError(f"eval_split={share} leaves no training pairs out of {len(pairs)}")
    held_out = set(order[:held])
    return [p for i, p in enumerate(pairs) if i not in held_out], [pairs[i] for i in sorted(held_out)]
