"""The public API (`import dpokit`): training from data held in memory equals training from a file, results
come back as objects, quiet means silent, and bad rows are named by their index."""

from __future__ import annotations

import doctest
import json

import datasets
import pandas as pd
import pytest

import dpokit
from test_eval_trl_parity import trl_evaluate
from tiny_models import STANDARD_ROWS, write_jsonl
from train.test_invariants import losses_by_step, make_config

ROWS = STANDARD_ROWS[:8]


def test_public_names_are_exported():
    """Each name in `__all__` resolves; `dpokit.train` and `dpokit.evaluate` stay the functions after the
    modules of the same names (the loop, the metrics engine) are imported."""
    import dpokit.evaluate  # noqa: F401
    import dpokit.train.loop  # noqa: F401

    for name in dpokit.__all__:
        assert getattr(dpokit, name) is not None
    assert dpokit.train is dpokit.api.train and dpokit.evaluate is dpokit.api.evaluate
    assert dpokit.LOSSES["ipo"] is dpokit.ipo


@pytest.mark.parametrize(
    "as_data",
    [
        pytest.param(datasets.Dataset.from_list, id="dataset"),
        pytest.param(list, id="list"),
        pytest.param(pd.DataFrame, id="dataframe"),
    ],
)
def test_in_memory_data_trains_as_a_jsonl_file(as_data, tiny_model_dir, tmp_path):
    """A Dataset, a list of dicts and a DataFrame give the losses of the same rows read from JSONL."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    from_file = dpokit.train(make_config(tmp_path / "file", tiny_model_dir, path), quiet=True)
    config = make_config(tmp_path / "memory", tiny_model_dir, path)
    in_memory = dpokit.train(config, train_data=as_data(ROWS), quiet=True)
    assert losses_by_step(in_memory.run_dir) == losses_by_step(from_file.run_dir)
    assert in_memory.train_metrics == {
        **from_file.train_metrics,
        "pairs_per_s": in_memory.train_metrics["pairs_per_s"],
    }


def test_train_returns_metrics_model_and_findings(tiny_model_dir, tmp_path):
    """The result holds the last train and eval records of metrics.jsonl, the final model and the findings."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    config = make_config(tmp_path, tiny_model_dir, path)
    result = dpokit.train(config, eval_data=ROWS[:4], quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.train_metrics == [r for r in records if r["split"] == "train"][-1]
    assert result.eval_metrics == [r for r in records if r["split"] == "eval"][-1]
    assert result.eval_metrics["step"] == result.train_metrics["step"] == 2
    assert (result.model_dir / "model.safetensors").exists()
    assert all(isinstance(f, dpokit.Finding) for f in result.findings)
    assert [f.code for f in result.findings] == [f.code for f in dpokit.doctor(result.run_dir)]


def test_quiet_prints_nothing(tiny_model_dir, tmp_path, capfd):
    """quiet=True: no progress bar, no rich output, no warning, on stdout or stderr (train, evaluate, audit)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    config = make_config(tmp_path, tiny_model_dir, path, eval_data=str(path))
    capfd.readouterr()
    dpokit.train(config, quiet=True)
    dpokit.evaluate(config.output_dir + "/final", ROWS, reference=tiny_model_dir, quiet=True)
    dpokit.audit(ROWS, model=str(tiny_model_dir), quiet=True)  # loads the model, runs a reference pass
    assert capfd.readouterr() == ("", "")


def test_bad_row_is_named_by_index_and_field(tiny_model_dir, tmp_path):
    rows = [*ROWS[:3], {"prompt": "Hi", "chosen": None, "rejected": " no"}]
    config = make_config(tmp_path, tiny_model_dir, "unused.jsonl")
    with pytest.raises(dpokit.DpokitError, match=r"^train_data row 3: field 'chosen' is null$"):
        dpokit.train(config, train_data=rows, quiet=True)
    with pytest.raises(dpokit.DpokitError, match=r"^eval_data row 0: field 'rejected' is missing$"):
        dpokit.train(config, train_data=ROWS, eval_data=[{"chosen": "a"}], quiet=True)
    with pytest.raises(dpokit.DpokitError, match=r"^train_data row 1: field 'prompt' must be a string"):
        dpokit.train(config, train_data=pd.DataFrame([ROWS[0], {**ROWS[1], "prompt": 3}]), quiet=True)
    conversational = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
    }
    conversational["rejected"] = [{"role": "assistant", "content": "b"}]
    with pytest.raises(
        dpokit.DpokitError, match=r"^train_data row 1: field 'chosen' is conversational but row 0 is"
    ):
        dpokit.train(config, train_data=[ROWS[0], conversational], quiet=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)),
            r"^train_data: got a mapping \(keys train\), not rows; pass one split of a DatasetDict",
            id="dataset-dict",
        ),
        pytest.param(
            {"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]},
            r"^train_data: got a mapping \(keys prompt, chosen, rejected\), not rows",
            id="columns",
        ),
        pytest.param(3, r"^train_data: expected a path, .* got int$", id="number"),
    ],
)
def test_data_that_is_not_rows_is_named(data, message, tiny_model_dir, tmp_path):
    """A DatasetDict or a dict of columns would iterate as its keys (`row 0: ... got str`): named instead."""
    config = make_config(tmp_path, tiny_model_dir, "unused.jsonl")
    with pytest.raises(dpokit.DpokitError, match=message):
        dpokit.train(config, train_data=data, quiet=True)
    with pytest.raises(dpokit.DpokitError, match=r"^config: expected a dpokit.RunConfig, got dict"):
        dpokit.train({"model": str(tiny_model_dir)}, train_data=ROWS, quiet=True)


@pytest.mark.parametrize(
    "as_data",
    [
        pytest.param(lambda path: path, id="path"),
        pytest.param(lambda path: datasets.Dataset.from_list(ROWS), id="dataset"),
        pytest.param(lambda path: pd.DataFrame(ROWS), id="dataframe"),
    ],
)
def test_load_pairs_takes_what_train_takes(as_data, tiny_tokenizer, tmp_path):
    """`dpokit.load_pairs` on a Path, a Dataset or a DataFrame: the token ids and the report of the same rows
    read from a str path (at max_length 12 some rows are truncated and some prompts dropped)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    expected, expected_report = dpokit.load_pairs(str(path), tiny_tokenizer, 12)
    pairs, report = dpokit.load_pairs(as_data(path), tiny_tokenizer, 12)
    ids = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert ids == [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected]
    counts = (report.rows, report.dropped_long_prompts, report.truncated)
    assert counts == (expected_report.rows, expected_report.dropped_long_prompts, expected_report.truncated)
    assert report.dropped_long_prompts > 0 and report.truncated > 0


def test_evaluate_equals_trl(tiny_model_dir, tiny_reference_dir, tmp_path):
    """`dpokit.evaluate` on rows in memory gives TRL's `evaluate()` metrics within 1e-4."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    ours = dpokit.evaluate(
        tiny_model_dir, datasets.Dataset.from_list(ROWS), reference=tiny_reference_dir, batch_size=4
    )
    theirs = trl_evaluate(tiny_model_dir, tiny_reference_dir, path, tmp_path, "sigmoid", 0.1, 0.0, 1024)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name


def test_audit_returns_findings(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*ROWS, ROWS[0]])
    findings = dpokit.audit(path)
    assert findings and all(isinstance(f, dpokit.Finding) for f in findings)
    in_memory = dpokit.audit(pd.DataFrame([*ROWS, ROWS[0]]))
    assert [f.code for f in in_memory] == [f.code for f in findings]  # evidence counts rows from 0 there


def test_docstring_examples_run():
    """The runnable examples of the RunConfig and loss docstrings give the values they show."""
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner()
    for obj in (dpokit.RunConfig, dpokit.losses):
        (test,) = finder.find(obj)
        assert test.examples
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
