"""Runs across processes and machines with torchrun (torch.distributed), not a home-made scheduler.

torchrun starts one process per rank and tells each who it is (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``World`` is that, read once; ``join`` starts
the process group (NCCL on CUDA, gloo on CPU) with a timeout, so a rank that dies leaves the
others with an error instead of a hang. A process started without torchrun is the world of one,
``SINGLE``, and every collective here is then a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_S = 600.0  # a collective waits this long (environment: SIGPROP_DIST_TIMEOUT)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Which process this is among how many (rank 0 writes the results)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints progress."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (the batch split evenly, in rank order)."""
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def device(self, device: str) -> str:
        """This rank's device: ``cuda`` means its own GPU, ``cuda:{local_rank}``."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device


SINGLE = World()


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment is set)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def join(device: str, what: str) -> World:
    """Join torchrun's process group (once); ValueError naming the problem outside torchrun.

    ``what`` names the option that needs it, for the error (e.g. '--ddp').
    """
    if not launched_by_torchrun():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        raise ValueError(f"{what} needs torchrun's environment ({', '.join(missing)} not set): "
                         f"launch with torchrun --nproc_per_node=N run_analysis.py …")
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(world.local_rank)
        timeout = float(os.environ.get("SIGPROP_DIST_TIMEOUT", TIMEOUT_S))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return world


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """``t`` summed over the ranks, in place (itself in a world of one)."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(world: World) -> None:
    """Wait for every rank (nothing in a world of one)."""
    if world.size > 1:
        dist.barrier()


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a folder name drawn from the clock, say)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(settings: dict[str, Any], world: World) -> None:
    """ValueError on every rank if the ranks were started with different settings."""
    if world.size == 1:
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    seen: list[Any] = [None] * world.size
    dist.all_gather_object(seen, (digest, settings))
    differ = [r for r, (d, _) in enumerate(seen) if d != seen[0][0]]
    if differ:
        first = seen[differ[0]][1]
        keys = sorted(k for k in set(first) | set(seen[0][1])
                      if first.get(k) != seen[0][1].get(k))
        raise ValueError(f"rank {differ[0]} was started with other settings than rank 0 "
                         f"({', '.join(map(str, keys[:5]))} differ): give every rank the same "
                         "command line")


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
