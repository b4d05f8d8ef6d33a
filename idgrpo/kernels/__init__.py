"""Triton kernels, one op per file, each beside its PyTorch reference.

Each op file holds `<op>_reference` (plain PyTorch, the ground truth), the Triton
kernel(s) with an autograd wrapper, and the public `<op>(...)` that dispatches through
`idgrpo.kernels.backend.resolve`. This package imports nothing else of idgrpo.
"""

from idgrpo.kernels.backend import BACKENDS, OPS, resolve

__all__ = ["BACKENDS", "OPS", "resolve"]
