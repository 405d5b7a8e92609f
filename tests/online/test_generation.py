"""Generation: k answers per prompt, seeded, left-padded batches equal one prompt at a time (greedy), the
sampler draws from the tempered top-p distribution; answer log-probs as the KL estimate takes them."""

from __future__ import annotations

import pytest
import torch

from dpokit.models.loading import load_model, load_tokenizer
from dpokit.online.generation import InverseCdfSampler, Sampling, TransformersBackend
from dpokit.online.models import answer_logps, preference_row, row_logps

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


def test_inverse_cdf_sampler_draws_from_the_tempered_distribution() -> None:
    """40,000 draws from softmax(log p / T) land within 0.01 of its probabilities; zero-probability tokens
    never come up; the output leaves exactly the drawn token finite."""
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    scores = probs.log().expand(40000, -1).clone()  # (N, V)
    torch.manual_seed(0)
    out = InverseCdfSampler(temperature=2.0)(torch.zeros(40000, 1, dtype=torch.long), scores)
    assert (out == 0).sum(-1).eq(1).all() and torch.isinf(out).sum(-1).eq(4).all()
    counts = torch.bincount(out.argmax(-1), minlength=5) / 40000
    tempered = probs.sqrt() / probs.sqrt().sum()  # p^(1/2), renormalised
    assert counts[2] == 0
    torch.testing.assert_close(counts, tempered, atol=0.01, rtol=0)


def test_inverse_cdf_sampler_keeps_the_top_p_nucleus() -> None:
    """top_p 0.8 over (0.5, 0.3, 0.15, 0.05) keeps the two tokens whose mass reaches 0.8, in proportion
    0.625 : 0.375; top_p below the largest probability keeps that token alone."""
    scores = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(40000, -1).clone()
    torch.manual_seed(1)
    drawn = InverseCdfSampler(1.0, top_p=0.8)(torch.zeros(40000, 1, dtype=torch.long), scores).argmax(-1)
    counts = torch.bincount(drawn, minlength=4) / 40000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.625) < 0.01
    only = InverseCdfSampler(1.0, top_p=0.3)(torch.zeros(100, 1, dtype=torch.long), scores[:100]).argmax(-1)
    assert only.eq(1).all()


def test_answer_logps_equal_scoring_the_answer_on_both_sides(backend) -> None:
    """The KL estimate's one-sided scoring equals the chosen side of a pair that holds the answer twice."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    answers = ["fine, thanks", "blue mostly", "a good one"]
    model, tokenizer = backend.model, backend.tokenizer
    rows = [preference_row(p, a, a, tokenizer) for p, a in zip(prompts, answers)]
    torch.testing.assert_close(
        answer_logps(model, tokenizer, prompts, answers, batch_size=2),
        row_logps(model, tokenizer, rows, batch_size=2).chosen,
        atol=1e-5,
        rtol=1e-5,
    )
