"""Sample signals and generation on a tiny random Llama with a chat template (no downloads)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from dpokit.diagnostics.samples import encode_prompt, generate_samples, reference_perplexity, repetition

PROMPTS = ["The movie was", "What color is the sky?", "Hello there,"]


@pytest.fixture
def model(tiny_model_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([1, 2, 3, 4, 5], 0.0),  # three 3-grams, all distinct
        ([7] * 10, 0.875),  # eight 3-grams, one distinct: 1 - 1/8
        ([1, 2, 3, 1, 2, 3], 0.25),  # (1,2,3) (2,3,1) (3,1,2) (1,2,3): 1 - 3/4
        ([1, 2], 0.0),  # no 3-gram at all
    ],
)
def test_repetition(ids, expected):
    assert repetition(ids) == expected


def test_reference_perplexity_of_a_uniform_model_is_the_vocabulary_size(model):
    """Zero output weights give equal logits: every token has probability 1/V, so perplexity is V."""
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert reference_perplexity(model, [1, 2, 3], [4, 5, 6, 7]) == pytest.approx(model.config.vocab_size)


def test_reference_perplexity_scores_only_the_answer(model):
    prompt, answer = [5, 6, 7], [8, 9]
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0], dim=-1)
    expected = math.exp(-(logps[2, 8] + logps[3, 9]).item() / 2)  # positions 2 and 3 predict tokens 8 and 9
    assert reference_perplexity(model, prompt, answer) == pytest.approx(expected, rel=1e-5)


def test_encode_prompt_uses_the_chat_template(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, "hi")
    assert tiny_tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_prompt_without_a_template_is_raw_text(tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert encode_prompt(plain, "The movie was") == plain("The movie was").input_ids


def test_generate_samples_records(model, tiny_tokenizer, tiny_reference_dir):
    model.train()
    reference = LlamaForCausalLM.from_pretrained(tiny_reference_dir)
    records = generate_samples(model, tiny_tokenizer, PROMPTS, 8, 100, "policy", reference_model=reference)
    assert model.training  # the training loop's mode is restored
    assert [r["prompt"] for r in records] == PROMPTS
    for record in records:
        assert set(record) == {"step", "source", "prompt", "text", "num_tokens", "repetition", "ref_ppl"}
        assert (record["step"], record["source"]) == (100, "policy")
        assert 1 <= record["num_tokens"] <= 8
        assert 0.0 <= record["repetition"] <= 1.0
        assert record["ref_ppl"] > 1.0
    again = generate_samples(model, tiny_tokenizer, PROMPTS, 8, 100, "policy")
    assert [r["text"] for r in again] == [r["text"] for r in records]  # greedy: deterministic
    assert all(r["ref_ppl"] is None for r in again)  # no reference given


def test_reference_samples_score_themselves(model, tiny_tokenizer):
    [record] = generate_samples(model, tiny_tokenizer, PROMPTS[:1], 8, 0, "reference")
    assert record["source"] == "reference" and record["ref_ppl"] > 1.0


def test_peft_policy_is_scored_with_adapters_disabled(tiny_model_dir, tiny_tokenizer):
    """A LoRA policy passed as its own reference scores like the base model, and keeps its adapters."""
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero update
    policy = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), lora)
    own = generate_samples(policy, tiny_tokenizer, PROMPTS, 8, 1, "policy", reference_model=policy)
    separate = generate_samples(policy, tiny_tokenizer, PROMPTS, 8, 1, "policy", reference_model=base)
    assert [r["ref_ppl"] for r in own] == pytest.approx([r["ref_ppl"] for r in separate], rel=1e-5)
    ids = torch.tensor([encode_prompt(tiny_tokenizer, PROMPTS[0])])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)
