"""Data parallelism over prompt pairs with PyTorch's own ``torch.distributed``, launched by ``torchrun``.

Each process (rank) loads the model, compiles the same plan, runs the batches numbered
``rank, rank + world, ...`` and sends their outputs (CPU tensors) to every rank with
``all_gather_object``; every rank then assembles the same result, and rank 0 alone writes it.
``gloo`` is used on CPU, ``nccl`` when the plan runs on CUDA (each rank on ``cuda:LOCAL_RANK``).
Because batches are the unit of work and the assembly is the single-process one, scores equal a
single-process run's up to floating-point differences of the batch itself.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from atpframework.errors import AtpfError, PlanError
from atpframework.plans.compiled import BatchOutput

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> Group:
    """Join (or reuse) the default process group; ``device`` is the plan's device (picks gloo or nccl)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PlanError("distributed: RANK and WORLD_SIZE are not set; start the run with torchrun "
                        "(torchrun --nproc-per-node N -m atpframework PLAN.json)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), local_rank)


def device_for_rank(device: str, group: Group) -> str:
    """``cuda`` without an index means this rank's GPU (``cuda:LOCAL_RANK``); other devices are kept."""
    return f"cuda:{group.local_rank}" if device == "cuda" else device


def shard(n_batches: int, group: Group) -> list[int]:
    """The batch numbers this rank runs: every ``world``-th, starting at its rank."""
    return list(range(group.rank, n_batches, group.world))


def all_outputs(outputs: list[BatchOutput], group: Group) -> list[BatchOutput]:
    """Every rank's batch outputs, on every rank."""
    import torch.distributed as dist

    gathered: list[list[BatchOutput] | None] = [None] * group.world
    dist.all_gather_object(gathered, outputs)
    return [out for part in gathered for out in (part or [])]


def open_shared(open_: Callable[[bool], T], group: Group) -> T:
    """``open_(True)`` on rank 0 first (it locks and stamps a shared folder), then ``open_(False)`` on the
    others; a failure on rank 0 is raised on every rank (the message travels), so no rank waits forever."""
    import torch.distributed as dist

    made: T | None = None
    failure: BaseException | None = None
    if group.is_main:
        try:
            made = open_(True)
        except AtpfError as err:
            failure = err
    message = [None if failure is None else str(failure)]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise PlanError(message[0])
    return made if made is not None else open_(False)


def leave() -> None:
    """Wait for every rank, then tear the process group down (end of a command-line run)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
