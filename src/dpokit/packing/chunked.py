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


def _project(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Logits hidden @ weight^T (+ bias) of one chunk, (C, H) -> (C, V), written into the float32 tile `out`.

    Writing into one reused tile matters on CPU: a fresh (C, V) tensor per chunk costs as much in page faults
    as the elementwise work on it. The hidden states are cast to the weight's dtype: under autocast they may
    be bf16 while a trained head is fp32, and `torch.mm(out=)` is never autocast, so an fp32 head computes
    fp32 logits (bf16-rounded logits would move a log-prob by ~|logit| / 256).
    """
    out, hidden = out[: hidden.shape[0]], hidden.to(weight.dtype)
    if weight.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.t())  # low-precision weights: float32 logits, as dense_token_logps has them
    return out if bias is None else out.add_(bias)


class ChunkedLinearLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per token, never holding more than one (chunk, V) logits tile.

    Forward saves only the inputs and each token's logsumexp (N,). With p = softmax(logits) and upstream
    gradient g (N,), d logp / d logits = onehot(target) - p, so backward recomputes p per chunk and forms
        grad_h = -g * ((p - onehot) @ W)        grad_W = -(p - onehot)^T (g h)        grad_b = -(p - onehot)^T g
    where p - onehot is formed in the (C, V) tile in place (one element per row), so each gradient is a single
    matmul and the tile is only ever modified in place.
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
        tile = hidden.new_empty((min(chunk_size, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _project(hidden[start:end], weight, bias, tile)  # (C, V)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            top = logits.amax(dim=1)
            lse[start:end] = logits.sub_(top[:, None]).exp_().sum(dim=1).log_().add_(top)
            logps[start:end] = picked - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate in float32 whatever the parameter dtype: the sums run over every chunk.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        )
        tile = hidden.new_empty((min(ctx.chunk_size, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h, g, t = hidden[start:end], grad_logps[start:end, None], targets[start:end]
            probs = _project(h, weight, bias, tile).sub_(lse[start:end, None]).exp_()  # softmax, (C, V)
            # p - onehot(target) in place: one element per row, so no two writes meet (index_add_ into the
            # weight rows of repeated targets needed atomics on a GPU). Then every gradient is one matmul.
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, t] -= 1.0  # (C, V) = -d logp / d logits
            if need_hidden:
                grad_hidden[start:end] = (probs @ weight.float()).mul_(-g).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(probs.t(), g * h.float(), alpha=-1.0)  # (V, H)
            if need_bias:
                grad_bias.addmv_(probs.t(), g.squeeze(1), alpha=-1.0)
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
    lm_head, or a head partitioned by DeepSpeed ZeRO-3) is called on each chunk under activation
    checkpointing, which recomputes the chunk in backward: the same memory bound, with autograd doing the
    backward.
    """
    # A DeepSpeed ZeRO-3 weight (`ds_id`) is whole only while its module runs (DeepSpeed's hooks gather it):
    # such a head is called as a module, like any other.
    zero3 = any(hasattr(weight, "ds_id") for weight in head.parameters())
    if type(head) is torch.nn.Linear and not zero3:
        return ChunkedLinearLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    if not torch.is_grad_enabled():
        return torch.cat(
            [_module_logps(head, h, t) for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))]
        )
    return torch.cat(
        [
            # The reentrant recompute reruns the head's module hooks as its first forward did; the other one
            # left a frozen ZeRO-3 head partitioned (torch's CheckpointError: recomputed shape [0]).
            checkpoint(_module_logps, head, h, t, use_reentrant=zero3)
            for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size))
        ]
    )


def dense_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same numbers with all logits at once, (N, V): the comparison baseline when chunking is switched off."""
    return _module_logps(head, hidden, targets)
