"""Flow-matching SDE/ODE sampling with log-probs and the GRPO trainer. Never imports `idgrpo.reward`: the trainer
receives a scoring callable (`RewardFn`).

    from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow
    trainer = GRPOTrainer(GRPOConfig(...), my_policy, score=my_reward, decode=my_decoder,
                          build_conditioning=my_conditioning, latent_shape=(16, 9, 30, 52), train_rows=rows)
    trainer.train(on_epoch_end=lambda trainer, record: print(record["reward_mean"]))

Files, one responsibility each:
- `config`: `GRPOConfig` (the algorithm), `RecipeConfig` (train-grpo's models, data, reward) and their presets,
  `BaselineFlags` (the end-to-end benchmark's switches);
- `schedules`: Wan / diffusers σ grids with shift, integer model timesteps, index_for_timestep semantics;
- `sampler`: the `Policy` contract, guidance branches in one batched forward (CFG, CFG-free, Phantom's three
  passes), the SDE rollout with per-sample seeds and log-probs, SDE windows, Euler and UniPC;
- `data`: the distributed group sampler (`assign_epoch`) and the gather back into global sample order;
- `rollout`: the `RewardFn` / `DecodeFn` contracts, the reward worker, `EpochRollout`, `roll_out`;
- `update`: group advantages, the micro-batch planner (`plan_update`), the forward/backward and optimizer steps;
- `ema`: the EMA of the trainable weights; `timing`: `PhaseTimer` (benchmarks); `plots`: the training curves;
- `trainer`: `GRPOTrainer`, the loop over those phases, checkpoints and exports;
- `objectives`: training losses as pure functions (DiffusionNFT); `nft`: DiffusionNFT's update phase (the old
  policy, training levels, one micro-batch's step) for `GRPOConfig(objective="nft")`;
- `recipe`: `idgrpo train-grpo` (builds the policy, decoder, conditioning and reward of a `RecipeConfig`);
- `toy`: a tiny analytic flow policy, decoder and brightness reward (CPU demo, tests).
"""

from idgrpo.prompts import PromptRow, read_prompts
from idgrpo.rl.config import BaselineFlags, GRPOConfig, RecipeConfig
from idgrpo.rl.plots import plot_training
from idgrpo.rl.rollout import DecodeFn, EpochRollout, RewardError, RewardFn
from idgrpo.rl.sampler import (
    Branch,
    Conditioning,
    Policy,
    Rollout,
    cfg_conditioning,
    phantom_conditioning,
    sample,
    unipc_sample,
)
from idgrpo.rl.schedules import FlowSchedule, flow_schedule
from idgrpo.rl.timing import PhaseTimer
from idgrpo.rl.trainer import ConditioningFn, EpochCallback, EvalCallback, GRPOTrainer

__all__ = [
    "BaselineFlags", "Branch", "Conditioning", "ConditioningFn", "DecodeFn", "EpochCallback", "EpochRollout",
    "EvalCallback", "FlowSchedule", "GRPOConfig", "GRPOTrainer", "PhaseTimer", "Policy", "PromptRow", "RecipeConfig",
    "RewardError", "RewardFn", "Rollout", "cfg_conditioning", "flow_schedule", "phantom_conditioning", "plot_training",
    "read_prompts", "sample", "unipc_sample",
]
