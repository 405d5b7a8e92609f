"""The on-policy loop end to end on the tiny random model with a rule judge, and resume after a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dpokit.errors import DpokitError
from dpokit.logprobs import padded_pair_logps
from dpokit.models.loading import load_adapter, load_model, load_tokenizer
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
    """reference(n) None: round n's starting policy is its own reference (LoRA: with adapters disabled)."""
    (tmp_path / "p.txt").write_text("Review a film.\n")
    base = ["prompts=p.txt", "eval_prompts=p.txt", "train.model=start", f"output_dir={tmp_path}"]

    def loop(*overrides: str) -> online_loop.Loop:
        return online_loop.Loop(load_iterate_config(None, [*base, *overrides]), tmp_path, None, None, [], [])

    lora = loop()  # LoRA, reference: initial: each round trains the previous round's adapter on
    assert not lora.merges
    assert [lora.policy(n) for n in (0, 2)] == ["start", str(tmp_path / "round-2" / "train" / "final")]
    assert [lora.reference(n) for n in (1, 3)] == [None, None]
    assert loop("train.reference_model=other").reference(3) == "other"
    lora_previous = loop("reference=previous")  # the previous policy, merged, is the next reference
    assert lora_previous.merges and lora_previous.policy(2) == str(tmp_path / "round-2" / "policy")
    assert [lora_previous.reference(n) for n in (1, 3)] == [None, None]
    full = loop("train.use_lora=false")
    assert full.policy(1) == str(tmp_path / "round-1" / "train" / "final")
    assert [full.reference(n) for n in (1, 3)] == [None, "start"]  # from round 2: a frozen copy of the start
    full_previous = loop("train.use_lora=false", "reference=previous")
    assert not full_previous.merges and [full_previous.reference(n) for n in (1, 3)] == [None, None]
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
        if n == 1:  # the starting policy is its own reference: no margin ranks the pairs, all are kept
            assert mined == 0 and "mining_skipped" in report and not any("margin" in p for p in pairs)
        else:
            assert len(pairs) == math.ceil(0.5 * (len(pairs) + mined)) and all("margin" in p for p in pairs)
        assert (directory / "train" / "final" / "adapter_config.json").exists()


def train_records(run_dir: Path, n: int) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / f"round-{n}" / "train" / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_lora_rounds_train_one_adapter_on_against_the_initial_base(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    """LoRA, reference: initial: no merged model; round 2 starts from round 1's adapter (its first step already
    has a policy/reference log-ratio), and its reference log-probs are the starting model's own."""
    from dpokit.train import reference_pass

    used = []  # (pairs, reference log-probs) of every reference pass

    def recorded(model, pairs, *args, **kwargs):
        logps, hit = real(model, pairs, *args, **kwargs)
        used.append((pairs, logps))
        return logps, hit

    real = reference_pass.cached_reference_logps
    monkeypatch.setattr(reference_pass, "cached_reference_logps", recorded)
    run_dir = online_loop.iterate(iterate_config(tmp_path, tiny_model_dir))
    assert not any((run_dir / f"round-{n}" / "policy").exists() for n in (1, 2))
    train_config = yaml.safe_load((run_dir / "round-2" / "train" / "config.yaml").read_text())
    assert train_config["model"] == str(run_dir / "round-1" / "train" / "final")
    assert train_config["reference_model"] is None  # the adapter's base with adapters disabled
    adapter = json.loads((run_dir / "round-2" / "train" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)

    # Step 1 of round 1 is fresh adapters (policy = reference); step 1 of round 2 is round 1's adapter.
    first_1, first_2 = train_records(run_dir, 1)[0], train_records(run_dir, 2)[0]
    assert first_1["kl"] == 0.0 and first_1["rewards/margins"] == 0.0
    assert abs(first_2["kl"]) > 1e-4 and first_2["rewards/margins"] != 0.0

    assert len(used) == 2  # one reference pass per round (train pairs only: no held-out pairs)
    pairs, reference = used[1]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        base = padded_pair_logps(load_model(str(tiny_model_dir)), pairs, tokenizer.pad_token_id)
        adapted = padded_pair_logps(
            load_adapter(str(run_dir / "round-1" / "train" / "final"), load_model(str(tiny_model_dir))),
            pairs,
            tokenizer.pad_token_id,
        )
    assert (adapted.chosen - base.chosen).abs().max() > 1e-3  # round 1's adapter is not the base...
    torch.testing.assert_close(reference.chosen, base.chosen, atol=1e-4, rtol=0)  # ...and not the reference
    torch.testing.assert_close(reference.rejected, base.rejected, atol=1e-4, rtol=0)
    # Held-out KL is to the starting model too (the policy's base with adapters disabled): it moved.
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert records[2]["kl"] != 0.0


@pytest.mark.slow
def test_lora_with_reference_previous_merges_each_round(tmp_path, tiny_model_dir) -> None:
    """reference: previous with LoRA: round 1's adapter merged into round-1/policy, which round 2 trains fresh
    adapters on and (adapters disabled) uses as its reference: no separate reference copy."""
    run_dir = online_loop.iterate(iterate_config(tmp_path, tiny_model_dir, "reference=previous", "rounds=2"))
    assert all((run_dir / f"round-{n}" / "policy" / "model.safetensors").exists() for n in (1, 2))
    train_config = yaml.safe_load((run_dir / "round-2" / "train" / "config.yaml").read_text())
    assert train_config["model"] == str(run_dir / "round-1" / "policy")
    assert train_config["reference_model"] is None
    # Fresh adapters on the previous policy, which is the reference: step 1 has no log-ratio.
    first = train_records(run_dir, 2)[0]
    assert first["kl"] == 0.0 and first["rewards/margins"] == 0.0


def test_too_few_pairs_stops_with_one_line(tmp_path, tiny_model_dir) -> None:
    """The round stops before training; accepting fewer pairs (min_pairs may change on a resume, as rounds
    may) continues it with the pairs it had, nothing judged again."""
    config = iterate_config(tmp_path, tiny_model_dir, "min_pairs=50")
    with pytest.raises(DpokitError, match=r"round 1: \d pairs, fewer than min_pairs=50") as error:
        online_loop.iterate(config)
    assert "\n" not in str(error.value)
    assert (tmp_path / "run" / "round-1" / "report.json").exists()
    assert not (tmp_path / "run" / "round-1" / "pairs.jsonl").exists()
    report = json.loads((tmp_path / "run" / "round-1" / "report.json").read_text())
    assert 0 < report["pairs"] < 50 and str(error.value).endswith(f"--resume min_pairs={report['pairs']}")
    samples = (tmp_path / "run" / "round-1" / "samples.jsonl").read_text()

    online_loop.iterate(config.model_copy(update={"min_pairs": report["pairs"], "rounds": 1}), resume=True)
    assert (tmp_path / "run" / "round-1" / "samples.jsonl").read_text() == samples
    pairs = online_loop.read_jsonl(tmp_path / "run" / "round-1" / "pairs.jsonl")
    rounds = online_loop.read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert len(pairs) == report["pairs"] == rounds[1]["pairs"] and [r["round"] for r in rounds] == [0, 1]


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


def test_resume_before_pairing_judges_the_failed_prompts_again(tmp_path) -> None:
    """A judge server that was down scored prompt B's answers None and the round stopped for too few pairs.
    On --resume, judging runs again for B alone (its 3 answers, not A's 2), A's scores are kept."""
    directory = tmp_path / "round-1"
    directory.mkdir()
    online_loop.write_jsonl(
        directory / "generations.jsonl",
        [{"prompt": "A", "answers": ["a", "aaa"]}, {"prompt": "B", "answers": ["b", "bb", "bbbb"]}],
    )
    asked = []

    class Judge:
        def __init__(self, down: set[str]) -> None:
            self.down = down

        def score(self, prompts, answers):
            asked.append(list(answers))
            return [None if p in self.down else float(len(a)) for p, a in zip(prompts, answers)]

    (tmp_path / "p.txt").write_text("A\nB\n")
    config = load_iterate_config(None, ["prompts=p.txt", "eval_prompts=p.txt", "train.model=start"])
    loop = online_loop.Loop(config, tmp_path, None, Judge({"B"}), [], [])
    assert online_loop.unjudged(directory)  # never judged
    online_loop.judge_stage(loop, 1)
    scores = [r["scores"] for r in online_loop.read_jsonl(directory / "samples.jsonl")]
    assert scores == [[1.0, 3.0], [None, None, None]] and asked == [["a", "aaa", "b", "bb", "bbbb"]]
    assert online_loop.unjudged(directory)  # failures and no pairs yet: a resume asks again

    loop.judge = Judge(set())  # the server is back
    online_loop.judge_stage(loop, 1)
    scores = [r["scores"] for r in online_loop.read_jsonl(directory / "samples.jsonl")]
    assert scores == [[1.0, 3.0], [1.0, 2.0, 4.0]] and asked[1] == ["b", "bb", "bbbb"]
    assert not online_loop.unjudged(directory)

    # Failures left once the round is paired are final: its pairs were made from them.
    online_loop.write_jsonl(
        directory / "samples.jsonl", [{"prompt": "A", "answers": ["a"], "scores": [None]}]
    )
    online_loop.write_jsonl(directory / "pairs.jsonl", [])
    assert not online_loop.unjudged(directory)
