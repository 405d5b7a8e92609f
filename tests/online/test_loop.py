"""The on-policy loop end to end on the tiny random model with a rule judge, and resume after a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpokit.errors import DpokitError
from dpokit.online import loop as online_loop
from dpokit.online.config import load_iterate_config

PROMPTS = [
    "The movie was",
    "What color is the sky?",
    "Hello there,",
    "Write a short review.",
    "I hated the film,",
]


def iterate_config(tmp_path: Path, model: Path, *overrides: str):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "eval.txt").write_text("The sky is\nA delightful comedy\n")
    return load_iterate_config(
        None,
        [
            f"prompts={tmp_path / 'prompts.txt'}",
            f"eval_prompts={tmp_path / 'eval.txt'}",
            "rounds=2",
            "samples_per_prompt=3",
            "max_new_tokens=6",
            "judge=length",
            "min_pairs=1",
            f"output_dir={tmp_path / 'run'}",
            f"train.model={model}",
            "train.learning_rate=1e-4",
            "train.effective_batch_size=2",
            "train.micro_batch_size=2",
            "train.max_steps=1",
            "train.warmup_ratio=0",  # one step that moves the weights (warmup would make its LR 0)
            "train.save_every=0",
            "train.report_to=[]",
            f"train.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )


def test_policy_and_reference_of_each_round(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("Review a film.\n")
    base = ["prompts=p.txt", "eval_prompts=p.txt", "train.model=start", f"output_dir={tmp_path}"]
    lora = online_loop.Loop(load_iterate_config(None, base), tmp_path, None, None, [], [])
    assert [lora.policy(n) for n in (0, 2)] == ["start", str(tmp_path / "round-2" / "policy")]
    assert [lora.reference(n) for n in (1, 3)] == ["start", "start"]
    full = load_iterate_config(None, [*base, "train.use_lora=false", "reference=previous"])
    previous = online_loop.Loop(full, tmp_path, None, None, [], [])
    assert previous.policy(1) == str(tmp_path / "round-1" / "train" / "final")
    assert [previous.reference(n) for n in (1, 3)] == ["start", str(tmp_path / "round-2" / "train" / "final")]
    with pytest.raises(DpokitError, match="field 'reference': 'previous' refreshes"):
        load_iterate_config(None, [*base, "reference=previous", "train.reference_model=other"])


@pytest.mark.slow
def test_two_rounds_end_to_end(tmp_path, tiny_model_dir) -> None:
    config = iterate_config(tmp_path, tiny_model_dir, "hard_negative_fraction=0.5")
    run_dir = online_loop.iterate(config)
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert (
        records[0]["kl"] == 0.0 and records[0]["win_rate_vs_reference"] == 0.5
    )  # the policy is the reference
    assert records[1]["kl"] != 0.0 and records[2]["kl"] != records[1]["kl"]  # each round moved the policy
    for record in records:
        assert set(record) >= {"reward_mean", "reward_std", "kl", "length_mean", "win_rate_vs_reference"}
    for n in (1, 2):
        directory = run_dir / f"round-{n}"
        samples = [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == len(PROMPTS) and all(len(s["scores"]) == 3 for s in samples)
        assert all(s["scores"] == [float(len(a)) for a in s["answers"]] for s in samples)  # the length judge
        report = json.loads((directory / "report.json").read_text())
        pairs = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
        assert report["pairs"] == len(pairs) == records[n]["pairs"]
        assert report["pairs"] + sum(report["dropped"].values()) == len(PROMPTS)
        assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
        mined = report["dropped"]["hard_negative_mining"]
        assert len(pairs) == math.ceil(0.5 * (len(pairs) + mined)) and all("margin" in p for p in pairs)
        assert (directory / "train" / "final" / "adapter_config.json").exists()
        assert (directory / "policy" / "model.safetensors").exists()
    # Round 2 trained from round 1's merged policy against the initial model.
    train_config = (run_dir / "round-2" / "train" / "config.yaml").read_text()
    assert f"model: {run_dir / 'round-1' / 'policy'}" in train_config
    assert f"reference_model: {tiny_model_dir}" in train_config


def test_too_few_pairs_stops_with_one_line(tmp_path, tiny_model_dir) -> None:
    config = iterate_config(tmp_path, tiny_model_dir, "min_pairs=50")
    with pytest.raises(DpokitError, match=r"round 1: \d pairs, fewer than min_pairs=50") as error:
        online_loop.iterate(config)
    assert "\n" not in str(error.value)
    assert (tmp_path / "run" / "round-1" / "report.json").exists()
    assert not (tmp_path / "run" / "round-1" / "pairs.jsonl").exists()


@pytest.mark.slow
def test_resume_after_a_crash_redoes_nothing_finished(tmp_path, tiny_model_dir, monkeypatch) -> None:
    config = iterate_config(tmp_path, tiny_model_dir)
    calls: dict[str, list[int]] = {}
    for name in ("generate_stage", "judge_stage", "pair_stage", "train_stage", "evaluate_stage"):
        real = getattr(online_loop, name)

        def counted(loop, n, real=real, name=name):
            calls.setdefault(name, []).append(n)
            return real(loop, n)

        monkeypatch.setattr(online_loop, name, counted)
    real_pair = online_loop.pair_stage

    def crash_in_round_1(loop, n):
        if n == 1:
            calls.setdefault("pair_stage", []).append(n)
            raise KeyboardInterrupt("killed after round 1's judging")
        return real_pair(loop, n)

    monkeypatch.setattr(online_loop, "pair_stage", crash_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        online_loop.iterate(config)
    assert calls == {"evaluate_stage": [0], "generate_stage": [1], "judge_stage": [1], "pair_stage": [1]}
    with pytest.raises(DpokitError, match="already holds a run"):
        online_loop.iterate(config)

    monkeypatch.setattr(online_loop, "pair_stage", real_pair)
    calls.clear()
    online_loop.iterate(config, resume=True)
    # Round 1's generation and judging and round 0's evaluation were finished: not run again.
    assert calls == {
        "pair_stage": [1, 2],
        "train_stage": [1, 2],
        "evaluate_stage": [1, 2],
        "generate_stage": [2],
        "judge_stage": [2],
    }
    calls.clear()
    online_loop.iterate(config, resume=True)  # everything finished: nothing runs
    assert calls == {}
    rounds = [
        json.loads(line)["round"] for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    ]
    assert rounds == [0, 1, 2]

    # The interrupted and resumed run equals an uninterrupted one: same samples, pairs and rounds.jsonl.
    whole = online_loop.iterate(config.model_copy(update={"output_dir": str(tmp_path / "whole")}))
    for name in (
        "rounds.jsonl",
        "round-1/samples.jsonl",
        "round-2/pairs.jsonl",
        "round-2/eval_samples.jsonl",
    ):
        assert (whole / name).read_text() == (tmp_path / "run" / name).read_text(), name
