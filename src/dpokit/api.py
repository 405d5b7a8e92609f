"""dpokit from Python: train, evaluate, audit and diagnose with data held in memory or in files.

    import dpokit
    config = dpokit.RunConfig(model="./sft-model", eval_data=None, sample_prompts=None)
    result = dpokit.train(config, train_data=my_dataset, quiet=True)
    print(result.eval_metrics["rewards/accuracies"], [f.title for f in result.findings])

These functions, re-exported by `dpokit`, are the public API; the modules behind them may change.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import PreTrainedTokenizerBase

from dpokit.config import RunConfig
from dpokit.data.prepare import DataReport, Rows
from dpokit.data.tokenize import TokenizedPair
from dpokit.diagnostics.findings import Finding
from dpokit.errors import DpokitError
from dpokit.online.config import IterateConfig

# A path (str or Path), a list of row dicts, a `datasets.Dataset`, or a pandas DataFrame.
Data = str | os.PathLike | Sequence[Mapping[str, Any]] | Any
IN_MEMORY = "<rows in memory>"  # train_data/eval_data in config.yaml when the rows were passed in memory


@dataclass(frozen=True)
class TrainResult:
    """What a training run leaves: its directory, last metrics, final model and the doctor's findings."""

    run_dir: Path
    train_metrics: dict[str, Any]  # the last `train` record of metrics.jsonl (loss, rewards/..., lr, ...)
    eval_metrics: dict[str, Any] | None  # the last `eval` record (after training); None without eval data
    model_dir: Path  # the final weights (a PEFT adapter for LoRA runs), loadable by transformers or peft
    findings: list[Finding]  # what `dpokit doctor` finds in the run, worst first


def as_rows(data: Data, name: str) -> str | Rows:
    """A path as a string, or the rows of a list of dicts, a `datasets.Dataset` or a pandas DataFrame; other
    values (a DatasetDict, a dict of columns, a number) raise DpokitError naming `name`."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if hasattr(data, "iloc"):  # a pandas DataFrame; cells read from Parquet hold numpy arrays of messages
        records = data.to_dict(orient="records")
        return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()} for row in records]
    if hasattr(data, "to_list"):  # a datasets.Dataset
        return data.to_list()
    if isinstance(data, Mapping):  # iterating it would give its keys as rows
        raise DpokitError(
            f"{name}: got a mapping (keys {', '.join(map(str, data))}), not rows; pass one split of a DatasetDict "
            "(data['train']), or Dataset.from_dict(columns)"
        )
    if not isinstance(data, Iterable):
        raise DpokitError(
            f"{name}: expected a path, a list of row dicts, a datasets.Dataset or a pandas DataFrame, got "
            f"{type(data).__name__}"
        )
    return list(data)


@contextmanager
def silenced(quiet: bool) -> Iterator[None]:
    """With quiet: no output at all (progress bars, rich panels, warnings, transformers' log lines)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def train(
    config: RunConfig,
    train_data: Data | None = None,
    eval_data: Data | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Train as `config` says, on `train_data`/`eval_data` when given (else the config's files).

    The data is a path, a list of {prompt, chosen, rejected} dicts (TRL's formats), a `datasets.Dataset`
    or a pandas DataFrame; a bad row raises DpokitError naming it (`train_data row 3: field 'chosen' ...`,
    counted from 0). quiet: print nothing. Returns the run's directory, metrics, final model and findings.

    >>> config = dpokit.RunConfig(model="./sft-model", eval_data=None, sample_prompts=None)
    >>> result = dpokit.train(config, [{"prompt": "Hi", "chosen": " Hello!", "rejected": " Go."}] * 8)
    >>> result.train_metrics["loss"], result.model_dir
    """
    from dpokit.diagnostics.doctor import diagnose, load_run
    from dpokit.train.loop import train as run_training

    sources = {"train_data": train_data, "eval_data": eval_data}
    if not isinstance(config, RunConfig):
        raise DpokitError(
            f"config: expected a dpokit.RunConfig, got {type(config).__name__} (build one with "
            "dpokit.RunConfig(**fields) or dpokit.RunConfig.from_trl(dpo_config))"
        )
    rows = {name: as_rows(data, name) for name, data in sources.items() if data is not None}
    paths = {name: value for name, value in rows.items() if isinstance(value, str)}
    in_memory = {name: value for name, value in rows.items() if not isinstance(value, str)}
    config = config.model_copy(update={**paths, **dict.fromkeys(in_memory, IN_MEMORY)})
    with silenced(quiet):
        run_dir = run_training(
            config,
            resume=resume,
            console=Console(stderr=True, quiet=quiet),
            train_rows=in_memory.get("train_data"),
            eval_rows=in_memory.get("eval_data"),
        )
    run = load_run(run_dir)
    return TrainResult(
        run_dir=run_dir,
        train_metrics=run.train[-1] if run.train else {},
        eval_metrics=run.eval[-1] if run.eval else None,
        model_dir=run_dir / "final",
        findings=diagnose(run_dir),
    )


@dataclass(frozen=True)
class IterateResult:
    """What an on-policy run leaves: its directory, its rounds.jsonl records and the last round's policy."""

    run_dir: Path
    rounds: list[dict[str, Any]]  # one per round, round 0 (the starting policy) first: reward_mean, kl, ...
    policy: Path | str  # the final policy: a model or LoRA adapter directory (the starting model's name if
    # no round trained)


def iterate(
    config: IterateConfig | str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    quiet: bool = False,
) -> IterateResult:
    """Run on-policy DPO round after round (generate, judge, pair, train, evaluate), as `dpokit iterate` does.

    config: an IterateConfig, or the path of its YAML file, with `key=value` overrides (`train.beta=0.2`).
    resume: continue the run in config.output_dir from its last finished stage. quiet: print nothing.

    >>> result = dpokit.iterate("examples/sentiment/config.yaml", ["rounds=1"])
    >>> [(r["round"], r["reward_mean"], r["kl"]) for r in result.rounds], result.policy
    """
    from dpokit.online.config import load_iterate_config
    from dpokit.online.loop import Loop, read_jsonl
    from dpokit.online.loop import iterate as run_iterate

    if not isinstance(config, IterateConfig):
        config = load_iterate_config(Path(config), list(overrides))
    elif overrides:
        raise DpokitError("iterate: overrides apply to a config file; change the IterateConfig instead")
    with silenced(quiet):
        run_dir = run_iterate(config, resume=resume, console=Console(stderr=True, quiet=quiet))
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    last = Loop(config, run_dir, Console(quiet=True), None, [], []).policy(rounds[-1]["round"])
    return IterateResult(
        run_dir=run_dir, rounds=rounds, policy=last if last == config.train.model else Path(last)
    )


def evaluate(
    policy: str | os.PathLike,
    data: Data,
    *,
    reference: str | os.PathLike | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    max_length: int = 1024,
    batch_size: int = 8,
    quiet: bool = False,
) -> dict[str, float]:
    """Mean preference metrics of a saved policy on `data` (TRL's names: loss, rewards/chosen, ...), as
    `dpokit eval`; equal to TRL's `DPOTrainer.evaluate()` within 1e-4. The reference defaults to the
    adapter's base when `policy` is a PEFT adapter (a LoRA run's final/); a full model needs one.

    >>> metrics = dpokit.evaluate(result.model_dir, "heldout.jsonl", reference="./sft-model")
    >>> metrics["rewards/accuracies"]
    """
    from dpokit.commands import eval_command

    with silenced(quiet):
        return eval_command(
            str(policy),
            None if reference is None else str(reference),
            as_rows(data, "data"),
            loss_type,
            beta,
            label_smoothing,
            max_length,
            batch_size,
            None,
        )


def load_pairs(
    data: Data, tokenizer: PreTrainedTokenizerBase, max_length: int = 1024, name: str = "data"
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenized pairs as training sees them (TRL 1.16's tokenization, `keep_start` truncation at
    `max_length`), with a report of the rows skipped, dropped or truncated. The data is a path or rows held
    in memory, as for `train`; errors name a bad row as `name row 3`, counted from 0.

    >>> tokenizer = transformers.AutoTokenizer.from_pretrained("./sft-model")
    >>> pairs, report = dpokit.load_pairs([{"prompt": "Hi", "chosen": " hello", "rejected": " go"}], tokenizer)
    >>> len(pairs[0].chosen_ids), report.truncated
    """
    from dpokit.data.prepare import load_pairs as load

    return load(as_rows(data, name), tokenizer, max_length, name)


def audit(
    data: Data, model: str | None = None, max_length: int = 1024, *, quiet: bool = False
) -> list[Finding]:
    """What in a preference dataset will hurt DPO (length bias, shortcuts, near-identical pairs, ...), as
    `dpokit audit` finds it, worst first; with `model`, also the tokenizer and step-0 reference checks.
    The data is a path or rows held in memory, as for `train`. quiet: no progress bars (with `model`).

    >>> findings = dpokit.audit("pairs.jsonl")
    >>> [(f.severity, f.title) for f in findings]
    """
    from dpokit.diagnostics.audit import audit_dataset

    with silenced(quiet):
        return audit_dataset(as_rows(data, "data"), model, max_length)[1]


def doctor(run_dir: str | os.PathLike) -> list[Finding]:
    """The findings `dpokit doctor` reports for a run directory (finished or not), worst first: each with
    its evidence in numbers, the likely cause and the fix.

    >>> [f.code for f in dpokit.doctor("runs/dpokit") if f.severity != "info"]
    """
    from dpokit.diagnostics.doctor import diagnose

    return diagnose(Path(run_dir))
