"""Helpers for tests (ours and those of projects that embed the engine).

- `randn(...)`: seeded random inputs, never zeros;
- `poison(t)` / `poisoned_empty(...)`: fill outputs with NaN (or a sentinel for integer
  types) before a kernel writes them, so a kernel that skips an element is caught;
- `run_distributed(fn, world_size)`: run `fn(rank, world_size, *args)` in `world_size`
  processes on the gloo backend and return each rank's result.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device="cpu", scale: float = 1.0):
    """Seeded standard-normal tensor (drawn in float64 on CPU, then cast and moved)."""
    x = torch.randn(*shape, generator=generator(seed), dtype=torch.float64) * scale
    return x.to(dtype=dtype, device=device)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` in place with a value no correct kernel writes (NaN; -7777 for integers)."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else -7777)


def poisoned_empty(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison(torch.empty(*shape, dtype=dtype, device=device))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        # Note: gloo's init can return on one rank while a peer is still connecting; a rank that
        # finished fn and tore the group down would then break the peer's init. Meet first.
        dist.barrier()
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes with an initialised
    gloo process group (torchrun's environment variables set); return the results by rank.

    `fn` must be importable (a module-level function) and its result picklable. Any rank
    that raises makes this raise with that rank's traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s + 60)
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    except Exception as e:  # queue.Empty: a rank hung or died without reporting
        errors.append(f"a rank did not report within {timeout_s + 60:.0f}s ({type(e).__name__})")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
