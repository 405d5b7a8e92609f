"""Fixtures of the packing tests: the pairs of test_equivalence.LENGTHS and their padded reference log-probs."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import PAD, VOCAB, make_pairs

from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import PairLogps, padded_pair_logps
from tiny_models import build_model


@pytest.fixture(scope="module")
def pairs() -> list[TokenizedPair]:
    return make_pairs()


@pytest.fixture(scope="module")
def reference(pairs) -> PairLogps:
    with torch.inference_mode():
        return padded_pair_logps(build_model(VOCAB, seed=1), pairs, PAD)
