"""Wall time per phase of a GRPO epoch, for benchmarks (`bench/e2e.py`): it adds host syncs, so training runs
never use it.

    timer = PhaseTimer(trainer.device)
    trainer.train_epoch(epoch, timer=timer)
    timer.seconds            # {"rollout": ..., "reward": ..., "advantage": ..., "update": ...}
    timer.reward_busy_s      # the reward worker's own time, overlapped or not
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Wall seconds per named phase of an epoch.

        timer = PhaseTimer("cpu")
        with timer("rollout"):
            ...
        timer.seconds["rollout"]

    It synchronizes the main CUDA stream at each phase boundary; the reward worker's stream is not synchronized, so
    overlapped reward work stays overlapped ("reward" is then the reward time the rollout did not hide). The reward
    worker adds its own wall time per call, synchronized on its stream, to `reward_busy_s`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)
        self.reward_busy_s = 0.0
        self._lock = threading.Lock()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def add_reward_busy(self, seconds: float) -> None:
        """Called by the reward worker's thread."""
        with self._lock:
            self.reward_busy_s += seconds


def timed(timer: PhaseTimer | None, name: str):
    """`timer(name)`, or nothing when no timer is given."""
    return timer(name) if timer is not None else contextlib.nullcontext()
