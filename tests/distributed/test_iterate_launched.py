"""`dpokit iterate` under torchrun and accelerate launch: 2 gloo processes on CPU against 1 process.

Two rounds on the tiny random Llama with the length judge, sampled answers (temperature 1), 5 training
prompts in batches of 2 (3 batches: rank 0 draws two, rank 1 one) and hard-negative mining: the same
answers, scores and pairs as 1 process, and the same rounds.jsonl within float tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launching import TIMEOUT, environment, kill_once_written

from dpokit.distributed import preset_path
from dpokit.errors import DpokitError
from dpokit.online.ranks import Ranks, deal, merge

PROMPTS = ["The movie was", "What color is the sky?", "Hello there,", "Write a short review.", "I hated it,"]
FILES = ("generations.jsonl", "samples.jsonl", "pairs.jsonl", "eval_samples.jsonl")


def test_deal_then_merge_is_the_one_process_order() -> None:
    """Every rank takes every size-th item from its rank; merging the shares restores item order."""
    assert [deal(5, rank, 2) for rank in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert [deal(2, rank, 3) for rank in (0, 1, 2)] == [[0], [1], []]
    items = list("abcde")
    shares = [{i: items[i].upper() for i in deal(5, rank, 3)} for rank in (2, 0, 1)]  # any arrival order
    assert merge(shares, 5) == list("ABCDE")


def test_one_process_runs_everything_itself() -> None:
    ranks = Ranks()
    assert ranks.main and ranks.gather(range(4), lambda i: i * i) == [0, 1, 4, 9]
    assert ranks.on_main(lambda: "done") == "done"

    def bad() -> None:
        raise DpokitError("prompts.txt: no prompts")

    with pytest.raises(DpokitError, match="prompts.txt: no prompts"):
        ranks.on_main(bad)


def write_config(directory: Path, model: Path, *, min_pairs: int = 1, reference: str = "initial") -> Path:
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (directory / "eval.txt").write_text("The sky is\nA delightful comedy\nMy dinner was\n")
    config = {
        "rounds": 2,
        "prompts": str(directory / "prompts.txt"),
        "eval_prompts": str(directory / "eval.txt"),
        "samples_per_prompt": 3,
        "max_new_tokens": 6,
        "generation_batch_size": 2,
        "judge": "length",
        "min_pairs": min_pairs,
        "hard_negative_fraction": 0.5,
        "reference": reference,
        "output_dir": str(directory / "run"),
        "train": {
            "model": str(model),
            "learning_rate": 1e-4,
            "effective_batch_size": 2,  # one pair per process and step
            "micro_batch_size": 1,
            "max_steps": 1,
            "warmup_ratio": 0,
            "save_every": 0,
            "report_to": [],
            "cache_dir": str(directory / "cache"),
        },
    }
    path = directory / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(config: Path, engine: str, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [*launcher, "-m", "dpokit.cli", "iterate", str(config), "--distributed", engine, *extra]


def run(command: list[str], expect: int = 0) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment())
    assert (result.returncode == 0) == (expect == 0), f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return result.stderr


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rounds(got: Path, expected: Path) -> None:
    """Exactly the same answers, scores and pairs in every round; the same rounds.jsonl, floats within
    tolerance (the trained weights differ by float rounding between 1 and 2 processes)."""
    for n in (0, 1, 2):
        for name in FILES if n else ("eval_samples.jsonl",):
            have, want = read(got / f"round-{n}" / name), read(expected / f"round-{n}" / name)
            assert len(have) == len(want), (n, name)
            for a, b in zip(have, want):
                assert a.pop("margin", 0) == pytest.approx(b.pop("margin", 0), rel=1e-4, abs=1e-6)
                assert a == b, (n, name)
    have, want = read(got / "rounds.jsonl"), read(expected / "rounds.jsonl")
    assert [r["round"] for r in have] == [0, 1, 2]
    assert len(want) == 3 and want[2]["kl"] != 0.0  # the policy moved
    for a, b in zip(have, want):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                # kl is a difference of float32 log-prob sums of magnitude ~40, whose last bit is ~4e-6: the
                # weights' rounding differences between 1 and 2 processes can show there as one ulp.
                tolerance = 3e-5 if key == "kl" else 1e-6
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=tolerance), (a["round"], key)
            else:
                assert a[key] == b[key], (a["round"], key)


def one_process_run(directory: Path, model: Path, reference: str = "initial") -> Path:
    run(
        [
            sys.executable,
            "-m",
            "dpokit.cli",
            "iterate",
            str(write_config(directory, model, reference=reference)),
        ]
    )
    return directory / "run"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir) -> Path:
    return one_process_run(tmp_path_factory.mktemp("iterate-one-process"), tiny_model_dir)


@pytest.mark.slow
def test_ddp_under_torchrun_with_merged_references_equals_one_process(tiny_model_dir, tmp_path) -> None:
    """Each process generates its batches (own seeds, so sampled answers match too); rank 0 judges, pairs,
    merges each round's adapter into round-N/policy (reference: previous) and writes; both train each
    round's pairs with DDP."""
    for name in ("one", "ddp"):
        (tmp_path / name).mkdir()
    expected = one_process_run(tmp_path / "one", tiny_model_dir, reference="previous")
    run(torchrun(write_config(tmp_path / "ddp", tiny_model_dir, reference="previous"), "ddp"))
    assert (tmp_path / "ddp" / "run" / "round-2" / "policy" / "model.safetensors").exists()
    assert_same_rounds(tmp_path / "ddp" / "run", expected)


@pytest.mark.slow
def test_fsdp2_killed_in_round_2_then_resumed_under_torchrun_equals_one_process(
    one_process, tiny_model_dir, tmp_path
) -> None:
    """SIGKILL to torchrun and both processes once round 2's answers are written; --resume with 2 processes
    finishes the run, training each round sharded (generation uses a whole copy of the policy per process)."""
    command = torchrun(write_config(tmp_path, tiny_model_dir), "fsdp2")
    out = tmp_path / "run"
    kill_once_written(command, out / "round-2" / "generations.jsonl", "round 2's generation")
    assert len(read(out / "rounds.jsonl")) == 2, "the kill landed after round 2's evaluation"
    run([*command, "--resume"])
    assert_same_rounds(out, one_process)


@pytest.mark.slow
def test_too_few_pairs_stops_every_process_under_accelerate_launch(tiny_model_dir, tmp_path) -> None:
    """Rank 0 finds too few pairs; every process stops with its one-line error instead of waiting for it."""
    config = write_config(tmp_path, tiny_model_dir, min_pairs=50)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_path("ddp"))]
    stderr = run([*launcher, "--num_processes", "2", "-m", "dpokit.cli", "iterate", str(config)], expect=1)
    lines = [line for line in stderr.splitlines() if "fewer than min_pairs=50" in line]
    assert len(lines) == 2 and all(line.startswith("error: round 1: ") for line in lines), stderr[-4000:]
    assert (tmp_path / "run" / "round-1" / "report.json").exists()
    assert not (tmp_path / "run" / "round-1" / "pairs.jsonl").exists()


@pytest.mark.slow
def test_a_missing_prompt_file_stops_every_process_under_torchrun(tiny_model_dir, tmp_path) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    (tmp_path / "eval.txt").unlink()
    stderr = run(torchrun(config, "ddp"), expect=1)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {tmp_path / 'eval.txt'}: no such prompts file"] * 2, stderr[-4000:]
