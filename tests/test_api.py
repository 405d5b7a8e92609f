"""The public API (`import dpokit`): training from data held in memory equals training from a file, results
come back as objects, quiet means silent, and bad rows are named by their index."""

from __future__ import annotations

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
    """quiet=True: no progress bar, no rich output, no warning, on stdout or stderr."""
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    config = make_config(tmp_path, tiny_model_dir, path, eval_data=str(path))
    capfd.readouterr()
    dpokit.train(config, quiet=True)
    dpokit.evaluate(config.output_dir + "/final", ROWS, reference=tiny_model_dir, quiet=True)
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
