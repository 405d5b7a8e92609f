"""Fixtures of the on-policy tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai_stub import StubServer, running_stub


@pytest.fixture
def server() -> Iterator[StubServer]:
    """A stub OpenAI-compatible server on 127.0.0.1 (see openai_stub.py), stopped after the test."""
    with running_stub() as stub:
        yield stub
