"""The trainer's place in a torchrun job: rank, world size, and the collectives it issues itself.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; without it the run is one process and nothing here
touches torch.distributed.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down (call while this object, and so its work, is alive)."""
        dist.destroy_process_group()

    def all_reduce_min(self, t: torch.Tensor) -> None:
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, async_op=True)
        work.wait()
        self.recent_work.append(work)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        work = dist.all_gather(parts, t, async_op=True)
        work.wait()
        self.recent_work.append(work)
        return parts


def init_distributed(device_type: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
