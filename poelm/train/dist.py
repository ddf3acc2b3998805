"""Process group, device and rank helpers shared by the training loops.

Design choices:
- `torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is one process. The backend is
  NCCL on CUDA and gloo on CPU, so the same command scales from a laptop to many GPU machines.
- Everything rank-dependent is explicit in a `Dist` value passed around (no module globals), and
  only rank 0 prints, writes run files and exports models.
- `all_reduce_sum` of Python numbers is how ranks agree on counts (supervised tokens in a step,
  evaluation sums) so that results do not depend on the world size.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_dist(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one; pick the device (CUDA when present)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def run_distributed(device: str | None, fn, *args):
    """Join the process group, run `fn(dist, *args)`, and always leave the group again."""
    d = init_dist(device)
    try:
        return fn(d, *args)
    finally:
        close_dist(d)


def data_parallel(d: Dist, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """`model` in DDP when the run has several processes, else `model` itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)


def close_dist(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a list of numbers over ranks (float64 on the wire, so token counts stay exact)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's decision, for every rank (e.g. 'the run must stop')."""
    if not d.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=d.device if d.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def log0(d: Dist, text: str) -> None:
    """A plain log line on stderr from rank 0."""
    if d.is_main:
        print(text, file=sys.stderr, flush=True)
