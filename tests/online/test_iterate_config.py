"""IterateConfig: the train section is a RunConfig, overrides reach it, errors name the field."""

from __future__ import annotations

import json

import pytest

from dpokit.errors import DpokitError
from dpokit.online.config import load_iterate_config
from dpokit.online.prompts import read_prompts


def write(tmp_path, text: str):
    path = tmp_path / "iterate.yaml"
    path.write_text(text)
    return path


def test_loads_with_nested_train_and_dotted_overrides(tmp_path) -> None:
    path = write(tmp_path, "prompts: p.txt\neval_prompts: e.txt\ntrain:\n  beta: 0.2\n")
    config = load_iterate_config(path, ["rounds=2", "train.learning_rate=5e-5", "pairing=best_vs_second"])
    assert config.rounds == 2 and config.pairing == "best_vs_second"
    assert config.train.beta == 0.2 and config.train.learning_rate == 5e-5
    assert config.train.eval_data is None and config.train.sample_prompts is None  # iterate's defaults


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("eval_prompts: e.txt\n", [], "field 'prompts': required"),
        ("prompts: p\neval_prompts: e\n", ["samples_per_prompt=1"], "field 'samples_per_prompt'"),
        ("prompts: p\neval_prompts: e\n", ["hard_negative_fraction=0"], "field 'hard_negative_fraction'"),
        ("prompts: p\neval_prompts: e\n", ["pairing=best"], "field 'pairing'"),
        ("prompts: p\neval_prompts: e\n", ["bogus=1"], "field 'bogus': unknown field"),
        ("prompts: p\neval_prompts: e\n", ["train.bogus=1"], "field 'train.bogus': unknown field"),
        ("prompts: p\neval_prompts: e\n", ["train.loss_type=nope"], "field 'train.loss_type': unknown loss"),
        ("prompts: p\neval_prompts: e\ntrain: 3\n", [], "field 'train': expected a mapping"),
    ],
)
def test_errors_are_one_line_and_name_the_field(tmp_path, text, overrides, message) -> None:
    with pytest.raises(DpokitError, match=message.replace("(", r"\(")) as error:
        load_iterate_config(write(tmp_path, text), overrides)
    assert "\n" not in str(error.value)


def test_prompts_from_text_and_rows(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("Review a film.\n\nReview a book.\nReview a film.\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["Review a film.", "Review a book."]
    chat = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": "a"}, {"prompt": chat}, {"prompt": "a", "chosen": "x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a", chat]
    assert len(read_prompts("builtin:sentiment")) > 50  # the prompts of the shipped pairs


def test_bad_prompt_files_name_the_line(tmp_path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DpokitError, match=r"p.jsonl:2: expected a row with a 'prompt' field"):
        read_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "q.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(DpokitError, match=r"q.jsonl:1: field 'prompt' must be a string"):
        read_prompts(str(tmp_path / "q.jsonl"))
    for empty in ('""', '"  "', "[]"):  # silently dropped before: a row the user wrote, lost unseen
        (tmp_path / "e.jsonl").write_text(f'{{"prompt": "a"}}\n{{"prompt": {empty}}}\n')
        with pytest.raises(DpokitError, match=r"e.jsonl:2: field 'prompt' is empty$"):
            read_prompts(str(tmp_path / "e.jsonl"))
    with pytest.raises(DpokitError, match="no such prompts file"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_resume_refuses_a_changed_config_naming_the_fields(tmp_path) -> None:
    """A resumed iterate run with other settings than it started with stops at once, naming them (dotted for
    the train section); more rounds and another min_pairs are allowed."""
    import yaml

    from dpokit.online.loop import iterate

    path = write(tmp_path, f"prompts: p.txt\neval_prompts: e.txt\noutput_dir: {tmp_path / 'run'}\n")
    started = load_iterate_config(path, ["rounds=1"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(started.model_dump(), sort_keys=False))
    changed = load_iterate_config(path, ["rounds=3", "train.beta=0.2", "min_score_gap=0.5"])
    with pytest.raises(
        DpokitError, match=r"cannot resume, train\.beta, min_score_gap changed since the run"
    ) as error:
        iterate(changed, resume=True)
    assert "\n" not in str(error.value)
    with pytest.raises(
        DpokitError, match="p.txt"
    ):  # same settings, more rounds: past the check, to the prompts
        iterate(load_iterate_config(path, ["rounds=3", "min_pairs=2"]), resume=True)
