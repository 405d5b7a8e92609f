"""The processes of a launched on-policy run: every rank generates its share and trains, rank 0 does the rest.

torchrun --standalone --nproc-per-node 2 -m dpokit.cli iterate my-iterate.yaml --distributed ddp

Under torchrun or `accelerate launch` each process runs `iterate`. Generation is dealt out in whole batches
(`deal`) and gathered back in order (`gather`); judging, pairing, evaluation and every write run on rank 0
(`on_main`), whose outcome, an error included, reaches every rank, so that a bad prompt file or a round with
too few pairs stops all processes with the same message instead of leaving them waiting. Training is
collective: every rank calls `dpokit train`'s function on the same rows. One process (no launcher) is the
same code with size 1 and no collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

from dpokit.distributed import make_accelerator
from dpokit.errors import DpokitError

T = TypeVar("T")

# How long a rank waits for the others at a collective: long enough for the stages that run on rank 0
# alone while the rest wait (an LLM judge scoring a whole round, hard-negative margins), since a timeout
# there kills the run.
STAGE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank in [0, size); size 1 without a launcher."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """fn() on rank 0 alone; its result there (None on the other ranks). A DpokitError raised by fn is
        raised on every rank with the same message; any other exception is re-raised on rank 0 and becomes a
        DpokitError naming it on the others. A collective: rank 0 starts when every rank has arrived, and every
        rank leaves when it is done."""
        self.barrier()  # rank 0 writes only once every rank has decided, from the same files, to come here
        result, failure = None, None
        if self.main:
            try:
                result = fn()
            except DpokitError as error:
                failure = str(error)
            except BaseException as error:
                self._share(f"rank 0 failed: {type(error).__name__}: {error}")
                raise
        if self.size > 1:
            failure = self._share(failure)
        if failure is not None:
            raise DpokitError(failure)
        return result

    def gather(self, items: Sequence[Any], fn: Callable[[Any], T]) -> list[T]:
        """fn over this rank's share of items (`deal`), the results of every rank in items' order, on every
        rank. Each item's result must not depend on which rank computes it."""
        mine = {i: fn(items[i]) for i in deal(len(items), self.rank, self.size)}
        if self.size == 1:
            return [mine[i] for i in range(len(items))]
        shares: list[Any] = [None] * self.size
        dist.all_gather_object(shares, mine)
        return merge(shares, len(items))

    def _share(self, value: Any) -> Any:
        """rank 0's value, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def deal(count: int, rank: int, size: int) -> list[int]:
    """The item indices rank `rank` of `size` takes out of `count`: every size-th from its rank, so that
    shares differ by at most one item and the expensive tail is spread too."""
    return list(range(rank, count, size))


def merge(shares: Sequence[dict[int, T]], count: int) -> list[T]:
    """The results of all ranks ({item index: result} each) as one list in item order."""
    merged = {index: result for share in shares for index, result in share.items()}
    return [merged[i] for i in range(count)]


def start_ranks() -> Ranks:
    """Join the launcher's process group (torchrun, accelerate launch) now, with STAGE_TIMEOUT, through the
    same accelerate state `dpokit train` uses later; size 1 without a launcher."""
    accelerator = make_accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=STAGE_TIMEOUT)])
    return Ranks(accelerator.process_index, accelerator.num_processes)


def stop_ranks(ranks: Ranks) -> None:
    """Leave the process group at the end of the run, once rank 0 has written everything."""
    if ranks.size > 1:
        dist.barrier()
        dist.destroy_process_group()
