"""Test harness: Triton kernels run through the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any
test module imports idgrpo.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep the two CI cores for pytest-xdist's workers rather than oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402

from idgrpo.testing import poison, randn  # noqa: E402,F401  re-exported for tests


@pytest.fixture
def device() -> str:
    """Device the Triton path runs on: CUDA when present, else CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
