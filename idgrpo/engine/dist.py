"""Process group setup from torchrun's environment, and the few collectives the engine uses.

Usage:
    info = init_distributed()          # one CPU process, `torchrun --nproc-per-node 8 ...`, or several nodes
    model = FSDP(model)                # same code in every case

Note: world size 1 is just a small world. Without torchrun's environment we still create a
real process group (one rank, in-process HashStore), so every collective at every call site
runs and is trivially correct; nothing in the engine or the trainers branches on "distributed
or not". `world()` and `barrier()` also work before a group exists ((0, 1) and nothing): the
engine's checkpoints, run directories and fault points use them, and may run in a process that
never initialised one.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from idgrpo.errors import UsageError

# torch >= 2.11 renamed the tensor-in/tensor-out collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """`cuda:<local_rank>` when CUDA is available, else `cpu`."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


COLLECTIVE_TIMEOUT_ENV = "IDGRPO_COLLECTIVE_TIMEOUT"
"""Environment variable: seconds a collective may wait (a command's --collective-timeout wins over it)."""


def collective_timeout_s(timeout_s: float | None = None, default_timeout_s: float = 600.0) -> float:
    """The bound on every collective: `timeout_s` when given (a command's --collective-timeout), else
    $IDGRPO_COLLECTIVE_TIMEOUT, else `default_timeout_s`."""
    where = "--collective-timeout"
    if timeout_s is None:
        text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
        where = COLLECTIVE_TIMEOUT_ENV
        try:
            timeout_s = float(text) if text else default_timeout_s
        except ValueError:
            raise UsageError(f"{where} must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise UsageError(f"{where} must be a positive, finite number of seconds, got {timeout_s}")
    return float(timeout_s)


def init_distributed(timeout_s: float | None = None, *, default_timeout_s: float = 600.0) -> DistInfo:
    """Initialise (or reuse) the default process group and return who we are.

    - already initialised (e.g. by `idgrpo.testing.run_distributed`): reused as is;
    - torchrun environment (RANK / WORLD_SIZE / MASTER_ADDR): NCCL on CUDA, gloo on CPU;
    - neither: a one-rank group on an in-process store.

    Every collective is bounded (`collective_timeout_s`: `timeout_s`, else $IDGRPO_COLLECTIVE_TIMEOUT, else
    `default_timeout_s`), so a rank that dies or raises makes the others fail with an error instead of hanging
    forever.
    """
    timeout = timedelta(seconds=collective_timeout_s(timeout_s, default_timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Make NCCL surface a timed-out or failed collective as an exception that kills the process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Note: init_process_group installs an excepthook that prefixes every traceback line with "[rank<N>]:".
        # In a one-process world that prefix says nothing and hides the traceback's start, so it is undone there.
        excepthook = sys.excepthook
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        if dist.get_world_size() == 1:
            sys.excepthook = excepthook
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def world() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) before initialisation."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank of the default group; nothing before initialisation."""
    if dist.is_initialized():
        dist.barrier()
