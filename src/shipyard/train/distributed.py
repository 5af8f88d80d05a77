"""torch.distributed set-up for data-parallel training launched by torchrun.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain `python` run has
none of them and trains in one process. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> DistEnv:
    """Join the process group that torchrun describes in the environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return env


def setup_single_process_group(device_type: str) -> None:
    """A one-process group (FSDP needs a group even on one process); no-op if one exists."""
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def all_gather_floats(value: float, env: DistEnv, device: torch.device) -> list[float]:
    """Every rank's `value`, in rank order (on every rank)."""
    values = torch.zeros(env.world_size, dtype=torch.float64, device=device)
    values[env.rank] = value
    return [float(v) for v in all_reduce_sum(values, env).tolist()]


def teardown_distributed() -> None:
    """Leave the process group. No barrier here: after an error on one rank the others may never
    arrive; a finished run has already met every rank at the end of `Trainer._finish`."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all processes (identity in a single process)."""
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_text(text: str, env: DistEnv, device: torch.device) -> str:
    """Send rank 0's string to every rank (used for the run directory)."""
    if not env.enabled:
        return text
    data = torch.zeros(4096, dtype=torch.uint8, device=device)
    if env.is_main:
        raw = text.encode()
        if len(raw) > data.numel():
            raise ValueError("text too long to broadcast")
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
