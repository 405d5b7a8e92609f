"""What a run leaves behind: held-out split and periodic evaluation, samples, TensorBoard events, summary."""

from __future__ import annotations

import json

import yaml

from dpokit.config import RunConfig
from dpokit.train.loop import train


def test_a_run_writes_everything_it_promises(tiny_model_dir, standard_file, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write a short review.\nWhat color is the sky?\n")
    config = RunConfig(
        model=str(tiny_model_dir), train_data=str(standard_file), eval_data=None, eval_split=0.25,
        use_lora=True, lora_r=4, learning_rate=1e-2, allow_risky_hyperparameters=True, effective_batch_size=4,
        micro_batch_size=2, num_epochs=1, eval_every=1, sample_every=2, sample_prompts=str(prompts),
        sample_max_new_tokens=6, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
        report_to=["tensorboard"], save_every=0,
    )  # fmt: skip
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    eval_steps = [r["step"] for r in records if r["split"] == "eval"]
    # 16 pairs, 4 held out -> 12 train pairs, 4 per step -> 3 steps; evaluation before, after each step.
    assert train_steps == [1, 2, 3]
    assert eval_steps == [0, 1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
        "lengths/chosen",
        "lengths/rejected",
        "lr",
        "grad_norm",
    ):
        assert key in records[1], key
    assert records[0]["loss"] == records[0]["loss"] and abs(records[0]["rewards/margins"]) < 1e-6
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["source"]) for s in samples] == [
        (0, "reference"),
        (0, "reference"),
        (2, "policy"),
        (2, "policy"),
        (3, "policy"),
        (3, "policy"),
    ]
    assert all(-1 <= s["judge"] <= 1 and s["ref_ppl"] > 0 for s in samples)
    assert list((run_dir).glob("**/events.out.tfevents.*")), "TensorBoard events written"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["beta"] == 0.1 and resolved["reference_mode"] == "precompute"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_before"]["step"] == 0 and summary["eval_after"]["step"] == 3
