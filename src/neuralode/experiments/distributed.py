"""Devices and multi-process data parallel training with PyTorch's own engine.

The same command runs alone or under ``torchrun --nproc_per_node=N``: :func:`setup` reads the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), initialises the process group (``gloo`` on CPU, ``nccl`` on CUDA) and returns a
:class:`DistContext`. Models are wrapped in ``DistributedDataParallel`` by the training engine;
only rank 0 writes files or shows progress. Without those variables the context is a single
process and nothing is initialised. neuralode adds no launcher of its own.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "resolve_device", "setup"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``--device name``: ``cpu``, ``cuda`` or ``auto`` (CUDA if present).

    Under torchrun each process takes the GPU of its ``LOCAL_RANK``.

    Raises:
        ValueError: for an unknown name, or ``cuda`` on a machine without CUDA.
    """
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows progress (rank 0)."""
        return self.rank == 0

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over processes (returned unchanged in a single process)."""
        if not self.distributed:
            return values
        out = values.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(values.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


#: Seconds a collective may wait for the other processes before failing (environment
#: variable; unset: torch's default, 30 minutes).  A process that died or took another path
#: otherwise leaves its peers asleep that long.
TIMEOUT_ENV = "NEURALODE_DIST_TIMEOUT"


def _timeout() -> datetime.timedelta | None:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def setup(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun; resolve this process's device.

    Collectives wait :data:`TIMEOUT_ENV` seconds (``NEURALODE_DIST_TIMEOUT``) for the other
    processes when it is set, torch's default otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        timeout = _timeout()
        if timeout is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(
                backend=backend, rank=rank, world_size=world_size, timeout=timeout
            )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)
