"""The one place that decides which implementation of a kernel op runs.

Every op in `idgrpo.kernels` has a PyTorch reference and a Triton kernel. The choice:

- `auto` (default): Triton when every tensor argument lives on a CUDA device, the
  reference otherwise;
- `triton`: always Triton. On CPU tensors that only works under the Triton interpreter
  (`TRITON_INTERPRET=1`), which is how the tests exercise the kernels without a GPU;
- `reference`: always the PyTorch reference.

The process-wide default comes from the environment variable `IDGRPO_KERNELS`
(`auto|triton|reference`); each op also takes `backend=` to override it per call.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "reference"]
BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "IDGRPO_KERNELS"

# Public ops, in the order `idgrpo env` lists them: name -> module under idgrpo.kernels.
OPS = {
    "attention": "attention",
    "group_advantage": "group_advantage",
    "grpo_loss": "grpo_loss",
    "nft_loss": "nft_loss",
    "norm": "norm",
    "rope": "rope",
}


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def resolve(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "reference" for an op called on `tensors`.

    `backend=None` means the process default (`IDGRPO_KERNELS`, else auto).
    """
    present = [t for t in tensors if t is not None]
    return choose(backend, on_cuda=bool(present) and all(t.is_cuda for t in present))


def choose(backend: str | None, on_cuda: bool) -> str:
    """`resolve` for tensors that are (or are not) all on CUDA; `idgrpo env` asks this."""
    choice = default_backend() if backend is None else backend
    if choice not in BACKENDS:
        raise ValueError(f"backend={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton is not importable")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='auto'/'reference'"
            )
    return choice


def autotune_configs(configs: list) -> list:
    """Autotuning over several configs fails under the interpreter: keep the first there."""
    return configs[:1] if interpreting() else configs
