"""The one-process run every 2-process run is compared with (DDP and FSDP2 alike), trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from launching import run, settings, single

from tiny_models import STANDARD_ROWS, write_jsonl


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", STANDARD_ROWS)
    path.with_name("prompts.txt").write_text(
        "The movie was\nWhat color is the sky?\n"
    )  # `settings` samples them
    return path


@pytest.fixture(scope="session")
def one_process(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    run(single(settings(tiny_model_dir, pairs_file, out)), out)
    return out
