"""`dpokit eval` reports the numbers TRL 1.16's `DPOTrainer.evaluate()` reports (SPEC §7): TRL is the peer.

Policy and reference are two different tiny random Llamas, so every reward, margin and log-ratio is non-zero.
dpokit runs through its real command line; TRL gets the same two models, the same file, the same batch size
and the same loss settings. TRL averages per-batch means, so the batch size divides the number of pairs and
the two averages coincide. TRL's DPOConfig defaults to bf16=True, which runs its reference model under bf16
autocast (about 1e-3 off in summed log-probs); it is turned off so that both sides compute in float32.
"""

from __future__ import annotations

import json

import pytest
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from typer.testing import CliRunner

from dpokit.cli import app
from tiny_models import CONVERSATIONAL_ROWS, STANDARD_ROWS, write_jsonl

METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]
BATCH_SIZE = 4

# Eight different pairs in two batches; each batch mixes lengths (so padding is exercised).
STANDARD_PAIRS = [
    {**row, "prompt": f"{row['prompt']}{' Please.' * (i // 4)}"} for i, row in enumerate(STANDARD_ROWS[:8])
]
CONVERSATIONAL_PAIRS = [
    {**row, "prompt": [{"role": "system", "content": "Be brief. " * (i // 4 + 1)}, *row["prompt"]]}
    for i, row in enumerate(CONVERSATIONAL_ROWS[:8])
]
# An empty prompt (implicit-prompt rows whose answers share nothing): the first answer token is not scored.
EMPTY_PROMPT_PAIRS = [{**row, "prompt": ""} for row in STANDARD_ROWS[:4]]


def dpokit_eval(
    policy, reference, data, out, loss_type, beta, label_smoothing, max_length
) -> dict[str, float]:
    options = {
        "--policy": policy,
        "--reference": reference,
        "--data": data,
        "--json": out,
        "--batch-size": BATCH_SIZE,
        "--loss-type": loss_type,
        "--beta": beta,
        "--label-smoothing": label_smoothing,
        "--max-length": max_length,
    }
    result = CliRunner().invoke(app, ["eval", *(str(item) for option in options.items() for item in option)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def trl_evaluate(
    policy, reference, data, tmp_path, loss_type, beta, label_smoothing, max_length
) -> dict[str, float]:
    dataset = load_dataset("json", data_files=str(data), split="train")
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=max_length,
        per_device_eval_batch_size=BATCH_SIZE,
        loss_type=[loss_type],
        beta=beta,
        label_smoothing=label_smoothing,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy),
        ref_model=AutoModelForCausalLM.from_pretrained(reference),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(policy),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    metrics = trainer.evaluate()
    return {name: metrics[f"eval_{name}"] for name in METRICS}


@pytest.mark.parametrize(
    ("pairs", "loss_type", "beta", "label_smoothing", "max_length"),
    [
        pytest.param(STANDARD_PAIRS, "sigmoid", 0.1, 0.0, 1024, id="standard-sigmoid"),
        pytest.param(STANDARD_PAIRS, "ipo", 0.1, 0.0, 1024, id="standard-ipo"),
        pytest.param(STANDARD_PAIRS, "hinge", 0.5, 0.0, 1024, id="standard-hinge"),
        pytest.param(STANDARD_PAIRS, "robust", 0.1, 0.2, 1024, id="standard-robust"),
        # max_length 12 drops the four prompts of 12+ tokens and cuts every answer of the other four.
        pytest.param(STANDARD_PAIRS, "ipo", 0.1, 0.0, 12, id="standard-truncated-ipo"),
        pytest.param(CONVERSATIONAL_PAIRS, "sigmoid", 0.1, 0.0, 1024, id="conversational-sigmoid"),
        pytest.param(CONVERSATIONAL_PAIRS, "ipo", 0.1, 0.0, 1024, id="conversational-ipo"),
        pytest.param(EMPTY_PROMPT_PAIRS, "ipo", 0.1, 0.0, 1024, id="empty-prompt-ipo"),
    ],
)  # fmt: skip
def test_eval_metrics_match_trl(
    pairs, loss_type, beta, label_smoothing, max_length, tiny_model_dir, tiny_reference_dir, tmp_path
):
    """Loss, rewards, accuracies, margins and summed log-probs agree with TRL within 1e-4 for each loss, also
    when rows are dropped and answers truncated at max_length."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    settings = (loss_type, beta, label_smoothing, max_length)
    ours = dpokit_eval(tiny_model_dir, tiny_reference_dir, data, tmp_path / "metrics.json", *settings)
    theirs = trl_evaluate(tiny_model_dir, tiny_reference_dir, data, tmp_path, *settings)
    assert ours["num_pairs"] % BATCH_SIZE == 0  # TRL's mean of batch means is then the mean over pairs
    assert ours["num_pairs"] + ours["dropped_long_prompts"] == len(pairs)
    assert (ours["dropped_long_prompts"] > 0) == (max_length < 1024)
    assert 0 < theirs["rewards/accuracies"] < 1  # the two random models disagree on some pairs, not all
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-4), name
