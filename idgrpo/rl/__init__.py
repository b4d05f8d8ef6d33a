"""Flow-matching SDE/ODE sampling with log-probs and the GRPO trainer. Never imports
`idgrpo.reward`: the trainer receives a scoring callable.

- `schedules`: Wan / diffusers σ grids with shift, integer model timesteps, index_for_timestep semantics;
- `sampler`: guidance branches in one batched forward (CFG, CFG-free, Phantom's three passes), the SDE rollout with
  per-sample seeds and log-probs (`idgrpo.kernels.grpo_loss.grpo_step`), SDE windows, Euler and UniPC;
- `trainer`: `GRPOTrainer` (any velocity policy, any reward), `EMA`, the distributed group sampler;
- `config` / `recipe`: `GRPOConfig` presets and `idgrpo train-grpo`;
- `toy`: a tiny analytic flow policy, decoder and brightness reward (CPU demo, tests).
"""

from idgrpo.prompts import PromptRow, read_prompts
from idgrpo.rl.config import GRPOConfig
from idgrpo.rl.sampler import (
    Branch,
    Conditioning,
    Rollout,
    StepPlan,
    StepSchedule,
    cfg_conditioning,
    guided_velocity,
    phantom_conditioning,
    sample,
    unipc_sample,
)
from idgrpo.rl.schedules import FlowSchedule, flow_schedule
from idgrpo.rl.trainer import EMA, GRPOTrainer, assign_epoch

__all__ = [
    "EMA", "Branch", "Conditioning", "FlowSchedule", "GRPOConfig", "GRPOTrainer", "PromptRow", "Rollout", "StepPlan",
    "StepSchedule", "assign_epoch", "cfg_conditioning", "flow_schedule", "guided_velocity", "phantom_conditioning",
    "read_prompts", "sample", "unipc_sample",
]
