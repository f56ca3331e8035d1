"""A process's place in a torchrun job (training, sharded sampling, FID): rank, world size, its
device, and the collectives the callers issue themselves.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; without it the run is one process and nothing here
touches torch.distributed. nccl on GPUs (one per rank, by LOCAL_RANK), gloo on the CPU.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Distributed:
    """This process's place in the run, and the collectives the trainer issues itself.

    Each collective's work handle is kept (the latest few): gloo's worker threads let go of a
    finished work after the caller has moved on, and letting go of the last reference to tensors
    that have Python objects takes the GIL — which the group's destructor holds while it joins
    those threads. With the handle kept, a worker's reference is never the last one, so the
    destructor (run at the end of `Trainer.run`, while these are still held) never waits on
    the GIL."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    recent_work: deque = field(default_factory=lambda: deque(maxlen=16))
    # where the collectives' tensors live: nccl reduces CUDA tensors, gloo CPU ones
    collective_device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down (call while this object, and so its work, is alive); a
        one-process run has none."""
        if self.world > 1:
            dist.destroy_process_group()

    def all_reduce_min(self, t: torch.Tensor) -> None:
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, async_op=True)
        work.wait()
        self.recent_work.append(work)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks, in place (a no-op in a one-process run); returns `t`."""
        if self.world > 1:
            self._all_reduce(t, dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._all_reduce(t, dist.ReduceOp.MAX)
        return t

    def _all_reduce(self, t: torch.Tensor, op) -> None:
        here = t.to(self.collective_device)
        work = dist.all_reduce(here, op=op, async_op=True)
        work.wait()
        self.recent_work.append(work)
        t.copy_(here)

    def broadcast_from_main(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (picklable; only what this package sends itself)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        work = dist.all_gather(parts, t, async_op=True)
        work.wait()
        self.recent_work.append(work)
        return parts


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on GPUs, gloo on the CPU."""
    world = launched_world()
    if world == 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world, local_rank,
                       collective_device=f"cuda:{local_rank}" if device_type == "cuda" else "cpu")


def rank_device(requested: str | None) -> str | None:
    """The device of this rank: under torchrun, `cuda` (or no choice, on a machine with GPUs)
    means the GPU numbered LOCAL_RANK, one GPU per rank; `cpu` stays the CPU. A numbered GPU is
    refused there: every rank would share it."""
    if launched_world() == 1:
        return requested
    if requested is not None and requested.startswith("cuda:"):
        raise UserError(f"under torchrun each rank takes the GPU numbered LOCAL_RANK; pass --device "
                        f"cuda (or nothing), not {requested}, and choose GPUs with CUDA_VISIBLE_DEVICES")
    if requested in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return requested
