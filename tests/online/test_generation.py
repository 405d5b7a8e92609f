"""Generation: k answers per prompt, seeded, and left-padded batches equal one prompt at a time (greedy)."""

from __future__ import annotations

import pytest

from dpokit.models.loading import load_model, load_tokenizer
from dpokit.online.generation import Sampling, TransformersBackend

PROMPTS = [
    "The movie was",
    [{"role": "user", "content": "What color is the sky?"}],
    "Hello there, how are you",
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> TransformersBackend:
    return TransformersBackend(
        load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), batch_size=3
    )


def test_k_answers_per_prompt_and_seeded(backend) -> None:
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9)
    answers = backend.generate(PROMPTS, 4, sampling, seed=1)
    assert [len(a) for a in answers] == [4, 4, 4]
    assert all(1 <= answer.num_tokens <= 6 for group in answers for answer in group)
    again = backend.generate(PROMPTS, 4, sampling, seed=1)
    assert [[a.text for a in g] for g in answers] == [[a.text for a in g] for g in again]
    assert len({a.text for g in answers for a in g}) > 3  # sampling, not one answer repeated


def test_left_padded_batch_equals_one_at_a_time_greedy(backend) -> None:
    greedy = Sampling(max_new_tokens=8, temperature=None)
    batched = backend.generate(PROMPTS, 1, greedy, seed=0)
    single = [backend.generate([prompt], 1, greedy, seed=0)[0] for prompt in PROMPTS]
    assert [(a[0].text, a[0].num_tokens) for a in batched] == [(a[0].text, a[0].num_tokens) for a in single]
