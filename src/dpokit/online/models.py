"""Models the on-policy loop runs without training them: the policy of a round, the reference, for
generation and log-probs. Precision comes from the train section, as in `dpokit train`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.config import RunConfig
from dpokit.data.rows import PreferenceRow, Text
from dpokit.data.tokenize import TokenizedPair, tokenize_rows
from dpokit.logprobs import PairLogps, compute_logps
from dpokit.models.loading import adapter_base, load_adapter, load_model
from dpokit.online.generation import training_prompt
from dpokit.packing import build_logps_fn
from dpokit.packing.chunked import DEFAULT_CHUNK_SIZE
from dpokit.train.precision import resolve_precision


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_frozen(name: str, train: RunConfig) -> PreTrainedModel:
    """A model for generation and log-probs: eval mode, no gradients, in the precision's frozen dtype.

    A LoRA adapter directory (a round's train/final) loads as its base with the adapter attached, unmerged, so
    that the same model with adapters disabled (`reference_context`) is the base: no second copy of it.
    """
    device = inference_device()
    dtype = resolve_precision(train.precision, device).frozen_dtype
    base = adapter_base(name)
    model = load_model(base or name, dtype, train.trust_remote_code)
    if base is not None:
        model = load_adapter(name, model)
    return model.to(device).eval().requires_grad_(False)


def preference_row(prompt: Text, chosen: str, rejected: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    """A training row for two generated answers, in the form generation used: conversational (the answers as
    assistant messages) when the prompt was rendered with the chat template, else standard strings."""
    prompt = training_prompt(prompt, tokenizer)
    if isinstance(prompt, list):
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def row_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], batch_size: int
) -> PairLogps:
    """Summed answer log-probs of preference rows under `model`, tokenized exactly as training does."""
    return _pair_logps(model, tokenizer, _tokenized(tokenizer, rows), batch_size)


def answer_logps(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Text],
    answers: Sequence[str],
    batch_size: int,
) -> torch.Tensor:
    """Summed log-probs (N,) of each answer given its prompt, tokenized exactly as training does.

    Each answer is the chosen side of a pair whose rejected side is a one-token stand-in that is never read:
    half the tokens of scoring the answer on both sides."""
    rows = [preference_row(p, a, a, tokenizer) for p, a in zip(prompts, answers)]
    pairs = [replace(pair, rejected_ids=pair.chosen_ids[:1]) for pair in _tokenized(tokenizer, rows)]
    return _pair_logps(model, tokenizer, pairs, batch_size).chosen


def _tokenized(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[TokenizedPair]:
    return tokenize_rows(tokenizer, [PreferenceRow(**row, line=i) for i, row in enumerate(rows)], None).pairs


def _pair_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[TokenizedPair], batch_size: int
) -> PairLogps:
    # Training's fast path (packed rows, each prompt run once, output layer in chunks): the padded one computed
    # full-vocabulary logits at every prompt position too, and each prompt twice.
    logps_fn = build_logps_fn(
        tokenizer.pad_token_id,
        packing=True,
        share_prompt=True,
        chunk_size=DEFAULT_CHUNK_SIZE,
        token_budget=RunConfig.model_fields["token_budget"].default,
    )
    return compute_logps(model, pairs, logps_fn, batch_size, "log-probs")
