"""Chunked log-probs == dense log-probs, values and gradients, for a Linear head and any other head."""

from __future__ import annotations

import pytest
import torch

from dpokit.packing.chunked import chunked_token_logps, dense_token_logps

N, H, V = 37, 16, 101


def _inputs(bias: bool) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=bias)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(V, (N,))
    return head, hidden, targets


def _grads(fn, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    head.zero_grad()
    hidden.grad = None
    logps = fn(head, hidden, targets)
    (logps * weights).sum().backward()
    return logps.detach(), hidden.grad.clone(), [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunked_equals_dense(bias: bool, chunk_size: int) -> None:
    head, hidden, targets = _inputs(bias)
    weights = torch.randn(N)  # a non-uniform upstream gradient, as a loss gives
    dense = _grads(dense_token_logps, head, hidden, targets, weights)
    chunked = _grads(
        lambda *a: chunked_token_logps(*a, chunk_size=chunk_size), head, hidden, targets, weights
    )
    torch.testing.assert_close(chunked[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[1], dense[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(chunked[2], dense[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_frozen_head_gets_no_gradient() -> None:
    """LoRA keeps lm_head frozen: backward must skip the (V, H) weight gradient, not compute and drop it."""
    head, hidden, targets = _inputs(bias=False)
    head.requires_grad_(False)
    chunked_token_logps(head, hidden, targets, chunk_size=8).sum().backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_inference_mode() -> None:
    head, hidden, targets = _inputs(bias=True)
    with torch.inference_mode():
        got = chunked_token_logps(head, hidden, targets, chunk_size=8)
    torch.testing.assert_close(got, dense_token_logps(head, hidden, targets).detach(), atol=1e-5, rtol=1e-5)


class ScaledHead(torch.nn.Module):
    """Not an nn.Linear (like a peft LoRA layer on lm_head): chunks go through the module itself."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.linear(hidden)


def test_other_head_modules_are_chunked_with_recomputation() -> None:
    linear, hidden, targets = _inputs(bias=True)
    head = ScaledHead(linear)
    weights = torch.randn(N)
    dense = _grads(dense_token_logps, head, hidden, targets, weights)
    chunked = _grads(lambda *a: chunked_token_logps(*a, chunk_size=8), head, hidden, targets, weights)
    for got, want in zip([chunked[0], chunked[1], *chunked[2]], [dense[0], dense[1], *dense[2]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
