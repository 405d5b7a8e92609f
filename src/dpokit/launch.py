"""`--num-processes N`: dpokit starts the processes of a run on this machine itself, as `torchrun --standalone
--nproc-per-node N` would, so one machine's GPUs need no launcher command:

    dpokit train my.yaml --distributed fsdp2                     # one process per visible GPU
    dpokit train my.yaml --distributed fsdp2 --num-processes 4   # 4 of them

The processes are torch elastic's, started by its agent in this process (the code torchrun runs): each one
runs the same dpokit command line, finds itself under a launcher and trains as under torchrun. Several
machines still need torchrun or SLURM (README: Scale-out).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

import torch
from rich.console import Console

from dpokit.distributed import Engine, named_engine
from dpokit.errors import DpokitError


def processes_to_start(distributed: str | None, num_processes: int | None) -> int | None:
    """How many processes this command should start, or None to run in this process.

    Under a launcher nothing is started (a count given must be the one the launcher started). Otherwise a
    count given is started, except one process of an engine that needs no process group; without a count,
    `--distributed` with an engine of several processes starts one per visible GPU.
    """
    if "LOCAL_RANK" in os.environ:  # started by torchrun, accelerate launch, or dpokit itself
        started = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if num_processes is not None and num_processes != started:
            raise DpokitError(
                f"--num-processes {num_processes}: the launcher started {started} processes on this machine; "
                "leave --num-processes out under torchrun or accelerate launch"
            )
        return None
    engine = named_engine(distributed) if distributed is not None else Engine("ddp")
    count = _count(engine, distributed, num_processes)
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))  # srun runs this command once per task
    if count is not None and tasks > 1:
        raise DpokitError(
            f"--num-processes: SLURM started this command {tasks} times (SLURM_NTASKS={tasks}), and each would "
            "start a run of its own in the same output_dir; across nodes start dpokit with torchrun's "
            "rendezvous, one task per node (README: Scale-out)"
        )
    return count


def _count(engine: Engine, distributed: str | None, num_processes: int | None) -> int | None:
    """The processes to start on this machine, before the SLURM check."""
    if num_processes is None:
        if distributed is None or engine.name == "single":
            return None
        gpus = torch.cuda.device_count()
        if gpus == 0 and engine.sharded:
            raise DpokitError(
                f"--distributed {distributed}: no GPU to count processes by; give --num-processes N "
                "(on CPU each process trains with gloo)"
            )
        return gpus if gpus > 1 or engine.sharded else None
    if num_processes < 1:
        raise DpokitError(f"--num-processes {num_processes}: give 1 or more")
    if engine.name == "single" and num_processes > 1:
        raise DpokitError(f"--num-processes {num_processes}: --distributed single runs one process")
    if num_processes == 1 and not engine.sharded:
        return None
    return num_processes


def start_processes(count: int, argv: list[str], console: Console) -> int:
    """Run `python -m dpokit.cli ARGV` in `count` processes on this machine, as torchrun --standalone does
    (its own rendezvous on a free local port, no restarts); returns the exit status: 0, or that of the first
    process to fail (each prints its own error; one killed by a signal is named here), or 128 + the signal
    that stopped this one (the processes get it too, save a checkpoint and stop)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torch elastic's agent logs each worker it stops and each failure (with pids and binary paths); the
    # processes' own messages say what went wrong, in dpokit's one line.
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)

    if count > 1:  # torchrun's default: N processes with a thread per core each would oversubscribe the cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=count,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "dpokit.cli", *argv)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        name = signal.Signals(-failure.exitcode).name  # -N: killed by signal N, with no word of its own
        console.print(f"[red]error:[/red] process {rank} of {count} was killed by {name}", highlight=False)
        return 128 - failure.exitcode
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0
