"""Hard-negative mining ranks pairs by the implicit reward the policy learned: against the reference it was
trained with, never against itself (which makes every margin 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dpokit.data.rows import PreferenceRow
from dpokit.data.tokenize import tokenize_rows
from dpokit.logprobs import PairLogps, padded_pair_logps
from dpokit.models.loading import load_model
from dpokit.online import loop as online_loop
from dpokit.online.config import load_iterate_config
from tiny_models import STANDARD_ROWS, build_model

ROWS = STANDARD_ROWS[:4]
BETA = 0.1


@pytest.fixture
def run_dir(tmp_path, tiny_tokenizer) -> Path:
    """A run directory whose round-1 and round-2 policies are tiny models of seeds 1 and 2 (full models, in
    every place a policy can be: train/final for full fine-tuning, policy/ for LoRA with reference: previous).
    The starting model is seed 0, the `train.reference_model` seed 3."""
    run = tmp_path / "run"
    for seed, path in [(0, "start"), (3, "other"), (1, "round-1/train/final"), (2, "round-2/train/final")]:
        build_model(len(tiny_tokenizer), seed=seed).save_pretrained(run / path)
        tiny_tokenizer.save_pretrained(run / path)
    for n in (1, 2):
        (run / f"round-{n}" / "policy").symlink_to(run / f"round-{n}" / "train" / "final")
    return run


def loop_of(run_dir: Path, *overrides: str) -> online_loop.Loop:
    config = load_iterate_config(
        None,
        [
            "prompts=p.txt",
            "eval_prompts=p.txt",
            f"train.model={run_dir / 'start'}",
            f"train.beta={BETA}",
            "hard_negative_fraction=0.5",
            *overrides,
        ],
    )
    return online_loop.Loop(config, run_dir, None, None, [], [])


def logps(run_dir: Path, name: str, tokenizer) -> PairLogps:
    pairs = tokenize_rows(tokenizer, [PreferenceRow(**row, line=i) for i, row in enumerate(ROWS)], None).pairs
    with torch.no_grad():
        return padded_pair_logps(load_model(str(run_dir / name)), pairs, tokenizer.pad_token_id)


def expected(run_dir: Path, policy: str, reference: str, tokenizer) -> torch.Tensor:
    """beta * ((pi - ref)(chosen) - (pi - ref)(rejected)), one padded batch per model."""
    p, r = logps(run_dir, policy, tokenizer), logps(run_dir, reference, tokenizer)
    return BETA * ((p.chosen - r.chosen) - (p.rejected - r.rejected))


@pytest.mark.parametrize(
    "overrides",
    [("train.use_lora=false", "reference=previous"), ("reference=previous",)],
    ids=["full", "lora-merged"],
)
def test_reference_previous_mines_against_the_policy_before(run_dir, tiny_tokenizer, overrides) -> None:
    """Round n's policy is round n-1's, its reference (round n's) is that same policy: margins against it are
    all 0. Mining measures the policy against the reference it was trained with, round n-2's policy."""
    loop = loop_of(run_dir, *overrides)
    assert online_loop.pair_margins(loop, 1, ROWS) is None  # the starting model: nothing learned yet
    for n, policy, reference in [
        (2, "round-1/train/final", "start"),
        (3, "round-2/train/final", "round-1/train/final"),
    ]:
        margins = online_loop.pair_margins(loop, n, ROWS)
        want = expected(run_dir, policy, reference, tiny_tokenizer)
        assert want.abs().min() > 1e-3  # different models: the margins are not 0
        torch.testing.assert_close(margins, want, atol=1e-5, rtol=1e-4)


def test_reference_initial_mines_against_the_starting_model(run_dir, tiny_tokenizer) -> None:
    loop = loop_of(run_dir, "train.use_lora=false")
    assert online_loop.pair_margins(loop, 1, ROWS) is None
    torch.testing.assert_close(
        online_loop.pair_margins(loop, 3, ROWS),
        expected(run_dir, "round-2/train/final", "start", tiny_tokenizer),
        atol=1e-5,
        rtol=1e-4,
    )
    # A separate train.reference_model gives round 1 margins too: the starting model against it.
    with_reference = loop_of(run_dir, "train.use_lora=false", f"train.reference_model={run_dir / 'other'}")
    torch.testing.assert_close(
        online_loop.pair_margins(with_reference, 1, ROWS),
        expected(run_dir, "start", "other", tiny_tokenizer),
        atol=1e-5,
        rtol=1e-4,
    )


def test_round_1_keeps_every_pair_and_says_why(run_dir) -> None:
    """No margin ranks round 1's pairs, so mining keeps all 3 (it kept the first ceil(0.5 * 3) = 2 in file
    order before) and report.json says it was skipped."""
    directory = run_dir / "round-1"
    samples = [
        {"prompt": row["prompt"], "answers": ["a", "bb", "ccc"], "scores": [1.0, 2.0, 3.0]}
        for row in ROWS[:3]
    ]
    online_loop.write_jsonl(directory / "samples.jsonl", samples)
    loop = loop_of(run_dir, "train.use_lora=false", "min_pairs=1")
    loop.console = Console(quiet=True)
    online_loop.pair_stage(loop, 1)
    report = json.loads((directory / "report.json").read_text())
    assert report["pairs"] == 3 and report["dropped"]["hard_negative_mining"] == 0
    assert report["mining_skipped"] == online_loop.MINING_SKIPPED
    assert len(online_loop.read_jsonl(directory / "pairs.jsonl")) == 3
