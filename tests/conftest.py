"""Shared fixtures built on tests/tiny_models.py: tiny random Llamas and a tiny tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tiny_models import CONVERSATIONAL_ROWS, STANDARD_ROWS, build_model, build_tokenizer, write_jsonl


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def save_tiny_model(tmp_path_factory, tokenizer: PreTrainedTokenizerFast, name: str, seed: int) -> Path:
    path = tmp_path_factory.mktemp(name)
    build_model(len(tokenizer), seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny random Llama with its tokenizer (the policy's starting point)."""
    return save_tiny_model(tmp_path_factory, tiny_tokenizer, "tiny-model", seed=0)


@pytest.fixture(scope="session")
def tiny_reference_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A different tiny random Llama (another seed), for tests that need policy != reference."""
    return save_tiny_model(tmp_path_factory, tiny_tokenizer, "tiny-reference", seed=1)


@pytest.fixture
def standard_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)


@pytest.fixture
def conversational_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "conversational.jsonl", CONVERSATIONAL_ROWS)
