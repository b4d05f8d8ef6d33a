"""Distributed runtime: process group, FSDP, precision, optimizer, checkpoints, metrics, run directories.

Knows nothing of video or RL; imports only `idgrpo.kernels` (and the leaf module `idgrpo.errors`).
"""

from idgrpo.engine.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    CheckpointError,
    export_full_weights,
    export_lora,
    save_safetensors_atomic,
    write_atomic,
)
from idgrpo.engine.dist import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown, world
from idgrpo.engine.faults import InjectedFault, fault_point
from idgrpo.engine.fsdp import FSDP, FlatGroup
from idgrpo.engine.metrics import Metrics, progress, truncate_jsonl
from idgrpo.engine.optim import (
    NonFiniteError,
    NonFiniteGuard,
    build_optimizer,
    clip_grad_norm_,
    nonfinite_summary,
    step_if_finite,
)
from idgrpo.engine.rundir import RunDir, RunDirError, RunSettingsError, open_run

__all__ = [
    "CheckpointDamaged", "CheckpointError", "Checkpointer", "export_full_weights", "export_lora",
    "save_safetensors_atomic", "write_atomic",
    "DistInfo", "FSDP", "FlatGroup", "all_reduce_mean", "barrier", "build_optimizer", "clip_grad_norm_",
    "InjectedFault", "fault_point", "init_distributed", "Metrics", "NonFiniteError", "NonFiniteGuard",
    "nonfinite_summary", "progress", "RunDir", "RunDirError", "RunSettingsError", "open_run", "shutdown",
    "step_if_finite", "truncate_jsonl", "world",
]
