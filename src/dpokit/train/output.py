"""Final outputs of a run: the adapter (PEFT format) or the full model, in safetensors, with the tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from dpokit.atomic import replace_dir


def save_final(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trained weights and tokenizer to `out` atomically: into `.partial-<name>`, fsynced, renamed.

    state_dict: the weights to write in place of the model's own (an FSDP2 model's, gathered from its shards).

    An existing `out` (a resumed run finishing again, or a repeated export) is set aside and removed
    only once the new copy is in place (see `replace_dir`); for a run's `final`, the last checkpoint
    holds the same weights too, so nothing is lost whichever instant a kill hits.
    """
    partial = out.with_name(f".partial-{out.name}")
    shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier save
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(partial), safe_serialization=True, **extra)
    tokenizer.save_pretrained(str(partial))
    replace_dir(partial, out)
    return out
