"""Distributed runtime: process group, FSDP, precision, optimizer, checkpoints, metrics.

Knows nothing of video or RL; imports only `idgrpo.kernels` (and the leaf module `idgrpo.errors`).
"""

from idgrpo.engine.checkpoint import Checkpointer, CheckpointError, export_full_weights, export_lora
from idgrpo.engine.dist import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown, world
from idgrpo.engine.fsdp import FSDP, FlatGroup
from idgrpo.engine.metrics import Metrics, progress
from idgrpo.engine.optim import build_optimizer, clip_grad_norm_, step_if_finite

__all__ = [
    "CheckpointError", "Checkpointer", "export_full_weights", "export_lora",
    "DistInfo", "FSDP", "FlatGroup", "all_reduce_mean", "barrier", "build_optimizer", "clip_grad_norm_",
    "init_distributed", "Metrics", "progress", "shutdown", "step_if_finite", "world",
]
