"""Final outputs of a run: the adapter (PEFT format) or the full model, in safetensors, with the tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


def save_final(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Write the trained weights and tokenizer to `out` atomically (temp directory, then rename)."""
    partial = out.with_name(f".partial-{out.name}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out
