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
from idgrpo.engine.dist import DistInfo, barrier, init_distributed, world
from idgrpo.engine.faults import InjectedFault
from idgrpo.engine.fsdp import FSDP
from idgrpo.engine.metrics import Metrics, progress, truncate_jsonl
from idgrpo.engine.optim import (
    NonFiniteError,
    NonFiniteGuard,
    build_optimizer,
    clip_grad_norm_,
    nonfinite_summary,
    step_if_finite,
    warmup_cosine,
)
from idgrpo.engine.rundir import RunDir, RunDirError, RunSettingsError, open_run

__all__ = [
    "CheckpointDamaged", "CheckpointError", "Checkpointer", "export_full_weights", "export_lora",
    "save_safetensors_atomic", "write_atomic",
    "DistInfo", "FSDP", "barrier", "build_optimizer", "clip_grad_norm_", "InjectedFault", "init_distributed",
    "Metrics", "NonFiniteError", "NonFiniteGuard", "nonfinite_summary", "progress", "RunDir", "RunDirError",
    "RunSettingsError", "open_run", "step_if_finite", "truncate_jsonl", "warmup_cosine", "world",
]
