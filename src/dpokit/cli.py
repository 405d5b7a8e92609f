"""The `dpokit` command line.

dpokit train                              # built-in demo (SmolLM2-135M + LoRA, sentiment pairs)
dpokit train my.yaml beta=0.2 --resume    # your config with overrides, continuing a run
torchrun --nproc-per-node 8 -m dpokit.cli train my.yaml --distributed fsdp2   # sharded over 8 GPUs
dpokit eval --policy runs/dpokit/final --data pairs.jsonl --json metrics.json
dpokit export runs/dpokit --merge --out merged/
dpokit iterate my-iterate.yaml --resume   # on-policy DPO, round after round (README: On-policy)
torchrun --nproc-per-node 8 -m dpokit.cli iterate my-iterate.yaml --distributed ddp   # on 8 GPUs
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from dpokit.errors import DpokitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Direct Preference Optimization that is fast, light and guarded.",
)
console = Console(stderr=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from dpokit.distributed import first_process

    if not first_process():  # under a launcher every process meets the same warnings: show them once
        return
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


def _fail(error: DpokitError) -> None:
    # escape: paths and chat markers like '[/INST]' are text, not rich markup.
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _interrupted() -> None:
    """Ctrl-C outside the training steps (which save a checkpoint and exit themselves): loading, the reference
    pass, generating or judging. Every file a run writes is written whole or not at all."""
    from dpokit.distributed import first_process

    if first_process():
        console.print(
            "[yellow]interrupted (Ctrl-C): what was finished is kept; continue with --resume[/yellow]"
        )
    raise typer.Exit(130)


def _done(result: str) -> None:
    from dpokit.distributed import first_process

    if first_process():
        console.print(f"done: {result}")


NumProcesses = Annotated[
    int | None,
    typer.Option(
        "--num-processes",
        help="Start this many processes on this machine, as torchrun --nproc-per-node N would (no launcher "
        "needed). Default with --distributed ddp/fsdp2/...: one per visible GPU.",
    ),
]


def _launch_count(distributed: str | None, num_processes: int | None) -> int | None:
    """The processes to start for --num-processes / --distributed (README: Scale-out), None to run here."""
    from dpokit.launch import processes_to_start

    return processes_to_start(distributed, num_processes)


@contextmanager
def _warnings_left_to(count: int | None) -> Iterator[None]:
    """The config is checked here once before `count` processes are started; they show its warnings (the
    first one only), so this process keeps them to itself."""
    with warnings.catch_warnings():
        if count is not None:
            warnings.simplefilter("ignore")
        yield


def _start(count: int) -> None:
    """Run this same command line in `count` processes and exit with their status."""
    from dpokit.launch import start_processes

    raise typer.Exit(start_processes(count, sys.argv[1:], console))


@app.callback()
def main() -> None:
    # bitsandbytes (imported by peft) logs that an optional CPU kernel package is missing; it is optional.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    if os.environ.get("RANK", "0") != "0":  # a launched run's other processes: the first one shows progress
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


@app.command()
def train(
    config: Annotated[
        Path | None,
        typer.Argument(help="YAML config, or builtin:demo. No arguments at all: the demo."),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. beta=0.2")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's latest checkpoint.")
    ] = False,
    force_resume: Annotated[
        bool,
        typer.Option(
            "--force-resume",
            help="With --resume: continue even though the data, batch size, seed, loss or schedule changed.",
        ),
    ] = False,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Show the resolved config and exit.")
    ] = False,
    from_trl: Annotated[
        Path | None,
        typer.Option(
            "--from-trl",
            help="A YAML of TRL 1.16 DPOConfig fields, mapped to dpokit's (README: Coming from TRL); "
            "key=value overrides set dpokit fields (model=..., train_data=...).",
        ),
    ] = None,
    distributed: Annotated[
        str | None,
        typer.Option(
            "--distributed",
            help="Scale-out engine under torchrun / accelerate launch: single, ddp, fsdp2, fsdp2-offload "
            "(a preset shipped with dpokit) or an accelerate config file. Default: what the launcher set, "
            "DDP when it started several processes (README: Scale-out).",
        ),
    ] = None,
    num_processes: NumProcesses = None,
) -> None:
    """Train a policy with DPO (or IPO, SimPO, ...) on preference pairs."""
    from dpokit.config import load_config

    # A first argument with '=' is an override, not a config file.
    overrides = list(overrides or [])
    if config is not None and "=" in str(config):
        overrides.insert(0, str(config))
        config = None
    # No arguments at all: the built-in demo. `builtin:demo` names it explicitly, to add overrides.
    if from_trl is None and ((config is None and not overrides) or str(config) == "builtin:demo"):
        from dpokit.data.prepare import resolve_path

        config = Path(resolve_path("builtin:demo"))
    try:
        if force_resume and not resume:
            raise DpokitError("--force-resume: only meaningful with --resume")
        count = None if print_config else _launch_count(distributed, num_processes)
        with _warnings_left_to(count):
            if from_trl is not None:  # TRL's fields mapped, then key=value overrides of dpokit fields on top
                from dpokit.config import RunConfig, parse_override, read_config_file

                if config is not None:
                    raise DpokitError(
                        f"--from-trl: give the TRL YAML or a dpokit config ({config}), not both"
                    )
                fields = dict(parse_override(text) for text in overrides)
                run_config = RunConfig.from_trl(read_config_file(from_trl), **fields)
            else:
                run_config = load_config(config, overrides)
        if print_config:
            sys.stdout.write(yaml.safe_dump(run_config.resolved(), sort_keys=False))
            return
        if count is not None:
            _start(count)
        from dpokit.train.loop import train as run_training

        run_dir = run_training(
            run_config, resume=resume, console=console, force_resume=force_resume, distributed=distributed
        )
    except DpokitError as error:
        _fail(error)
    except KeyboardInterrupt:
        _interrupted()
    _done(f"{run_dir}/final")


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="single, ddp, fsdp2, fsdp2-offload or deepspeed-zero3.")],
) -> None:
    """Print the path of a shipped accelerate config: accelerate launch --config_file "$(dpokit preset fsdp2)"."""
    from dpokit.distributed import preset_path

    try:
        sys.stdout.write(f"{preset_path(name)}\n")
    except DpokitError as error:
        _fail(error)


@app.command()
def config() -> None:
    """List every config field with its default and meaning (the reference for YAML files and overrides)."""
    from rich.table import Table

    from dpokit.config import RunConfig

    table = Table(show_lines=False)
    for column in ("field", "default", "meaning"):
        table.add_column(column)
    for name, field in RunConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        table.add_row(name, repr(default), field.description or "")
    Console(soft_wrap=False, width=160).print(table)


@app.command("eval")
def evaluate(
    policy: Annotated[str, typer.Option(help="Policy: model directory or PEFT adapter directory.")],
    data: Annotated[str, typer.Option(help="Preference data file or directory.")],
    reference: Annotated[
        str | None, typer.Option(help="Reference model (default: the adapter's base).")
    ] = None,
    loss_type: Annotated[str, typer.Option(help="Loss whose value is reported.")] = "sigmoid",
    beta: Annotated[float, typer.Option(help="KL strength used in rewards and loss.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option(help="For conservative/robust losses.")] = 0.0,
    max_length: Annotated[int, typer.Option(help="Truncation length, as in training.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 8,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics to this JSON file.")
    ] = None,
) -> None:
    """Preference metrics of a policy on a dataset (TRL's metric names)."""
    from dpokit.commands import eval_command

    try:
        metrics = eval_command(
            policy, reference, data, loss_type, beta, label_smoothing, max_length, batch_size, json_out
        )
    except DpokitError as error:
        _fail(error)
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out: Annotated[Path, typer.Option(help="Where to write the standalone model.")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge LoRA adapters into the base weights.")
    ] = False,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="Export this checkpoint (step-000040, or latest) instead of final/; sharded (FSDP2) ones "
            "are consolidated in this one process."
        ),
    ] = None,
) -> None:
    """Write a standalone model (safetensors) that transformers loads."""
    from dpokit.commands import export_command

    try:
        path = export_command(run_dir, out, merge, checkpoint)
    except DpokitError as error:
        _fail(error)
    console.print(f"wrote {path}")


@app.command()
def audit(
    data: Annotated[str, typer.Argument(help="Preference data file or directory.")],
    model: Annotated[
        str | None, typer.Option(help="Tokenizer and step-0 reference for the model checks.")
    ] = None,
    max_length: Annotated[int, typer.Option(help="Truncation length to check against.")] = 1024,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write stats and findings to this JSON file.")
    ] = None,
) -> None:
    """Find what in a preference dataset will hurt DPO (length bias, shortcuts, near-identical pairs, ...)."""
    from dpokit.diagnostics.audit import audit_command

    try:
        audit_command(data, model, max_length, json_out, console=Console())
    except DpokitError as error:
        _fail(error)


@app.command()
def doctor(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or not).")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the findings to this JSON file.")
    ] = None,
) -> None:
    """Name what went wrong in a run, with evidence, cause and fix. Exit 1 when a warning is found."""
    from dpokit.diagnostics.commands import doctor_command

    try:
        code = doctor_command(run_dir, json_out, console=Console())
    except DpokitError as error:
        _fail(error)
    raise typer.Exit(code)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Write a self-contained HTML report of a run: curves, doctor findings, policy vs reference samples."""
    from dpokit.diagnostics.commands import report_command

    try:
        report_command(run_dir, out, console=console)
    except DpokitError as error:
        _fail(error)


@app.command()
def iterate(
    config: Annotated[Path, typer.Argument(help="YAML iterate config (see README: On-policy).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides; train.KEY=value for the train section")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last finished stage of the last round.")
    ] = False,
    distributed: Annotated[
        str | None,
        typer.Option(
            "--distributed",
            help="Engine each round trains with under torchrun / accelerate launch, as for `dpokit train` "
            "(single, ddp, fsdp2, fsdp2-offload or an accelerate config file); every process generates its "
            "share of the prompts, rank 0 judges, pairs and writes.",
        ),
    ] = None,
    num_processes: NumProcesses = None,
) -> None:
    """On-policy DPO: R rounds of generate, judge, pair, train and evaluate (RUN_DIR/rounds.jsonl)."""
    from dpokit.online.config import load_iterate_config
    from dpokit.online.loop import iterate as run_iterate

    try:
        count = _launch_count(distributed, num_processes)
        with _warnings_left_to(count):
            iterate_config = load_iterate_config(config, list(overrides or []))
        if count is not None:
            _start(count)
        run_dir = run_iterate(
            iterate_config,
            resume=resume,
            console=console,
            distributed=distributed,
        )
    except DpokitError as error:
        _fail(error)
    except KeyboardInterrupt:
        _interrupted()
    _done(f"{run_dir}/rounds.jsonl")


if __name__ == "__main__":
    app()
