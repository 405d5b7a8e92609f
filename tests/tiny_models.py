"""Tiny offline test models: a random Llama and a byte-level BPE tokenizer with a ChatML chat template.

Importable from any test (pytest's pythonpath includes tests/): `from tiny_models import build_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The movie was wonderful and the actors were great.",
    "I hated the film, it was boring and far too long.",
    "What color is the sky? The sky is blue. The grass is green.",
    "Write a short review of the movie. A delightful comedy with a warm heart!",
    "user assistant system Hello there, how are you today? I am fine, thanks.",
] * 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


# The size of every tiny test model, whatever its family.
TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **TINY_SIZES)).eval()


STANDARD_ROWS = [
    {"prompt": "The movie was", "chosen": " wonderful and great.", "rejected": " boring."},
    {
        "prompt": "What color is the sky?",
        "chosen": " The sky is blue.",
        "rejected": " The grass is green, I think.",
    },
    {"prompt": "Hello there,", "chosen": " how are you today?", "rejected": " I hated the film."},
    {
        "prompt": "Write a short review.",
        "chosen": " A delightful comedy with a warm heart!",
        "rejected": " Too long.",
    },
] * 4

CONVERSATIONAL_ROWS = [
    {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }
    for row in STANDARD_ROWS
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_run_config(tmp_path: Path, model_dir: Path, data: Path, **fields):
    """A RunConfig for a few quick steps of full fine-tuning on a tiny model: no eval, samples, trackers or
    checkpoints unless `fields` ask for them; the output under tmp_path/run, the cache under tmp_path/cache."""
    from dpokit.config import RunConfig

    base = dict(
        model=str(model_dir),
        train_data=str(data),
        eval_data=None,
        sample_prompts=None,
        use_lora=False,
        learning_rate=1e-3,
        effective_batch_size=4,
        micro_batch_size=2,
        save_every=0,
        report_to=[],
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        allow_risky_hyperparameters=True,  # tiny random models need large steps to move in a few steps
    )
    return RunConfig(**{**base, **fields})
