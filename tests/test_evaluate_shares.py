"""Held-out evaluation shared by DDP processes: each takes every N-th batch, and the gathered sums give the
means one process computes over all pairs, with each pair counted once."""

from __future__ import annotations

import pytest
import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.evaluate import evaluate_pairs, merge_shares
from dpokit.logprobs import PairLogps, padded_pair_logps
from dpokit.losses import LossParams
from tiny_models import build_model

VOCAB, PAD = 320, 0


def make_pairs(count: int) -> list[TokenizedPair]:
    """`count` pairs of varied lengths with token ids drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    return [TokenizedPair(ids(3 + i % 4), ids(2 + i % 3), ids(1 + i % 5), line=i) for i in range(count)]


def logps(model, pairs):
    return padded_pair_logps(model, pairs, PAD)


# pairs per process, by hand: batches of 2, 2, 2, 2, 2, 1 pairs dealt out in turn
COUNTS = {2: [6, 5], 3: [4, 4, 3], 7: [2, 2, 2, 2, 2, 1, 0]}


@pytest.mark.parametrize("processes", sorted(COUNTS))  # 7: more processes than batches, one has none
def test_shared_evaluation_equals_one_process(processes):
    model = build_model(VOCAB, seed=0)
    pairs = make_pairs(11)  # batches of 2: 6 of them, the last of 1 pair
    logps_ = torch.linspace(-30, -10, len(pairs))
    reference = PairLogps(logps_, logps_ - 1, torch.ones(len(pairs)), torch.ones(len(pairs)))
    params = LossParams(beta=0.1)
    alone = evaluate_pairs(model, pairs, reference, "sigmoid", params, logps, batch_size=2)
    shares = []  # what each process would send to gather_object

    def keep(mine: list) -> list:  # the shares so far: a process with no batch merges the others'
        shares.extend(mine)
        return shares

    for i in range(processes):
        evaluate_pairs(
            model, pairs, reference, "sigmoid", params, logps, 2, share=(i, processes), gather=keep
        )
    assert [0 if sums is None else int(sums[-1]) for _, sums in shares] == COUNTS[processes]
    together = merge_shares(shares)
    assert together.keys() == alone.keys()
    for name in alone:
        assert together[name] == pytest.approx(alone[name], rel=1e-12, abs=1e-12), name
    # as the training loop calls it: every process gets the same means through gather_object
    gathered = evaluate_pairs(
        model, pairs, reference, "sigmoid", params, logps, 2, share=(1, processes), gather=lambda mine: shares
    )
    assert gathered == together
