"""Lay preference pairs out as packed rows: token ids, position ids, attention structure and what to score.

With a shared prompt, one pair is one segment of a row:

    tokens     p0 p1 p2 | c0 c1 | r0 r1 r2        (prompt, chosen answer, rejected answer)
    positions   0  1  2 |  3  4 |  3  4  5        (the rejected answer continues from the prompt's end)
    branch      0  0  0 |  1  1 |  2  2  2        (both answers see the prompt, never each other)

Without sharing, prompt+chosen and prompt+rejected are two segments. A sequence's last token predicts nothing
that is scored, so it is left out of the input. Attention never crosses segments; position ids restart at 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpokit.data.tokenize import TokenizedPair
from dpokit.packing.binpack import pack_rows

TRUNK = 0  # branch id of prompt tokens (and of whole segments without sharing): every token of the segment sees them
CHOSEN, REJECTED = 1, 2  # branch ids of the answers that share a prompt


@dataclass
class Segment:
    """One independent attention block: its tokens and the answer tokens scored from its hidden states."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    # Per scored answer token: the segment index of the token that predicts it, the target token, and its
    # sequence (pair i's chosen answer is sequence i, its rejected answer B+i).
    sources: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)

    def add_prompt(self, prompt: list[int]) -> None:
        self.tokens += prompt
        self.positions += range(len(prompt))
        self.branches += [TRUNK] * len(prompt)

    def add_answer(self, prompt_length: int, answer: list[int], branch: int, owner: int) -> None:
        """Append `answer` after a prompt of `prompt_length` tokens that ends at segment index prompt_length-1."""
        start = len(self.tokens)
        # The last answer token's hidden state would score the token after the sequence's end: leave it out.
        kept = answer[:-1]
        self.tokens += kept
        self.positions += range(prompt_length, prompt_length + len(kept))
        self.branches += [branch] * len(kept)
        for j, target in enumerate(answer):
            if prompt_length + j == 0:
                continue  # the very first token of a sequence has no context, and no log-prob (as when padded)
            self.sources.append(prompt_length - 1 if j == 0 else start + j - 1)
            self.targets.append(target)
            self.owners.append(owner)

    def spans(self) -> tuple[int, int, int]:
        """Tokens of the trunk, of the chosen branch and of the rejected branch, which follow in that order."""
        return self.branches.count(TRUNK), self.branches.count(CHOSEN), self.branches.count(REJECTED)


def pair_segments(pairs: list[TokenizedPair], share_prompt: bool) -> list[Segment]:
    """One segment per pair (shared prompt) or two (prompt+chosen, prompt+rejected), in pair order."""
    segments = []
    for i, pair in enumerate(pairs):
        chosen = Segment()
        chosen.add_prompt(pair.prompt_ids)
        chosen.add_answer(len(pair.prompt_ids), pair.chosen_ids, CHOSEN if share_prompt else TRUNK, i)
        rejected = chosen if share_prompt else Segment()
        if not share_prompt:
            rejected.add_prompt(pair.prompt_ids)
        rejected.add_answer(
            len(pair.prompt_ids), pair.rejected_ids, REJECTED if share_prompt else TRUNK, len(pairs) + i
        )
        segments += [chosen] if share_prompt else [chosen, rejected]
    return segments


@dataclass
class PackedBatch:
    """Rows of packed segments, right-padded to the longest row, and the scored answer tokens.

    Tensors of the rows are (R, T); `sources`, `targets`, `owners` are (N,) over the N scored answer tokens.
    """

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    segment_ids: torch.Tensor  # (R, T), -1 on padding
    branch_ids: torch.Tensor  # (R, T)
    sources: torch.Tensor  # (N,) flat index into (R*T) of the hidden state that predicts each target
    targets: torch.Tensor  # (N,)
    owners: torch.Tensor  # (N,) sequence in [0, 2B): chosen ones first, as in a padded batch
    # Per segment: (row, first index in the row, trunk, chosen and rejected branch lengths), for attention
    # kernels that take segments one at a time instead of a mask.
    spans: list[tuple[int, int, int, int, int]]

    def to(self, device: torch.device) -> PackedBatch:
        """The batch on `device`; to a GPU through pinned memory and asynchronous copies, so the host goes on
        (laying out the next micro-batch) while the copy runs."""
        if device.type == "cuda":
            tensors = {
                name: t.pin_memory().to(device, non_blocking=True) for name, t in self.tensors().items()
            }
        else:
            tensors = {name: t.to(device) for name, t in self.tensors().items()}
        return PackedBatch(**tensors, spans=self.spans)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor)}

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(R, 1, T, T) mask: bool (True = attend) for SDPA, or additive float (0 / dtype min) for eager.

        Query q sees key k when both are in the same segment, k is not later than q, and k is a prompt token or
        on q's own branch. A padding token sees itself only, so that no row of the softmax is empty (NaN).
        """
        seg, branch = self.segment_ids, self.branch_ids
        index = torch.arange(seg.shape[1], device=seg.device)
        same = seg[:, :, None] == seg[:, None, :]  # (R, T, T)
        visible = (branch[:, None, :] == TRUNK) | (branch[:, :, None] == branch[:, None, :])
        allowed = same & visible & (index[None, :, None] >= index[None, None, :])
        allowed &= (seg[:, :, None] >= 0) | (index[:, None] == index[None, :])
        if dtype == torch.bool:
            return allowed[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def layout_pairs(
    pairs: list[TokenizedPair], pad_token_id: int, *, share_prompt: bool, token_budget: int | None
) -> PackedBatch:
    """Pack the pairs' segments into rows of about `token_budget` tokens (None: one segment per row, i.e. padded)."""
    segments = pair_segments(pairs, share_prompt)
    sizes = [len(s.tokens) for s in segments]
    rows = pack_rows(sizes, token_budget) if token_budget is not None else [[i] for i in range(len(segments))]
    width = max(sum(sizes[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.full(shape, TRUNK, dtype=torch.long)
    sources, targets, owners, spans = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            segment, end = segments[i], offset + sizes[i]
            input_ids[r, offset:end] = torch.tensor(segment.tokens, dtype=torch.long)
            position_ids[r, offset:end] = torch.tensor(segment.positions, dtype=torch.long)
            segment_ids[r, offset:end] = i
            branch_ids[r, offset:end] = torch.tensor(segment.branches, dtype=torch.long)
            sources += [r * width + offset + s for s in segment.sources]
            targets += segment.targets
            owners += segment.owners
            spans.append((r, offset, *segment.spans()))
            offset = end
        # Padding counts positions up from 0 too, so position-id based packing sees it as one more segment.
        position_ids[r, offset:] = torch.arange(width - offset)
    return PackedBatch(
        input_ids,
        position_ids,
        segment_ids,
        branch_ids,
        torch.tensor(sources, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(owners, dtype=torch.long),
        spans,
    )
