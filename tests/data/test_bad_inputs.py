"""Bad inputs fail cleanly through the real command line: `dpokit train` and `dpokit eval`.

Every case must end with exit code 2 and exactly one stderr line, "error: ...", naming the file, the line
and the field where they apply; no traceback; and nothing written: no metrics file for `eval --json OUT`,
no `final/` model for `train`. The expected messages are written out in full.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from typer.testing import CliRunner

from dpokit.cli import app

GOOD = '{"prompt": "a", "chosen": "b", "rejected": "c"}'  # 47 characters
USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
CONVERSATIONAL = {
    "prompt": [USER],
    "chosen": [ASSISTANT],
    "rejected": [{"role": "assistant", "content": "Go."}],
}
ONE_OF = "expected an object with 'chosen' and 'rejected' (and usually 'prompt')"


def lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def saved_dataset_dict_without_train(path: Path) -> None:
    DatasetDict({"test": Dataset.from_list([json.loads(GOOD)])}).save_to_disk(str(path))


def dataset_info_only(path: Path) -> None:
    path.mkdir()
    (path / "dataset_info.json").write_text("{}")


@dataclass
class Bad:
    """A bad dataset: its file name, its content (text, bytes, or a function that makes it), the message."""

    id: str
    name: str
    content: str | bytes | Callable[[Path], None] | None  # None: the path does not exist
    message: str  # "{path}" stands for the dataset's path
    prefix: bool = False  # the message ends with a dependency's own words: compare up to them

    def make(self, directory: Path) -> Path:
        path = directory / self.name
        if isinstance(self.content, str):
            path.write_text(self.content, encoding="utf-8")
        elif isinstance(self.content, bytes):
            path.write_bytes(self.content)
        elif self.content is not None:
            self.content(path)
        return path


BAD_DATA = [
    Bad("invalid-json", "pairs.jsonl", lines(GOOD, "{oops"),
        "{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
    Bad("missing-field", "pairs.jsonl", lines(GOOD, {"prompt": "a", "chosen": "b"}),
        "{path}:2: field 'rejected' is missing"),
    Bad("null-field", "pairs.jsonl", lines({"prompt": "a", "chosen": None, "rejected": "c"}),
        "{path}:1: field 'chosen' is null"),
    Bad("wrong-type", "pairs.jsonl", lines(GOOD, GOOD, {"prompt": "a", "chosen": "b", "rejected": 3}),
        "{path}:3: field 'rejected' must be a string or a list of {{role, content}} messages, got int"),
    Bad("list-not-row", "pairs.jsonl", lines(GOOD, "[1, 2]"), f"{{path}}:2: {ONE_OF}, got list"),
    Bad("number-not-row", "pairs.jsonl", lines("7"), f"{{path}}:1: {ONE_OF}, got int"),
    Bad("unknown-role", "pairs.jsonl", lines({**CONVERSATIONAL, "chosen": [{"role": "robot", "content": "x"}]}),
        "{path}:1: field 'chosen' message 1 has unknown role 'robot' "
        "(expected one of system, user, assistant, tool, developer)"),
    Bad("message-without-content", "pairs.jsonl", lines({**CONVERSATIONAL, "rejected": [{"role": "assistant"}]}),
        "{path}:1: field 'rejected' message 1 must be an object with 'role' and 'content'"),
    Bad("null-content", "pairs.jsonl", lines({**CONVERSATIONAL, "prompt": [{"role": "user", "content": None}]}),
        "{path}:1: field 'prompt' message 1 content must be a string"),
    Bad("standard-then-conversational", "pairs.jsonl", lines(GOOD, CONVERSATIONAL),
        "{path}:2: field 'chosen' is conversational but line 1 is standard; a dataset must use one format"),
    Bad("prompt-string-chosen-messages", "pairs.jsonl", lines({**CONVERSATIONAL, "prompt": "Hi"}),
        "{path}:1: field 'prompt' is a string but 'chosen' is a message list"),
    Bad("chosen-string-rejected-messages", "pairs.jsonl", lines({**CONVERSATIONAL, "chosen": "Hello!"}),
        "{path}:1: field 'rejected' mixes a string and a message list with 'chosen'"),
    Bad("no-answer-messages", "pairs.jsonl", lines({**CONVERSATIONAL, "chosen": []}),
        "{path}:1: field 'chosen' has no messages after the prompt"),
    Bad("not-utf8", "pairs.jsonl", (GOOD + '\n{"prompt": "caf\xe9"}\n').encode("latin-1"),
        "{path}:2: bytes that are not valid UTF-8 (at byte 63)"),
    Bad("empty-file", "pairs.jsonl", "", "{path}: the dataset is empty (no rows)"),
    Bad("blank-lines-only", "pairs.jsonl", "\n  \n\n", "{path}: the dataset is empty (no rows)"),
    Bad("only-identical-pairs", "pairs.jsonl", lines({"prompt": "a", "chosen": "b", "rejected": "b"}),
        "{path}: no usable pairs left after skipping identical pairs and over-long prompts"),
    Bad("missing-path", "nowhere.jsonl", None, "{path}: no such file or directory"),
    Bad("unknown-extension", "pairs.txt", GOOD, "{path}: unknown file type '.txt' (use .jsonl, .json, .parquet or .csv)"),
    Bad("json-array-with-non-object", "pairs.json", f"[{GOOD}, 5]", f"{{path}}:2: {ONE_OF}, got int"),
    Bad("json-object-not-array", "pairs.json", GOOD, "{path}: expected a JSON array of rows, got dict"),
    Bad("json-invalid", "pairs.json", f"[{GOOD},\n {{oops}}]",
        "{path}:2: invalid JSON (Expecting property name enclosed in double quotes)"),
    Bad("csv-missing-column", "pairs.csv", "prompt,chosen\na,b\n", "{path}:2: field 'rejected' is missing"),
    Bad("csv-short-row", "pairs.csv", "prompt,chosen,rejected\na,b,c\nd,e\n", "{path}:3: field 'rejected' is null"),
    Bad("parquet-corrupt", "pairs.parquet", b"not parquet", "{path}: not a readable Parquet file (", prefix=True),
    Bad("directory-not-dataset", "folder", lambda p: p.mkdir(),
        "{path}: a directory that is not a dataset saved with `save_to_disk`"),
    Bad("directory-half-dataset", "folder", dataset_info_only,
        "{path}: not a readable dataset saved with `save_to_disk` (", prefix=True),
    Bad("dataset-dict-without-train", "saved", saved_dataset_dict_without_train,
        "{path}: a DatasetDict without a 'train' split (has test)"),
    Bad("role-that-looks-like-markup", "pairs.jsonl",
        lines({**CONVERSATIONAL, "prompt": [{"role": "[/INST]", "content": "Hi"}]}),
        "{path}:1: field 'prompt' message 1 has unknown role '[/INST]' "
        "(expected one of system, user, assistant, tool, developer)"),
]  # fmt: skip


def cases(table):
    return [pytest.param(case, id=case.id) for case in table]


def assert_clean_failure(result, expected: str, prefix: bool = False) -> None:
    """Exit 2, one 'error:' line on stderr equal to `expected`, nothing on stdout, no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stdout == ""
    stderr_lines = result.stderr.splitlines()
    assert len(stderr_lines) == 1, result.stderr
    if prefix:
        assert stderr_lines[0].startswith(f"error: {expected}")
    else:
        assert stderr_lines[0] == f"error: {expected}"


@pytest.fixture
def run_eval(tiny_model_dir, tiny_reference_dir, tmp_path):
    """`dpokit eval` on `data` with the tiny models; returns (result, the --json path)."""

    def run(data: Path, *options: str):
        out = tmp_path / "metrics.json"
        arguments = [
            "--policy",
            str(tiny_model_dir),
            "--reference",
            str(tiny_reference_dir),
            "--data",
            str(data),
        ]
        return CliRunner().invoke(app, ["eval", *arguments, "--json", str(out), *options]), out

    return run


@pytest.fixture
def run_train(tiny_model_dir, tmp_path):
    """`dpokit train` of the tiny model (no demo resources, no trackers); returns (result, the run directory)."""

    def run(*overrides: str):
        run_dir = tmp_path / "run"
        arguments = [f"model={tiny_model_dir}", "use_lora=false", "sample_prompts=null", "report_to=[]",
                     "eval_data=null", "max_steps=1", f"cache_dir={tmp_path / 'cache'}", f"output_dir={run_dir}"]  # fmt: skip
        return CliRunner().invoke(app, ["train", *arguments, *overrides]), run_dir

    return run


@pytest.mark.parametrize("bad", cases(BAD_DATA))
def test_eval_rejects_bad_data(bad, run_eval, tmp_path):
    """`dpokit eval --data BAD --json OUT` fails with the exact one-line error and writes no OUT."""
    path = bad.make(tmp_path)
    result, out = run_eval(path)
    assert_clean_failure(result, bad.message.format(path=path), bad.prefix)
    assert not out.exists()


@pytest.mark.parametrize("bad", cases(BAD_DATA))
def test_train_rejects_bad_data(bad, run_train, tmp_path):
    """`dpokit train train_data=BAD` fails with the same one-line error and saves no final model."""
    path = bad.make(tmp_path)
    result, run_dir = run_train(f"train_data={path}")
    assert_clean_failure(result, bad.message.format(path=path), bad.prefix)
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("beta=-1", "field 'beta': Input should be greater than 0"),
        ("beta=abc", "field 'beta': Input should be a valid number, unable to parse string as a number"),
        ("bogus=1", "field 'bogus': unknown field"),
        ("max_length=1", "field 'max_length': Input should be greater than or equal to 2"),
        ("loss_type=nope", "field 'loss_type': unknown loss 'nope' (choose from sigmoid, conservative, robust, "
         "hinge, ipo, sigmoid_norm, rdpo, simpo)"),
        ("label_smoothing=0.1", "field 'label_smoothing': only used by conservative and robust, not sigmoid"),
        ("output_dir", "override 'output_dir': expected key=value (for example beta=0.2)"),
    ],
)  # fmt: skip
def test_train_rejects_bad_config(override, message, run_train, standard_file):
    """A bad config value fails before any work, with an error naming the field."""
    result, run_dir = run_train(f"train_data={standard_file}", override)
    assert_clean_failure(result, message)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--loss-type", "nope"], "--loss-type: unknown loss 'nope' (choose from sigmoid, conservative, robust, "
         "hinge, ipo, sigmoid_norm, rdpo, simpo)"),
        (["--beta", "0", "--loss-type", "ipo"], "--beta: must be greater than 0, got 0.0"),
        (["--label-smoothing", "0.5", "--loss-type", "robust"], "--label-smoothing: must be in [0, 0.5), got 0.5"),
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_eval_rejects_bad_options(options, message, run_eval, standard_file):
    """Option values that would crash (division by zero, a zero range step) or give nan metrics are refused."""
    result, out = run_eval(standard_file, *options)
    assert_clean_failure(result, message)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        "eval",
        "train",
    ],
)
def test_real_process_prints_one_line(command, tiny_model_dir, tmp_path):
    """In a fresh process (no imports already warmed up by other tests) stderr is still the one error line."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(lines(GOOD, "{oops"))
    if command == "eval":
        arguments = [
            "eval",
            "--policy",
            str(tiny_model_dir),
            "--reference",
            str(tiny_model_dir),
            "--data",
            str(data),
        ]
    else:
        arguments = ["train", f"model={tiny_model_dir}", "use_lora=false", "sample_prompts=null", "report_to=[]",
                     f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", f"train_data={data}"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", *arguments], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stdout == ""
    expected = (
        f"error: {data}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert result.stderr.splitlines() == [expected]
