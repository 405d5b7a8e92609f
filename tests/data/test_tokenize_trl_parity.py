"""Token ids identical to TRL 1.16's DPOTrainer (SPEC §7): the peer computes the expected ids.

Each test writes the records to a JSONL file, loads them through dpokit (`load_rows` + `tokenize_rows`), and
builds a real `trl.DPOTrainer` on the same records. TRL's processed `train_dataset` gives prompt_ids,
chosen_ids and rejected_ids, and TRL's own collator applies the max_length truncation; dpokit's pairs must give
the very same sequences and answer masks, row for row, and drop the same rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from dpokit.data.reading import load_rows
from dpokit.data.tokenize import TokenizedDataset, tokenize_rows
from tiny_models import CONVERSATIONAL_ROWS, STANDARD_ROWS, write_jsonl

EOS = "<|im_end|>"

# Standard rows that stress the tokenizer: a prompt ending in a space (its last token merges with the answer's
# first), an answer that already ends with EOS (no second EOS), an empty prompt, non-ASCII text.
TRICKY_STANDARD_ROWS = [
    *STANDARD_ROWS[:4],
    {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},
    {"prompt": "Hello", "chosen": " there, how are you?" + EOS, "rejected": " I hated it."},
    {"prompt": "", "chosen": "A delightful comedy.", "rejected": "Boring."},
    {"prompt": "Café review:", "chosen": " délicieux 🙂", "rejected": " bof"},
]


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


TRICKY_CONVERSATIONAL_ROWS = [
    *CONVERSATIONAL_ROWS[:4],
    {
        "prompt": _messages(("system", "Be kind."), ("user", "Review the movie.")),
        "chosen": _messages(("assistant", "A delightful comedy!")),
        "rejected": _messages(("assistant", "Too long.")),
    },
    {
        "prompt": _messages(
            ("user", "Hello there,"), ("assistant", "Hi!"), ("user", "What color is the sky?")
        ),
        "chosen": _messages(("assistant", "The sky is blue.")),
        "rejected": _messages(("assistant", "Green."), ("user", "Really?"), ("assistant", "Yes.")),
    },
]

# Implicit prompts: TRL's extract_prompt takes the common prefix, keeps a space that ends it with the answers,
# and, when one answer is a prefix of the other, stops one character short.
IMPLICIT_STANDARD_ROWS = [
    {"chosen": "The movie was wonderful and great.", "rejected": "The movie was boring."},
    {"chosen": "What color is the sky? The sky is blue.", "rejected": "What color is the sky? Green."},
    {"chosen": "Hello there", "rejected": "Hello there, how are you today?"},
    {"chosen": "I hated the film.", "rejected": "The film was boring."},
]

IMPLICIT_CONVERSATIONAL_ROWS = [
    {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    for row in TRICKY_CONVERSATIONAL_ROWS
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tokenizer as both dpokit and TRL load it from the model directory."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def special_tokens_tokenizer(tiny_model_dir):
    """A tokenizer that wraps every encoded text in BOS ... EOS itself (Llama adds BOS, T5-likes add EOS).

    The prompt's ids then end with an EOS that prompt+answer does not have there, so the answer starts where
    the two diverge, and a standard answer ends with two EOS tokens (the appended one and the added one).
    """
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    return tokenizer


def trl_sequences(model_dir: Path, tokenizer, records: list[dict], max_length: int, tmp_path: Path):
    """TRL's view of `records`: [(prompt+chosen, chosen mask, prompt+rejected, rejected mask)] per kept row, and
    how many kept rows the collator cuts.

    The dataset is processed by `DPOTrainer.__init__`; each kept row then goes through the trainer's own
    collator, which is where TRL truncates to max_length.
    """
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=max_length
        ),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(records),
    )
    sequences, truncated = [], 0
    for example in trainer.train_dataset:
        answer = max(len(example["chosen_ids"]), len(example["rejected_ids"]))
        truncated += len(example["prompt_ids"]) + answer > max_length
        batch = trainer.data_collator([example])  # rows: [prompt+chosen, prompt+rejected], right-padded
        rows = []
        for i in range(2):
            length = int(batch["attention_mask"][i].sum())
            rows += [batch["input_ids"][i, :length].tolist(), batch["completion_mask"][i, :length].tolist()]
        sequences.append(tuple(rows))
    return sequences, truncated


def dpokit_sequences(tokenized: TokenizedDataset):
    """dpokit's pairs in the same shape as `trl_sequences`."""
    return [
        (
            p.prompt_ids + p.chosen_ids,
            [0] * len(p.prompt_ids) + [1] * len(p.chosen_ids),
            p.prompt_ids + p.rejected_ids,
            [0] * len(p.prompt_ids) + [1] * len(p.rejected_ids),
        )
        for p in tokenized.pairs
    ]


def tokenize_both(records, max_length, tiny_model_dir, tokenizer, tmp_path):
    rows, identical = load_rows(write_jsonl(tmp_path / "pairs.jsonl", records))
    assert identical == 0  # TRL keeps identical pairs; the parity data has none
    tokenized = tokenize_rows(tokenizer, rows, max_length)
    return tokenized, trl_sequences(tiny_model_dir, tokenizer, records, max_length, tmp_path)


@pytest.mark.parametrize(
    "records",
    [TRICKY_STANDARD_ROWS, TRICKY_CONVERSATIONAL_ROWS, IMPLICIT_STANDARD_ROWS, IMPLICIT_CONVERSATIONAL_ROWS],
    ids=["standard", "conversational", "implicit-string", "implicit-messages"],
)
def test_token_ids_match_trl(records, tiny_model_dir, tokenizer, tmp_path):
    """With room for every row, dpokit's prompt+answer ids and answer masks equal TRL's for every row, in order.

    This covers EOS appending (and not doubling it), the chat template with generation prompt, the common-prefix
    split when tokens merge across the prompt/answer boundary, and TRL's implicit prompt extraction.
    """
    tokenized, (expected, _) = tokenize_both(records, 1024, tiny_model_dir, tokenizer, tmp_path)
    assert len(expected) == len(records)
    assert dpokit_sequences(tokenized) == expected
    assert (tokenized.dropped_long_prompts, tokenized.truncated) == (0, 0)


@pytest.mark.parametrize(
    ("records", "max_length"),
    # Standard: prompts of 12 and exactly 10 tokens are dropped (TRL's filter is len(prompt_ids) < max_length).
    [(TRICKY_STANDARD_ROWS, 10), (TRICKY_CONVERSATIONAL_ROWS, 30)],
    ids=["standard", "conversational"],
)
def test_truncation_and_dropped_prompts_match_trl(records, max_length, tiny_model_dir, tokenizer, tmp_path):
    """With a max_length that cuts answers and exceeds some prompts, dpokit keeps the same rows as TRL, truncated
    to the same ids; its dropped count is the number of rows TRL filtered out, and its truncated count the number
    of kept rows TRL's collator cuts."""
    tokenized, (expected, truncated) = tokenize_both(records, max_length, tiny_model_dir, tokenizer, tmp_path)
    # The case must exercise all three outcomes: dropped, truncated, and kept whole.
    assert 0 < len(expected) < len(records)
    assert 0 < truncated < len(expected)

    assert dpokit_sequences(tokenized) == expected
    assert tokenized.dropped_long_prompts == len(records) - len(expected)
    assert tokenized.truncated == truncated


@pytest.mark.parametrize(
    "records", [TRICKY_STANDARD_ROWS, IMPLICIT_STANDARD_ROWS], ids=["standard", "implicit-string"]
)
def test_token_ids_match_trl_when_the_tokenizer_adds_special_tokens(
    records, tiny_model_dir, special_tokens_tokenizer, tmp_path
):
    """With BOS and EOS added by the tokenizer, dpokit still splits prompt and answers where TRL does."""
    tokenized, (expected, _) = tokenize_both(
        records, 1024, tiny_model_dir, special_tokens_tokenizer, tmp_path
    )
    bos, eos = special_tokens_tokenizer.bos_token_id, special_tokens_tokenizer.eos_token_id
    assert all(chosen[0] == bos and chosen[-2:] == [eos, eos] for chosen, *_ in expected)  # the case is real
    assert dpokit_sequences(tokenized) == expected
