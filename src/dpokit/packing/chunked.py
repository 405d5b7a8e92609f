"""Log-probs of target tokens from final hidden states, a chunk of tokens at a time (SPEC §3, "chunked log-probs").

The dense path builds logits for every token at once: a [tokens x vocab] float tensor (4 GB for 20k tokens of a
49k vocabulary) plus as much again for its gradient. Here each chunk of tokens is projected, reduced to one
log-prob per token, and dropped; the backward pass recomputes the chunk's logits from the saved hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: a (1024, 49152) float32 tile is 192 MiB


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(C, H) @ (V, H)^T (+ bias) -> (C, V) in float32, so low-precision weights still give float32 log-probs."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


class ChunkedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per token, never holding more than one (chunk, V) logits tile.

    Forward saves only the inputs and each token's logsumexp (N,); backward recomputes the chunk's logits and
    uses d logp / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        targets: torch.Tensor,  # (N,)
        chunk_size: int,
    ) -> torch.Tensor:
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(hidden[start:end], weight, bias)  # (C, V)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the weight gradient in float32 whatever the weight dtype: it sums over all chunks.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            # grad of logp wrt logits: g * (onehot - softmax), built in place over the recomputed logits tile
            grad_logits = _chunk_logits(h, weight, bias).sub_(lse[start:end, None]).exp_()  # softmax, (C, V)
            grad_logits.mul_(-grad_logps[start:end, None])
            grad_logits.scatter_add_(1, targets[start:end, None], grad_logps[start:end, None].float())
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
        )


def _module_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (C, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log p(target | hidden) per token through the output layer `head`: hidden (N, H), targets (N,) -> (N,) float32.

    A plain ``nn.Linear`` head uses :class:`ChunkedLinearLogps`. Any other head (e.g. a peft LoRA layer on
    lm_head) is called on each chunk under activation checkpointing, which recomputes the chunk in backward:
    the same memory bound, with autograd doing the backward.
    """
    if type(head) is torch.nn.Linear:
        return ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    if not torch.is_grad_enabled():
        return torch.cat(
            [_module_logps(head, h, t) for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))]
        )
    return torch.cat(
        [
            checkpoint(_module_logps, head, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))
        ]
    )


def dense_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same numbers with all logits at once, (N, V): the comparison baseline when chunking is switched off."""
    return _module_logps(head, hidden, targets)
