"""Identity-GRPO trainer: SDE rollouts -> reward -> group advantages -> PPO-clipped update with a KL anchor.

Usage:
    idgrpo train-grpo tiny                                         # one CPU process, the toy policy (seconds)
    torchrun --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b --train-csv data/train.csv \
        --test-csv data/test.csv --weights-dir ckpt/Wan2.1-VACE-1.3B --vae-path ckpt/Wan2.1_VAE.pth \
        --prompt-cache cache/prompts --reward idgrpo.reward.factories:compact --extra reward_checkpoint=ckpt/rm
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b ...
    torchrun --nproc-per-node 8 -m idgrpo train-grpo vace-14b --sp-size 4 ...   # + sequence parallelism

In Python, `GRPOTrainer` takes ANY policy (`idgrpo.rl.Policy`), ANY reward (`idgrpo.rl.RewardFn`), a decoder
(`idgrpo.rl.DecodeFn`: latents -> uint8 frames) and a conditioning builder (prompt rows -> `Conditioning`, the
guidance branches); see its docstring.

One epoch (`train_epoch`), each phase in its module (with `sp_size` > 1, "rank" below means data-parallel group, whose
ranks share the group's samples; Note [sequence parallelism] and docs/scale-out.md):
1. data (`idgrpo.rl.data`): `prompts_per_epoch` rows are drawn (seeded by the epoch), each repeated G times; the P·G
   samples are shuffled and split evenly over the ranks. A sample's group id is its row index, its noise seed a
   function of (seed, epoch, position in the global list), so the same global batch gives the same samples on any
   world size. With `shared_initial_noise` a group's samples start from one initial latent;
2. rollout (`idgrpo.rl.rollout`): batches of `rollout_batch_size`; every finished batch is decoded and scored on a
   worker thread (its own CUDA stream) while the next batch is sampled; frames stay on the device. For the trained
   steps the rollout also keeps the SDE mean under the reference policy (adapters disabled), so training runs no
   reference forward. Result: an `EpochRollout`;
3. advantages (`idgrpo.rl.update.gather_advantages`): rewards are all-gathered; `group_advantage` normalises them
   per group (or globally) and clips them. Samples whose advantage is zero (zero-variance group, NaN reward, failed
   reward call) are dropped from the update and counted. This is the one host read between rollout and update;
4. update (`idgrpo.rl.update`): `plan_update` decides, from the gathered advantages alone, every rank's optimizer
   steps, micro-batches, weight-0 padding passes and loss weights (so the collectives stay matched and N ranks equal
   1 rank); per micro-batch and trained step `forward_backward_step` (`grpo_loss` on the recomputed velocity);
   gradients accumulate over micro-batches and steps (unsharded under FSDP `no_sync`, or reduce-scattered after
   every backward: `grad_accumulation`); then clip and AdamW through the engine's `step_if_finite` (an update that
   is not finite is skipped and counted; `max_undone_steps` in a row stop the run), and the EMA of the trainable
   weights (`idgrpo.rl.ema`).

Documented edge cases: a reward that is NaN/Inf gets advantage 0 (left out of its group's statistics); a reward call
that raises gives its whole batch NaN rewards (so: dropped), is logged and counted, and more than
`max_reward_failures` failures stop the run (`RewardError`); so does an epoch in which no sample got a finite reward;
an epoch in which every advantage is zero makes no optimizer step, and a run that ends without any optimizer step
raises `RewardError` (docs/reliability.md); a training plot that cannot be drawn is logged and counted, never raised.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from idgrpo.engine import (
    FSDP,
    Checkpointer,
    Metrics,
    NonFiniteGuard,
    build_optimizer,
    init_distributed,
    save_safetensors_atomic,
)
from idgrpo.engine.sequence_parallel import parallel_layout
from idgrpo.prompts import PromptRow
from idgrpo.rl.config import BaselineFlags, GRPOConfig
from idgrpo.rl.data import all_gather_owned, assign_epoch
from idgrpo.rl.ema import EMA
from idgrpo.rl.nft import OldPolicy, cfg_free, level_noise, nft_forward_backward_step, training_levels
from idgrpo.rl.plots import plot_training
from idgrpo.rl.rollout import DecodeFn, EpochRollout, RewardError, RewardFn, RewardWorker, roll_out
from idgrpo.rl.sampler import Conditioning, Policy, StepPlan, StepSchedule, sample
from idgrpo.rl.schedules import flow_schedule
from idgrpo.rl.timing import PhaseTimer, timed
from idgrpo.rl.update import (
    EpochAdvantages,
    Meters,
    forward_backward_step,
    gather_advantages,
    optimizer_step,
    plan_update,
    reference_mean,
)

ConditioningFn = Callable[[list[PromptRow]], Conditioning]
"""`build(rows) -> Conditioning`: one prompt row per sample (a group's row repeated) -> the batch's guidance branches,
their tensors batch-first on the training device (`idgrpo.rl.cfg_conditioning`, `phantom_conditioning`)."""

EpochCallback = Callable[["GRPOTrainer", dict], None]
"""`on_epoch_end(trainer, record)`: after an epoch is logged (and checkpointed when due); `record` is the epoch's
diagnostics (`reward_mean`, `kl`, `clipfrac`, ..., `eval_reward` when evaluated). Runs on every rank."""

EvalCallback = Callable[["GRPOTrainer", int, float], None]
"""`on_evaluate(trainer, epoch, eval_reward)`: after an evaluation (the mean reward over the evaluation rows, the
same on every rank). Runs on every rank."""


class GRPOTrainer:
    """Identity-GRPO on any velocity policy and any reward (see the module docstring for one epoch).

        from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow
        from idgrpo.rl.toy import ToyFlowPolicy, brightness_score, toy_conditioning, toy_decode

        config = GRPOConfig.from_name("tiny", epochs=3, eval_every=0, run_dir="runs/toy")
        shape = (4, 2, 8, 8)                                   # (C, F, H, W) of one sample's latent
        trainer = GRPOTrainer(config, ToyFlowPolicy(shape), score=brightness_score, decode=toy_decode,
                              build_conditioning=lambda rows: toy_conditioning([r.prompt for r in rows]),
                              latent_shape=shape, train_rows=[PromptRow("a red ball"), PromptRow("a cat")])
        history = trainer.train(on_epoch_end=lambda trainer, record: print(record["reward_mean"]))

    What you plug in:
    - policy: `idgrpo.rl.Policy`, `policy(latents (B, C, F, H, W) fp32, timestep (B,) int64 in [0, 1000) = int(σ·1000),
      **branch kwargs) -> velocity dx/dσ`, an `nn.Module` (wrapped in the engine's FSDP here unless it already is)
      whose parameters with requires_grad are trained (LoRA adapters, or everything for full fine-tuning);
    - score: `idgrpo.rl.RewardFn`, `score(frames uint8 (B, T, H, W, 3) on the device, references, prompts) -> (B,)`,
      called on a worker thread (no collectives) unless `config.overlap_reward` is off;
    - decode: `idgrpo.rl.DecodeFn`, latents (reference slots dropped) -> uint8 frames; runs where the reward runs;
    - build_conditioning: `ConditioningFn`, prompt rows -> the batch's `Conditioning`.

    Driving the loop: `train(on_epoch_end=..., on_evaluate=...)` runs every epoch with evaluation, metrics
    (`metrics.jsonl`), checkpoints and plots; `train_epoch(epoch)` runs one epoch alone (benchmarks pass
    `baseline=` and `timer=`); `state_dict()` / `load_state_dict()` snapshot and restore the training state in
    memory, `save()` / `load()` on disk.
    """

    def __init__(self, config: GRPOConfig, policy: nn.Module, *, score: RewardFn, decode: DecodeFn,
                 build_conditioning: ConditioningFn, latent_shape: Sequence[int], train_rows: Sequence[PromptRow],
                 eval_rows: Sequence[PromptRow] = (), reference: Policy | None = None, lora: bool | None = None,
                 log: Callable[[str], None] | None = None, eval_latent_shape: Sequence[int] | None = None,
                 build_eval_conditioning: ConditioningFn | None = None):
        """
        latent_shape: (C, F, H, W) of one sample's latent, reference slots included.
        eval_latent_shape, build_eval_conditioning: the same for evaluation, when it runs at another video size;
            default: the training ones.
        reference: the KL reference policy; default: the policy with its adapters disabled (config.reference
            "lora": `policy.adapters_disabled()` or `idgrpo.models.lora.disable_lora`) or a frozen copy ("copy").
        lora: whether the trainable weights are LoRA adapters (kept replicated by FSDP); default: detected.
        log: where progress lines go; default: print on rank 0.
        """
        self.config = config
        self.info = init_distributed()
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        self.log = log or (lambda msg: print(msg, flush=True) if self.rank == 0 else None)
        # Note [sequence parallelism]: samples are dealt to the data-parallel groups; a group's ranks share samples and
        # noise and split every sample's tokens; each sample is scored by one rank of its group; FSDP and the
        # optimizer span the whole world (docs/scale-out.md).
        self.layout = parallel_layout(config.sp_size)
        if self.layout.sp is not None:
            for module in (policy, reference):
                inner = module.module if isinstance(module, FSDP) else module
                if module is policy and not hasattr(inner, "set_sequence_parallel"):
                    raise ValueError(f"sp_size={config.sp_size} needs a policy that splits its token sequence "
                                     f"(`set_sequence_parallel`, as WanDiT); {type(inner).__name__} has none")
                if hasattr(inner, "set_sequence_parallel"):
                    inner.set_sequence_parallel(self.layout.sp)
        cd = torch.float32 if self.device.type == "cpu" else getattr(torch, config.compute_dtype)
        if lora is None:
            from idgrpo.models.lora import lora_modules

            lora = any(True for _ in lora_modules(policy))
        if reference is None and config.kl_beta > 0 and config.reference == "copy":
            frozen = copy.deepcopy(policy.module if isinstance(policy, FSDP) else policy).requires_grad_(False)
            reference = FSDP(frozen, compute_dtype=cd)
        if not isinstance(policy, FSDP):
            policy = FSDP(policy, compute_dtype=cd, replicate_trainable_below=(1 << 24) if lora else 0,
                          activation_checkpointing=config.activation_checkpointing)
        self.policy = policy
        mode = config.grad_accumulation
        if mode == "auto":
            sharded = any(g.trainable and not g.replicated for g in policy.groups)
            mode = "sharded" if sharded and self.world_size > 1 else "local"
        self.accumulate_locally = mode == "local"
        if reference is None and config.kl_beta > 0:
            reference = _adapters_disabled_policy(policy)
        self.reference = reference if config.kl_beta > 0 else None
        self.params = policy.trainable_parameters()
        self.optimizer = build_optimizer(self.params, lr=config.lr, betas=tuple(config.betas),
                                         weight_decay=config.weight_decay, eps=config.adam_eps)
        self.ema = EMA(self.params, config.ema_decay, config.ema_every, schedule=config.ema_schedule,
                       repeats=config.ema_repeats) if config.ema_decay > 0 else None
        self.score, self.decode = score, decode
        self.build_conditioning = build_conditioning
        self.latent_shape = tuple(latent_shape)
        self.eval_latent_shape = tuple(eval_latent_shape or latent_shape)
        self.build_eval_conditioning = build_eval_conditioning or build_conditioning
        self.train_rows, self.eval_rows = list(train_rows), list(eval_rows)
        if not self.train_rows:
            raise ValueError("no training rows")
        self.schedule = flow_schedule(config.num_steps, config.shift, config.grid)
        self.step_schedule = StepSchedule.build(self.schedule, self.device, noise_schedule=config.noise_schedule,
                                                noise_level=config.noise_level)
        self.eval_schedule = flow_schedule(config.eval_steps, config.shift, config.grid)
        self.run_dir = Path(config.run_dir)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=2, config=config)
        self.ema_checkpointer = Checkpointer(self.run_dir / "checkpoints_ema", keep=2)
        # DiffusionNFT (docs/objectives.md#training-with-nft): the old policy samples and anchors the loss.
        self.nft = config.objective == "nft"
        self.old = OldPolicy(self.params, config.nft_old_decay) if self.nft else None
        self.old_checkpointer = Checkpointer(self.run_dir / "checkpoints_old", keep=2) if self.nft else None
        self.optimizer_steps = 0
        self.reward_failures_total = 0
        self.skipped_updates = torch.zeros((), dtype=torch.long, device=self.device)
        self.undone = NonFiniteGuard(config.max_undone_steps, hint="lower --lr, or raise --max-undone-steps")
        self.plot_failures = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.reward_worker = RewardWorker(score, decode, self.device, overlap=config.overlap_reward)

    # -- one epoch -----------------------------------------------------------------------------------------------------

    def step_plan(self, epoch: int) -> StepPlan:
        """Which steps of epoch `epoch`'s rollouts are stochastic and which are trained."""
        cfg = self.config
        if self.nft:  # NFT keeps no SDE transition: with nft_solver "sde" every step is stochastic
            return StepPlan.build(cfg.num_steps)
        if cfg.sde_window_slide_every > 0 and cfg.sde_window_size > 0:
            return StepPlan.sliding(cfg.num_steps, cfg.sde_window_size, epoch, every=cfg.sde_window_slide_every,
                                    stride=cfg.sde_window_stride, timestep_fraction=cfg.timestep_fraction)
        return StepPlan.build(cfg.num_steps, window_start=cfg.sde_window_start, window_size=cfg.sde_window_size,
                              timestep_fraction=cfg.timestep_fraction)

    def train_epoch(self, epoch: int, *, baseline: BaselineFlags | None = None,
                    timer: PhaseTimer | None = None) -> dict:
        """Rollout, rewards, advantages, update; returns the epoch's diagnostics as floats. A collective.

        baseline: the benchmark's switches (`BaselineFlags`) for this epoch; None: the default path.
        timer: record the wall time of each phase (benchmarks; adds host syncs)."""
        cfg = self.config
        baseline = baseline or BaselineFlags()
        with self._sdpa_attention(baseline.sdpa_attention):
            rollout = self.rollout(epoch, baseline=baseline, timer=timer)
            with timed(timer, "advantage"):
                advantages = gather_advantages(rollout, std=cfg.adv_std, clip=cfg.adv_clip, sp_size=cfg.sp_size,
                                               keep="finite" if self.nft else "nonzero")
            with timed(timer, "update"):
                if self.nft:
                    meters = self.update_nft(rollout, advantages)
                    self.old.update(self.optimizer_steps)  # after the epoch, as the official script
                else:
                    meters = self.update(rollout, advantages, baseline=baseline)
        record = self._record(rollout, advantages, meters)
        self.undone.check(self.optimizer_steps)  # NonFiniteError after max_undone_steps undone steps in a row
        failures = int(record["reward_failures"])
        self.reward_failures_total += failures
        if self.reward_failures_total > cfg.max_reward_failures:
            raise RewardError(f"the reward call failed {self.reward_failures_total} times, more than "
                              f"--max-reward-failures {cfg.max_reward_failures}; see the first traceback above")
        samples = advantages.rewards.numel()
        if int(record["nonfinite_rewards"]) == samples:  # the same on every rank: the rewards are gathered
            raise RewardError(f"epoch {epoch}: none of the {samples} samples got a finite reward ({failures} reward "
                              f"calls raised, every other reward was NaN/Inf), so there is nothing to learn from; "
                              f"the run is stopped (docs/reliability.md)")
        return record

    def rollout(self, epoch: int, *, baseline: BaselineFlags | None = None,
                timer: PhaseTimer | None = None) -> EpochRollout:
        """Sample this rank's share of epoch `epoch` and score it."""
        cfg = self.config
        assignment = assign_epoch(len(self.train_rows), cfg.prompts_per_epoch, cfg.group_size, epoch=epoch,
                                  seed=cfg.seed, rank=self.layout.dp_rank, world_size=self.layout.dp_size,
                                  shared_initial_noise=cfg.shared_initial_noise)
        rows = [self.train_rows[i] for i in assignment.local_rows]
        with timed(timer, "rollout"):
            conditioning = self.build_conditioning(rows)
        if not self.nft:
            return roll_out(self.policy, conditioning, rows, assignment, self.step_plan(epoch), epoch=epoch,
                            schedule=self.schedule, steps=self.step_schedule, latent_shape=self.latent_shape,
                            batch_size=cfg.rollout_batch_size, rewards=self.reward_worker, reference=self.reference,
                            baseline=baseline, timer=timer, score_share=(self.layout.sp_rank, self.layout.sp_size))
        with self.old.swapped():  # NFT: CFG-free rollouts of the old policy, clean latents only
            return roll_out(self.policy, cfg_free(conditioning), rows, assignment, self.step_plan(epoch),
                            epoch=epoch, schedule=self.schedule, steps=self.step_schedule,
                            latent_shape=self.latent_shape, batch_size=cfg.rollout_batch_size,
                            rewards=self.reward_worker, baseline=baseline, timer=timer,
                            score_share=(self.layout.sp_rank, self.layout.sp_size), solver=cfg.nft_solver,
                            keep_states=False)

    def update(self, rollout: EpochRollout, advantages: EpochAdvantages, *,
               baseline: BaselineFlags | None = None) -> Meters:
        """The clipped GRPO update over the epoch's kept samples (`plan_update`): `inner_epochs` passes of
        `updates_per_epoch` optimizer steps each. Returns the update's meters (read with the epoch's record)."""
        cfg = self.config
        baseline = baseline or BaselineFlags()
        separate = baseline.separate_cfg_forwards
        meters = Meters(self.device)
        trained = list(rollout.plan.trained)
        passes = plan_update(advantages.kept, samples_per_rank=rollout.assignment.count, rank=self.layout.dp_rank,
                             world_size=self.layout.dp_size, micro_batch=cfg.train_batch_size,
                             updates_per_epoch=cfg.updates_per_epoch, trained_steps=len(trained), seed=cfg.seed,
                             epoch=rollout.epoch, inner_epochs=cfg.inner_epochs)
        # Baseline: no stored anchor; a reference forward per micro-batch and step recomputes it below.
        ref_at_train_time = rollout.ref_means is None and self.reference is not None
        padding = torch.zeros(1, dtype=torch.long, device=self.device)
        first_update_done = False
        for inner, update_pass in enumerate(passes):
            # One host-to-device copy per inner epoch; the micro-batches are device slices of it (no syncs).
            order = update_pass.order
            order = (order.pin_memory() if self.device.type == "cuda" else order).to(self.device, non_blocking=True)
            for step in update_pass.steps:
                for i, micro in enumerate(step):
                    # A padding pass runs on sample 0 with weight 0, so that the collectives stay matched.
                    idx = order[micro.start:micro.start + micro.size] if micro.size else padding
                    cond = rollout.conditioning.select(idx)
                    for j, k in enumerate(trained):
                        x, x_next = rollout.states[idx, j], rollout.states[idx, j + 1]
                        sigma, sigma_next, std, t = self.step_schedule.at(k, x.shape[0])
                        if ref_at_train_time:
                            ref_mean = reference_mean(self.reference, cond, x, t, sigma, sigma_next, std,
                                                      separate_branches=separate)
                        else:
                            ref_mean = None if rollout.ref_means is None else rollout.ref_means[idx, j]
                        last_backward = i == len(step) - 1 and j == len(trained) - 1
                        hold = self.accumulate_locally and not last_backward
                        with self.policy.no_sync() if hold else contextlib.nullcontext():
                            loss, stats = forward_backward_step(
                                self.policy, cond, x, x_next, rollout.log_probs[idx, j], advantages.advantages[idx],
                                t, sigma, sigma_next, std, ref_mean=ref_mean,
                                weight=micro.weight * self.layout.loss_scale, config=cfg, separate_branches=separate)
                        # Every rank meters the same names in the same order (weight 0 for padding passes).
                        meters.add("loss", loss, micro.size)
                        meters.add("clipfrac", stats["clipfrac"], micro.size)
                        meters.add("approx_kl", stats["approx_kl"], micro.size)
                        meters.add("kl", stats["kl"].mean(), micro.size)
                        deviation = (stats["ratio"] - 1).abs().max()
                        if inner == 0:
                            meters.max("max_abs_ratio_minus_1_first_inner", deviation, micro.size)
                        # Before the first optimizer step the policy is the rollout policy: this must be ~0.
                        meters.max("max_abs_ratio_minus_1_before_update", deviation,
                                   0 if first_update_done else micro.size)
                self._optimizer_step(meters)
                first_update_done = True
        return meters

    def update_nft(self, rollout: EpochRollout, advantages: EpochAdvantages) -> Meters:
        """The DiffusionNFT update over the epoch's samples with a finite reward (`idgrpo.rl.nft`): the plan of
        `plan_update` with the noise levels in place of GRPO's trained steps; per micro-batch and level a fresh
        forward-noising of the clean latents and `nft_forward_backward_step`. Returns the update's meters."""
        cfg = self.config
        meters = Meters(self.device)
        levels = cfg.nft_levels
        passes = plan_update(advantages.kept, samples_per_rank=rollout.assignment.count, rank=self.layout.dp_rank,
                             world_size=self.layout.dp_size, micro_batch=cfg.train_batch_size,
                             updates_per_epoch=cfg.updates_per_epoch, trained_steps=levels, seed=cfg.seed,
                             epoch=rollout.epoch, inner_epochs=cfg.inner_epochs)
        seeds = rollout.assignment.local_seeds
        shape = tuple(rollout.states.shape[2:])
        padding = torch.zeros(1, dtype=torch.long)
        for inner, update_pass in enumerate(passes):
            chosen = training_levels(seeds, num_steps=cfg.num_steps, levels=levels, inner=inner)  # (n, K) host
            order_host = update_pass.order
            order = (order_host.pin_memory() if self.device.type == "cuda" else order_host).to(self.device,
                                                                                                non_blocking=True)
            for step in update_pass.steps:
                for i, micro in enumerate(step):
                    # A padding pass runs on sample 0 with weight 0, so that the collectives stay matched.
                    host = order_host[micro.start:micro.start + micro.size] if micro.size else padding
                    idx = order[micro.start:micro.start + micro.size] if micro.size else padding.to(self.device)
                    cond = rollout.conditioning.select(idx)
                    x0 = rollout.states[idx, 0]
                    batch_seeds = [seeds[s] for s in host.tolist()]  # host tensor: no device sync
                    for j in range(levels):
                        k = chosen[host, j].to(self.device, non_blocking=True)
                        sigma, t = self.step_schedule.sigma[k], self.step_schedule.timesteps[k]
                        noise = level_noise(batch_seeds, shape, inner=inner, level=j, device=self.device)
                        last_backward = i == len(step) - 1 and j == levels - 1
                        hold = self.accumulate_locally and not last_backward
                        with self.policy.no_sync() if hold else contextlib.nullcontext():
                            loss, stats = nft_forward_backward_step(
                                self.policy, self.old, self.reference, cond, x0, noise, sigma, t,
                                advantages.advantages[idx], weight=micro.weight * self.layout.loss_scale,
                                config=cfg)
                        meters.add("loss", loss, micro.size)  # every rank: the same names in the same order
                        meters.add("old_deviation", stats["old_deviation"], micro.size)
                        if "velocity_kl" in stats:
                            meters.add("velocity_kl", stats["velocity_kl"], micro.size)
                self._optimizer_step(meters)
        return meters

    def _optimizer_step(self, meters: Meters) -> None:
        """Clip, step (skipped when not finite: `optimizer_step`), EMA, counters. The EMA and the step counter
        advance either way, so every rank keeps one schedule."""
        norm, skipped = optimizer_step(self.policy, self.optimizer, max_grad_norm=self.config.max_grad_norm)
        self.undone.update(skipped)
        if self.ema is not None:
            self.ema.step(self.optimizer_steps)
        self.optimizer_steps += 1
        meters.add("grad_norm", torch.where(skipped == 0, norm, torch.zeros_like(norm)), 1)
        meters.max("skipped_update", skipped)
        self.skipped_updates = self.skipped_updates + skipped.long()  # read with the epoch's record

    def _record(self, rollout: EpochRollout, advantages: EpochAdvantages, meters: Meters) -> dict:
        """The epoch's diagnostics, read from the device in one copy (a collective: the meters' reduction)."""
        rewards = advantages.rewards
        finite = torch.isfinite(rewards)
        count = finite.sum().clamp_min(1)
        r0 = torch.where(finite, rewards, torch.zeros_like(rewards))
        mean = r0.sum() / count
        std = (torch.where(finite, r0 - mean, torch.zeros_like(r0)).square().sum() / count).sqrt()
        nan = torch.tensor(float("nan"), device=self.device)
        summary = {
            "reward_mean": torch.where(finite.any(), mean, nan),
            "reward_std": torch.where(finite.any(), std, nan),
            "zero_std_fraction": advantages.groups.zero_std_fraction,
            "nonfinite_rewards": advantages.groups.nonfinite_count,
            "reward_failures": advantages.reward_failures,
            "skipped_updates_total": self.skipped_updates,
            **meters.means(),
        }
        values = torch.stack([v.to(self.device).float().reshape(()) for v in summary.values()]).cpu().tolist()
        kept = advantages.kept
        return {"epoch": rollout.epoch, **dict(zip(summary, values, strict=True)),
                "dropped": int((~kept).sum()), "trained_samples": int(kept.sum()),
                "sde_window_start": rollout.plan.window.start, "optimizer_steps": self.optimizer_steps}

    @contextlib.contextmanager
    def _sdpa_attention(self, on: bool):
        """The baseline's `sdpa_attention`: torch SDPA in the policy (and a frozen reference copy) for the duration,
        through the modules' `set_attention_impl`; their previous choice restored afterwards."""
        modules = [m.module if isinstance(m, FSDP) else m for m in (self.policy, self.reference)
                   if on and isinstance(m, nn.Module)]
        modules = [m for m in modules if hasattr(m, "set_attention_impl")]
        previous = [getattr(getattr(m, "config", None), "attention_impl", "idgrpo") for m in modules]
        try:
            for module in modules:
                module.set_attention_impl("sdpa")
            yield
        finally:
            for module, impl in zip(modules, previous, strict=True):
                module.set_attention_impl(impl)

    # -- evaluation ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, epoch: int) -> float:
        """Mean reward over the evaluation rows with fixed noise and the ODE solver (`eval_solver`, `eval_steps`)
        at the evaluation size (`eval_latent_shape`); writes sample videos. A collective."""
        cfg = self.config
        rows = self.eval_rows
        index, share = self.layout.sp_rank, self.layout.sp_size
        per_rank = math.ceil(len(rows) / self.layout.dp_size)
        # Rows past the end are padding (the last row again, never scored): every rank samples the same number of
        # batches, so that the policy's collectives (FSDP's gathers, sequence parallelism's all-to-alls) stay matched.
        mine = range(self.layout.dp_rank * per_rank, (self.layout.dp_rank + 1) * per_rank)
        swap = self.ema.swapped() if (self.ema is not None and cfg.eval_with_ema) else contextlib.nullcontext()
        rewards = torch.full((per_rank,), float("nan"), device=self.device)
        videos = []
        with swap:
            for start in range(0, per_rank, cfg.rollout_batch_size):
                ids = mine[start:start + cfg.rollout_batch_size]
                batch_rows = [rows[min(i, len(rows) - 1)] for i in ids]
                cond = self.build_eval_conditioning(batch_rows)
                cond = cfg_free(cond) if self.nft else cond  # NFT's policy is trained and evaluated CFG-free
                seeds = [10_000_019 + i for i in ids]  # fixed noise: the same per row at every evaluation
                roll = sample(self.policy, cond, self.eval_schedule, seeds, self.eval_latent_shape,
                              solver=cfg.eval_solver, device=self.device)
                # This rank decodes and scores every share-th real sample of its group's batch (all_gather_owned).
                first, real = (index - start) % share, max(0, min(len(ids), len(rows) - ids[0]))
                if first >= real:
                    continue
                scored = slice(first, real, share)
                frames = self.decode(cond.video_latents(roll.final)[scored])
                try:
                    scores = self.score(frames, [r.references for r in batch_rows[scored]],
                                        [r.prompt for r in batch_rows[scored]])
                    scores = torch.as_tensor(scores, device=self.device).float().reshape(-1)
                    rewards[start + first:start + real:share] = scores
                except Exception as e:  # noqa: BLE001 - an evaluation reward failure leaves NaN (ignored)
                    self.log(f"[train-grpo] evaluation reward failed: {e}")
                if self.rank == 0 and len(videos) < cfg.eval_videos:
                    videos += list(frames[: cfg.eval_videos - len(videos)])
        all_rewards = all_gather_owned(rewards, share)
        finite = all_rewards[torch.isfinite(all_rewards)]
        mean = float(finite.mean()) if finite.numel() else float("nan")
        if self.rank == 0:
            self._write_videos(epoch, videos)
        return mean

    def _write_videos(self, epoch: int, videos: list[torch.Tensor]) -> None:
        if not videos:
            return
        try:
            from idgrpo.media import write_video
        except ImportError as e:  # media is optional for the trainer (PyAV may be missing)
            self.log(f"[train-grpo] sample videos skipped: {e}")
            return
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, frames in enumerate(videos):
            for suffix in (".mp4", ".gif"):
                try:
                    write_video(folder / f"epoch{epoch:05d}_{i}{suffix}", frames.cpu())
                except Exception as e:  # noqa: BLE001 - a missing codec must not stop training
                    self.log(f"[train-grpo] could not write {suffix} sample: {e}")

    # -- the loop, plots -----------------------------------------------------------------------------------------------

    def train(self, *, on_epoch_end: EpochCallback | None = None,
              on_evaluate: EvalCallback | None = None) -> list[dict]:
        """Every remaining epoch (resuming from run_dir's newest checkpoint when `config.resume`): train, evaluate
        every `eval_every` epochs (and at the end), log (`metrics.jsonl`), checkpoint every `save_every` epochs (and
        at the end), plot at every evaluation and at the end. Returns the history of epoch records. A collective."""
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load()
        # The log holds each epoch once: records past the epoch this run starts from (a run stopped after its
        # checkpoint, or an earlier run in this directory) are dropped before they are written again.
        metrics = Metrics(self.run_dir, rank=self.rank, truncate_after=self.epoch - 1)
        try:
            for epoch in range(self.epoch, cfg.epochs):
                last = epoch + 1 == cfg.epochs
                record = self.train_epoch(epoch)
                evaluated = bool(cfg.eval_every and self.eval_rows and ((epoch + 1) % cfg.eval_every == 0 or last))
                if evaluated:
                    record["eval_reward"] = self.evaluate(epoch)
                self.history.append(record)
                self.epoch = epoch + 1
                for name, value in record.items():
                    metrics.add(name, float(value))
                metrics.flush(epoch)  # JSON lines (+ TensorBoard) on rank 0
                self.log(_format(record))
                if evaluated or last:
                    self.write_plots()
                if evaluated and on_evaluate is not None:
                    on_evaluate(self, epoch, record["eval_reward"])
                if (epoch + 1) % cfg.save_every == 0 or last:
                    self.save()
                if on_epoch_end is not None:
                    on_epoch_end(self, record)
            if self.optimizer_steps == 0:
                dropped = sum(int(r["dropped"]) for r in self.history)
                nonfinite = sum(int(r["nonfinite_rewards"]) for r in self.history)
                raise RewardError(f"no optimizer step in {len(self.history)} epochs: all {dropped} samples were "
                                  f"dropped ({nonfinite} with a NaN/Inf reward, the others in groups whose rewards "
                                  f"were all equal), so nothing was learned; the reward must vary within a group "
                                  f"(docs/reliability.md)")
        finally:
            metrics.close()
            self.reward_worker.close()
        return self.history

    def write_plots(self) -> Path | None:
        """The training curves of `history` as `run_dir/reward_curve.png` (`idgrpo.rl.plots`), on rank 0. Never
        raises: a plot that cannot be drawn is logged and counted in `plot_failures`, and training goes on."""
        if self.rank != 0:
            return None
        try:
            return plot_training(self.history, self.run_dir / "reward_curve.png",
                                 title=f"GRPO training, {self.run_dir.name}")
        except Exception as e:  # noqa: BLE001 - a plot must never stop a training run
            self.plot_failures += 1
            self.log(f"[train-grpo] could not write the training plot (failure {self.plot_failures}): "
                     f"{type(e).__name__}: {e}")
            return None

    # -- state, checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's training state in memory: its shards of the trainable weights, the optimizer's state, the EMA,
        the counters and the history. Live tensors, as torch's state_dicts: `copy.deepcopy` it for a snapshot.
        `load_state_dict` puts it back into a trainer of the same layout (world size, policy); `save()` and
        `load()` write and read checkpoints that any world size resumes from."""
        return {"params": [p.detach() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "epoch": self.epoch,
                "optimizer_steps": self.optimizer_steps, "skipped_updates": self.skipped_updates,
                "reward_failures_total": self.reward_failures_total, "history": self.history,
                "old": None if self.old is None else self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Copy a `state_dict()` into this trainer (the values are copied: `state` stays usable)."""
        shapes = [tuple(p.shape) for p in self.params]
        saved = [tuple(p.shape) for p in state["params"]]
        if saved != shapes:
            raise ValueError(f"state of trainable shards {saved} does not fit this trainer's {shapes} "
                             f"(another policy or world size?)")
        with torch.no_grad():
            for p, value in zip(self.params, state["params"], strict=True):
                p.copy_(value)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.old is not None:
            self.old.load_state_dict(state["old"])
        self.epoch, self.optimizer_steps = state["epoch"], state["optimizer_steps"]
        self.skipped_updates = state["skipped_updates"].clone()
        self.reward_failures_total = state["reward_failures_total"]
        self.history = list(state["history"])

    def save(self) -> None:
        """Checkpoint (the engine's crash-safe sharded format: trainable weights, optimizer, counters, history) and
        exports: the EMA weights (a second checkpoint, `ema.safetensors`) and the LoRA adapters in PEFT's and diffusers'
        formats (`lora/`, `lora_diffusers/`; the EMA's in `lora_ema/`, `lora_ema_diffusers/`; docs/lora.md). A
        collective: every rank calls it."""
        extra = {"epoch": self.epoch, "optimizer_steps": self.optimizer_steps, "history": self.history,
                 "reward_failures_total": self.reward_failures_total}
        # The checkpoint is written last: it is what makes an epoch complete, so a run stopped anywhere before it
        # resumes from the previous one and writes every export of this epoch again (even at the last epoch).
        if self.ema is not None:
            with self.ema.swapped():
                self.ema_checkpointer.save(self.epoch, self.policy, None, {"epoch": self.epoch})
                state = self.policy.full_state_dict(trainable_only=True)
                if self.rank == 0:
                    save_safetensors_atomic({k: v.contiguous() for k, v in state.items()},
                                            self.run_dir / "ema.safetensors")
                self._export_lora("lora_ema", state)
        if self.old is not None:  # NFT's old policy, the same way
            with self.old.swapped():
                self.old_checkpointer.save(self.epoch, self.policy, None, {"epoch": self.epoch})
        self._export_lora("lora")
        self.checkpointer.save(self.epoch, self.policy, self.optimizer, extra)

    def _export_lora(self, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """The policy's LoRA adapters as `<name>/` (PEFT) and `<name>_diffusers/` (diffusers), written by rank 0 from
        `state` (the gathered trainable weights; gathered here when None: then a collective). Nothing without LoRA."""
        from idgrpo.models.lora import lora_modules, save_diffusers_lora, save_peft

        module = self.policy.module
        if not any(True for _ in lora_modules(module)):
            return
        state = self.policy.full_state_dict(trainable_only=True) if state is None else state
        if self.rank == 0:
            save_peft(module, self.run_dir / name, tensors=state)
            save_diffusers_lora(module, self.run_dir / f"{name}_diffusers", tensors=state)

    def load(self) -> bool:
        """Resume from the newest checkpoint in run_dir that loads (a damaged newer one is reported and passed
        over), at any world size; returns whether it did. A collective."""
        loaded = self.checkpointer.load_latest(self.policy, self.optimizer)
        if loaded is None:
            return False
        step, extra = loaded
        path = self.checkpointer.loaded
        if self.ema is not None:
            ema_path = self.ema_checkpointer.directory / path.name
            if (ema_path / "index.json").is_file():
                with self.ema.swapped():  # the EMA's weights pass through the parameters into the shadow
                    self.ema_checkpointer.load(ema_path, self.policy)
                    shadow = [p.detach().float().clone() for p in self.params]
                self.ema.load_state_dict({"shadow": shadow})
            else:
                self.ema.reset()
        if self.old is not None:
            old_path = self.old_checkpointer.directory / path.name
            if (old_path / "index.json").is_file():
                with self.old.swapped():  # the old weights pass through the parameters, as the EMA's
                    self.old_checkpointer.load(old_path, self.policy)
                    weights = [p.detach().float().clone() for p in self.params]
                self.old.load_state_dict({"weights": weights})
            else:  # a GRPO checkpoint continued with NFT: the old policy starts at the trained weights
                self.old = OldPolicy(self.params, self.config.nft_old_decay)
        self.epoch, self.optimizer_steps = extra["epoch"], extra["optimizer_steps"]
        self.history = extra.get("history", [])
        self.reward_failures_total = extra.get("reward_failures_total", 0)
        self.log(f"[train-grpo] resumed from {path} (epoch {step})")
        return True


def export_run_lora(run_dir: Path, /, *, out: Path, format: Literal["peft", "diffusers"] = "diffusers",
                    ema: bool = False) -> int:
    """Write the LoRA adapters of a GRPO run directory in PEFT's or diffusers' format (docs/lora.md).

    idgrpo export-lora runs/vace --format diffusers --out wan_lora     # WanVACEPipeline.load_lora_weights("wan_lora")
    idgrpo export-lora runs/vace --format peft --ema --out peft_lora   # PeftModel.from_pretrained(model, "peft_lora")

    Reads RUN_DIR/lora (RUN_DIR/lora_ema with --ema), the PEFT export `GRPOTrainer.save` writes, older runs' too.

    Args:
        run_dir: The GRPO run directory (train-grpo's --run-dir).
        out: Directory to write (created when missing).
        format: "peft" (adapter_model.safetensors + adapter_config.json) or "diffusers"
            (pytorch_lora_weights.safetensors).
        ema: Export the EMA adapters instead of the trained ones.
    """
    from idgrpo.models.lora import ADAPTER_WEIGHTS, convert_peft_lora

    source = Path(run_dir) / ("lora_ema" if ema else "lora")
    if not (source / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{source / ADAPTER_WEIGHTS}: missing; {run_dir} is not a GRPO run directory with "
                                f"{'EMA ' if ema else ''}LoRA adapters saved")
    written = convert_peft_lora(source, out, format=format)
    print(f"[export-lora] {source} -> {written}")
    return 0


def _adapters_disabled_policy(policy: nn.Module) -> Policy:
    """The KL reference: the same module with its LoRA adapters switched off for the duration of the forward
    (`idgrpo.models.lora.disable_lora`, or the module's own `adapters_disabled()` context when it has no
    `LoRALinear`)."""
    from idgrpo.models.lora import disable_lora, lora_modules

    inner = policy.module if isinstance(policy, FSDP) else policy
    if any(True for _ in lora_modules(inner)):
        def toggle():
            return disable_lora(inner)
    elif hasattr(inner, "adapters_disabled"):
        toggle = inner.adapters_disabled
    else:
        raise ValueError("reference='lora' but the policy has no LoRA adapters (nothing to switch off): use "
                         "reference='copy' (a frozen copy) or pass a reference policy")

    def reference(latents, timestep, **kwargs):
        with toggle():
            return policy(latents, timestep, **kwargs)

    return reference


def _format(record: dict) -> str:
    keys = ("reward_mean", "reward_std", "zero_std_fraction", "dropped", "clipfrac", "approx_kl", "kl",
            "max_abs_ratio_minus_1_first_inner", "old_deviation", "velocity_kl", "grad_norm", "eval_reward")
    parts = [f"epoch {int(record['epoch'])}"] + [f"{k} {record[k]:.4g}" for k in keys if k in record]
    return "[train-grpo] " + "  ".join(parts)
