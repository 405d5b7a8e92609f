"""Per-sequence log-probabilities of answers: shift, mask the prompt, sum (SPEC §1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpokit.data.batching import pad_pairs, token_batches
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import is_sharded, progress


@dataclass
class PairLogps:
    """Summed answer log-probs and answer lengths of a batch of pairs, each (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


# How a model's log-probs of a batch of pairs are computed: padded_pair_logps, or packing's faster equal.
LogpsFn = Callable[[torch.nn.Module, list[TokenizedPair]], PairLogps]


def select(logps: PairLogps, index: torch.Tensor | list[int]) -> PairLogps:
    """The pairs at `index` of a dataset-wide PairLogps."""
    index = torch.as_tensor(index)
    return PairLogps(
        logps.chosen[index], logps.rejected[index], logps.chosen_lengths[index], logps.rejected_lengths[index]
    )


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (N, T, V), targets (N, T) -> (N, T), computed in float32."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(answer token | previous tokens) over answer tokens only.

    logits (N, T, V) predict input_ids shifted by one: position t scores token t+1.
    Returns (logps (N,), answer lengths (N,)). The length counts every answer token, as TRL's does, even
    the first token of an answer with an empty prompt, which nothing before it can score.
    """
    targets = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].to(torch.float32)  # (N, T-1)
    per_token = token_logps(logits[:, :-1], targets)  # (N, T-1)
    return (per_token * mask).sum(dim=1), completion_mask.sum(dim=1).to(torch.float32)


def padded_pair_logps(model: torch.nn.Module, pairs: list[TokenizedPair], pad_token_id: int) -> PairLogps:
    """Run chosen and rejected sequences of `pairs` through `model` as one padded batch."""
    batch = pad_pairs(pairs, pad_token_id)
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    ).logits  # (2B, T, V)
    logps, lengths = sequence_logps(
        logits, batch["input_ids"].to(device), batch["completion_mask"].to(device)
    )
    chosen, rejected = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return PairLogps(chosen, rejected, chosen_lengths, rejected_lengths)


def length_batches(
    pairs: list[TokenizedPair], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Dataset indices of `pairs` in the batches `compute_logps` runs: length order, so a batch holds pairs of
    similar length (less padding); `batch_size` pairs a batch, or as many as `max_tokens` tokens hold."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].num_tokens)
    if max_tokens is None:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    groups = token_batches([pairs[i].num_tokens for i in order], max_tokens)
    return [[order[j] for j in group] for group in groups]


def without_grad(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """inference_mode, or no_grad for an FSDP2-sharded model: gathering its weights bumps version counters,
    which tensors made under inference_mode do not have."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def compute_logps(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    logps_fn: LogpsFn,
    batch_size: int,
    desc: str,
    max_tokens: int | None = None,
    share: tuple[int, int, bool] | None = None,
) -> PairLogps:
    """Log-probs of every pair, without gradients, returned in dataset order (on the CPU).

    Batches as `length_batches` makes them. Results stay on the model's device until the end: no host sync
    per batch.

    share: (index, count, lockstep): this process computes every count-th batch from the index-th, and
    the other pairs' columns stay 0 (for a sum across processes). lockstep: every process runs as many
    forward passes, the first batch again where it has fewer, its result dropped: a sharded model's
    forward passes are collectives that all processes must enter together.
    """
    batches = length_batches(pairs, batch_size, max_tokens)
    mine, passes = batches, len(batches)
    if share is not None:
        index, count, lockstep = share
        mine = batches[index::count]
        passes = -(-len(batches) // count) if lockstep else len(mine)
    results = []
    with without_grad(model):
        for step in progress(range(passes), desc=desc, unit="batch", leave=False):
            out = logps_fn(model, [pairs[i] for i in (mine[step] if step < len(mine) else batches[0])])
            if step < len(mine):
                results.append(torch.stack([t.float() for t in vars(out).values()]))  # (4, B)
    table = torch.zeros(4, len(pairs))
    if results:
        table[:, [i for batch in mine for i in batch]] = torch.cat(results, dim=1).cpu()  # (4, N), one read
    return PairLogps(*(row.clone() for row in table))  # separate storages: safetensors saves each
