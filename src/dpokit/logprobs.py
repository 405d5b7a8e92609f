"""Per-sequence log-probabilities of answers: shift, mask the prompt, sum (SPEC §1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dpokit.data.batching import pad_pairs
from dpokit.data.tokenize import TokenizedPair


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


def compute_logps(
    model: torch.nn.Module, pairs: list[TokenizedPair], logps_fn: LogpsFn, batch_size: int, desc: str
) -> PairLogps:
    """Log-probs of every pair in batches of similar length (less padding), returned in dataset order."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].num_tokens)
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    chosen_lengths = torch.zeros(len(pairs))
    rejected_lengths = torch.zeros(len(pairs))
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            index = torch.tensor(order[start : start + batch_size])
            out = logps_fn(model, [pairs[i] for i in index])
            chosen[index], rejected[index] = out.chosen.float().cpu(), out.rejected.float().cpu()
            chosen_lengths[index] = out.chosen_lengths.float().cpu()
            rejected_lengths[index] = out.rejected_lengths.float().cpu()
    return PairLogps(chosen, rejected, chosen_lengths, rejected_lengths)
