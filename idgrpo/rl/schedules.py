"""Flow-matching σ schedules of Wan2.1 (docs/models.md#flow-matching).

Forward process x_σ = (1 − σ)·x0 + σ·ε; σ = 1 is pure noise; stepping runs from σ_0 ≈ 1 down to 0.
Every grid is a base grid shifted by shift(σ) = s·σ / (1 + (s − 1)·σ), then 0 is appended:

- "diffusers": `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)`, the scheduler shipped with the
  diffusers Wan2.1 / VACE pipelines, hence Identity-GRPO's: base linspace(1, 0.001, N+1)[:N], σ_0 = 1 − 1e-6.
- "wan": the Wan2.1 original `FlowUniPCMultistepScheduler` (also Phantom): base linspace(0.999, 0, N+1)[:N].
- "wan_dpm": the Wan2.1 `dpm++` path: base linspace(1, 0, N+1)[:N].

Note: the model's timestep input is the integer `timesteps[i] = int64(σ_i · 1000)` (truncated, computed in float64
as the schedulers do) while the stepping uses the float32 σ. The two must not be mixed up
(docs/models.md#pitfall-integer-timestep-float-sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GRIDS = ("diffusers", "wan", "wan_dpm")
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """shift(σ) = s·σ / (1 + (s − 1)·σ): s > 1 spends more steps at high noise."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """A sampling grid: `sigmas` (N+1,) fp32 ending in 0, `timesteps` (N,) int64 model inputs.

        schedule = flow_schedule(25, shift=3.0, grid="diffusers")
        schedule.sigmas[0], schedule.timesteps[0]     # ≈ 1.0 and 999
    """

    sigmas: torch.Tensor  # (N + 1,) fp32, strictly decreasing for the usual shifts, sigmas[-1] == 0
    timesteps: torch.Tensor  # (N,) int64, int(σ_i · 1000)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def index_for_timestep(self, timestep: int) -> int:
        """Position of the integer `timestep` in `timesteps`, the SECOND match when it occurs more than once.

        This is the diffusers scheduler's `index_for_timestep`, which the Flow-GRPO / Identity-GRPO SDE step calls
        at every step to find σ = sigmas[idx] and σ' = sigmas[idx + 1]
        (docs/models.md#pitfall-identity-grpo-noise-scale-and-log-prob-mean). With duplicated integer timesteps
        (many steps, large shift) both occurrences therefore step from the later σ.
        """
        matches = (self.timesteps == int(timestep)).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {timestep} is not in the schedule {self.timesteps.tolist()}")
        return matches[1] if len(matches) > 1 else matches[0]

    def step_indices(self) -> list[int]:
        """For step k, the σ index the reference SDE step uses: `index_for_timestep(timesteps[k])` (usually k)."""
        return [self.index_for_timestep(t) for t in self.timesteps.tolist()]

    def step_sigmas(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_k, σ'_k) per step k, both (N,) fp32, with the reference indexing semantics of `step_indices`."""
        idx = torch.tensor(self.step_indices(), dtype=torch.long)
        return self.sigmas[idx].to(device), self.sigmas[idx + 1].to(device)


def flow_schedule(num_steps: int, shift: float, grid: str = "diffusers") -> FlowSchedule:
    """The σ grid of `grid` ∈ GRIDS with `num_steps` steps and flow shift `shift` (see the module docstring)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if grid == "diffusers":
        base = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)[:-1]
    elif grid == "wan":
        base = np.linspace(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, 0.0, num_steps + 1)[:-1]
    elif grid == "wan_dpm":
        base = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    else:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    sigmas = shift_sigmas(base, shift)
    if grid == "diffusers" and abs(sigmas[0] - 1.0) < 1e-6:
        # diffusers avoids log(alpha = 1 - σ) = -inf in UniPC's first update; the timestep becomes 999.
        sigmas[0] -= 1e-6
    timesteps = (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return FlowSchedule(sigmas=torch.from_numpy(sigmas), timesteps=torch.from_numpy(timesteps))
