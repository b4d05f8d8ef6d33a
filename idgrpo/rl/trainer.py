"""Identity-GRPO trainer: SDE rollouts -> reward -> group advantages -> PPO-clipped update with a KL anchor.

Usage:
    idgrpo train-grpo tiny                                         # one CPU process, the toy demo (seconds)
    torchrun --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b --train-csv data/train.csv \
        --test-csv data/test.csv --weights-dir ckpt/Wan2.1-VACE-1.3B --vae-path ckpt/Wan2.1_VAE.pth \
        --prompt-cache cache/prompts --extra reward_checkpoint=ckpt/identity-rm
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b ...

In Python, `GRPOTrainer` takes ANY policy (`policy(latents, timestep, **conditioning) -> velocity`), ANY reward
(`score(frames uint8 (B, T, H, W, 3) on device, references, prompts) -> (B,)`), a decoder (latents -> uint8 frames),
and a conditioning builder (prompt rows -> `Conditioning`, i.e. the guidance branches).

One epoch:
1. group sampler: `prompts_per_epoch` rows are drawn (seeded by the epoch), each repeated G times; the P·G samples are
   shuffled and split evenly over the ranks. A sample's group id is its row index, its noise seed a function of
   (seed, epoch, position in the global list), so the same global batch gives the same samples on any world size.
   With `shared_initial_noise` a group's samples start from one initial latent (a function of seed, epoch, row) and
   differ only in their SDE noise;
2. rollout in batches of `rollout_batch_size`; every finished batch is decoded and scored on a worker thread (its own
   CUDA stream) while the next batch is sampled; frames stay on the device. For the trained steps the rollout also
   keeps the SDE mean under the reference policy (adapters disabled), so training runs no reference forward;
3. rewards are all-gathered; `group_advantage` normalises them per group (or globally) and clips them;
4. samples whose advantage is zero (zero-variance group, NaN reward, failed reward call) are dropped from the update
   and counted. This is the one host read of the epoch: it decides the micro-batches, and every rank derives the same
   number of micro-batches from the gathered advantages (ranks short of samples run weight-0 micro-batches), so the
   collectives of the update stay matched;
5. `inner_epochs` passes: per micro-batch and trained step, `grpo_loss` on the recomputed velocity; gradients
   accumulate over micro-batches and steps (unsharded under FSDP `no_sync`, or reduce-scattered into the shards
   after every backward: `grad_accumulation`), normalised so that N ranks equal 1 rank; clip, AdamW
   (an update whose gradient norm is non-finite is undone on the device and counted), EMA of the trainable weights.

Baseline mode (benchmarks only, `config.baseline`, `BaselineFlags`): switches that make an epoch run the way the
straightforward implementation does (SDPA attention, eager reference kernels, one forward per CFG branch, the KL
reference forward during the update, the reward read back from mp4 files, synchronous reward). Each computes the same
function; `bench/e2e.py` times both modes on the same trainer. `trainer.timer = PhaseTimer(device)` records per-phase
wall times (rollout / reward / advantage / update) at the cost of host syncs.

Documented edge cases: a reward that is NaN/Inf gets advantage 0 (left out of its group's statistics); a reward call
that raises gives its whole batch NaN rewards (so: dropped), is logged and counted, and `max_reward_failures` failures
abort the run; an epoch in which every advantage is zero makes no optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import struct
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from idgrpo.engine import FSDP, Metrics, build_optimizer, clip_grad_norm_, init_distributed
from idgrpo.engine.checkpoint import Checkpointer
from idgrpo.kernels.backend import ENV_VAR as KERNELS_ENV_VAR
from idgrpo.kernels.group_advantage import group_advantage
from idgrpo.kernels.grpo_loss import grpo_loss, grpo_step
from idgrpo.prompts import PromptRow
from idgrpo.rl.config import EMA_SCHEDULES, BaselineFlags, GRPOConfig
from idgrpo.rl.sampler import Conditioning, Policy, StepPlan, StepSchedule, guided_velocity, sample
from idgrpo.rl.schedules import flow_schedule

ScoreFn = Callable[[torch.Tensor, list, list], torch.Tensor]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochAssignment:
    """The global sample list of one epoch and this rank's contiguous slice of it."""

    row_ids: list[int]  # (N,) dataset row per sample (= group id)
    seeds: list[int]  # (N,) noise seed per sample
    offset: int  # this rank's first sample
    count: int  # samples per rank
    initial_seeds: list[int] | None = None  # (N,) seed of the initial latent, one per group; None: `seeds`

    @property
    def local_rows(self) -> list[int]:
        return self.row_ids[self.offset: self.offset + self.count]

    @property
    def local_seeds(self) -> list[int]:
        return self.seeds[self.offset: self.offset + self.count]

    @property
    def local_initial_seeds(self) -> list[int] | None:
        if self.initial_seeds is None:
            return None
        return self.initial_seeds[self.offset: self.offset + self.count]


def assign_epoch(num_rows: int, prompts_per_epoch: int, group_size: int, *, epoch: int, seed: int,
                 rank: int, world_size: int, shared_initial_noise: bool = False) -> EpochAssignment:
    """Distributed group sampler: draw rows (without replacement while possible), repeat each G times, shuffle, split.

    Every rank computes the same global list from (seed, epoch), so no communication is needed. With
    `shared_initial_noise`, the samples of one group get one initial-latent seed (a function of seed, epoch and row;
    bit 62 set, which no step-noise seed has) and keep their own step-noise seeds.
    """
    total = prompts_per_epoch * group_size
    if total % world_size:
        raise ValueError(f"prompts_per_epoch·group_size = {total} must be divisible by the world size {world_size}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    draws = []
    while len(draws) < prompts_per_epoch:
        draws += torch.randperm(num_rows, generator=gen).tolist()
    rows = [r for r in draws[:prompts_per_epoch] for _ in range(group_size)]
    order = torch.randperm(total, generator=gen).tolist()
    row_ids = [rows[i] for i in order]
    seeds = [(seed * 7_919 + epoch) * 1_000_033 + i for i in range(total)]
    initial = None
    if shared_initial_noise:
        initial = [((seed * 7_919 + epoch) * 1_000_033 + row) | (1 << 62) for row in row_ids]
    count = total // world_size
    return EpochAssignment(row_ids, seeds, rank * count, count, initial)


# ----------------------------------------------------------------------------------------------------------------------
# EMA of the trainable weights
# ----------------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters with the Flow-GRPO warm-up decay min(decay, (1 + g) / (10 + g)).

    `step(s)` follows optimizer step s (0-based). Schedules (`GRPOConfig.ema_schedule`, docs/recipe.md):
    - "interval": one update after steps every-1, 2·every-1, ... (every `every`-th step), with g = s;
    - "identity_grpo": the official script, whose EMA runs after every micro-batch with its count of optimizer steps
      taken, updating when count + 1 is a multiple of `every`: `repeats` updates (one per micro-batch of a step)
      after steps every-2, 2·every-2, ..., with g = s + 1 (the count)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, every: int, *, schedule: str = "interval",
                 repeats: int = 1):
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"EMA schedule {schedule!r}: expected one of {EMA_SCHEDULES}")
        self.params = list(params)
        self.decay, self.every, self.schedule, self.repeats = decay, every, schedule, repeats
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_after(self, optimizer_step: int) -> float | None:
        """The decay the update after optimizer step `optimizer_step` uses, or None when no update is due."""
        count = optimizer_step + 1 if self.schedule == "identity_grpo" else optimizer_step
        if (count + 1) % self.every:
            return None
        return min(self.decay, (1 + count) / (10 + count))

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        decay = self.decay_after(optimizer_step)
        if decay is None:
            return
        current = [p.detach().float() for p in self.params]
        for _ in range(self.repeats):
            torch._foreach_lerp_(self.shadow, current, 1.0 - decay)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily load the EMA weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)


# ----------------------------------------------------------------------------------------------------------------------
# Reward worker: decode + score overlapped with the next rollout batch
# ----------------------------------------------------------------------------------------------------------------------


class RewardWorker:
    """Runs decode + score on one background thread (with its own CUDA stream on GPU).

    Note: the reward then runs concurrently with the policy's forwards. A reward model that issues collectives
    (e.g. FSDP-sharded) would interleave them with the policy's in a rank-dependent order and hang: such a reward
    needs `overlap=False` (config `overlap_reward`), which scores inline.

    A call that raises yields NaN rewards for its batch and is counted in `failures` (the traceback is printed the
    first time). Frames never leave the device.
    """

    def __init__(self, score: ScoreFn, decode: DecodeFn, device: torch.device, *, overlap: bool = True):
        self.score, self.decode, self.device = score, decode, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if overlap else None
        self.stream = torch.cuda.Stream(device) if (device.type == "cuda" and overlap) else None
        self.failures = 0
        self.timed = False
        """Benchmarks: synchronize at the end of every call and add its wall time to `busy_s` (host syncs)."""
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def submit(self, latents: torch.Tensor, references: list, prompts: list, *, synchronous: bool = False,
               via_files: bool = False) -> Future:
        """Decode + score a batch, on the worker (or now, without overlap or with `synchronous`).
        via_files: round-trip the decoded frames through mp4 files first (`mp4_round_trip`; benchmark baseline)."""
        if self.pool is None or synchronous:  # no overlap: score now, on this thread and stream
            future = Future()
            future.set_result(self._run(latents, references, prompts, None, via_files, inline=True))
            return future
        ready = None
        if self.stream is not None:
            ready = torch.cuda.current_stream(self.device).record_event()
        return self.pool.submit(self._run, latents, references, prompts, ready, via_files)

    def _run(self, latents, references, prompts, ready, via_files=False, inline=False):
        batch = latents.shape[0]
        stream = None if inline else self.stream
        stream_ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with torch.no_grad(), stream_ctx:
            if ready is not None:
                stream.wait_event(ready)
                # The main thread may drop its reference while this stream still reads the latents: tell the
                # caching allocator not to reuse their memory before this stream's pending work is done.
                latents.record_stream(stream)
            try:
                frames = self.decode(latents)
                if via_files:
                    frames = mp4_round_trip(frames)
                rewards = self.score(frames, references, prompts)
                rewards = torch.as_tensor(rewards, device=latents.device).float().reshape(-1)
                if rewards.shape != (batch,):
                    raise ValueError(f"reward returned shape {tuple(rewards.shape)}, expected ({batch},)")
            except Exception:  # noqa: BLE001 - a reward crash must not kill the run; counted and logged
                with self._lock:
                    self.failures += 1
                    first = self.failures == 1
                if first:
                    print(f"[train-grpo] reward call failed (its batch gets NaN rewards and is dropped):\n"
                          f"{traceback.format_exc()}", file=sys.stderr)
                rewards = torch.full((batch,), float("nan"), device=latents.device)
            done = stream.record_event() if stream is not None else None
            if self.timed:
                if latents.is_cuda:
                    (stream or torch.cuda.current_stream(latents.device)).synchronize()
                with self._lock:
                    self.busy_s += time.perf_counter() - start
        return rewards, done

    def result(self, future: Future) -> torch.Tensor:
        rewards, done = future.result()
        if done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            rewards.record_stream(main)  # allocated on the reward stream, consumed (and freed) on the main one
        return rewards

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def mp4_round_trip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> the same frames after writing each sample to an mp4 file and reading it back, as a
    pipeline that scores saved videos does. Lossless RGB H.264 (libx264rgb, qp 0), so the frames come back exact:
    the round trip costs what the file path costs and changes nothing else."""
    import av

    from idgrpo.media import read_video

    out = torch.empty_like(frames)
    with tempfile.TemporaryDirectory(prefix="idgrpo-reward-") as folder:
        for i, video in enumerate(frames.cpu().numpy()):
            path = Path(folder) / f"sample{i}.mp4"
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream("libx264rgb", rate=16)
                stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "rgb24"
                stream.options = {"qp": "0"}
                for frame in video:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            out[i] = read_video(path).to(frames.device)
    return out


class PhaseTimer:
    """Wall seconds per named phase of an epoch, for benchmarks (`trainer.timer = PhaseTimer(device)`).

    It synchronizes the main CUDA stream at each phase boundary (host syncs: never installed in training runs); the
    reward worker's stream is not synchronized, so overlapped reward work stays overlapped."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

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

    def reset(self) -> None:
        self.seconds.clear()


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors of every rank in rank order (identity on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class GRPOTrainer:
    """Identity-GRPO on any velocity policy and any reward (see the module docstring)."""

    def __init__(self, config: GRPOConfig, policy: nn.Module, *, score: ScoreFn, decode: DecodeFn,
                 build_conditioning: Callable[[list[PromptRow]], Conditioning], latent_shape: Sequence[int],
                 train_rows: Sequence[PromptRow], eval_rows: Sequence[PromptRow] = (),
                 reference: Policy | None = None, lora: bool | None = None, compute_dtype: torch.dtype | None = None,
                 run_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                 eval_latent_shape: Sequence[int] | None = None,
                 build_eval_conditioning: Callable[[list[PromptRow]], Conditioning] | None = None):
        """
        policy: a module (wrapped in the engine's FSDP here unless it already is) whose trainable parameters are the
            ones with requires_grad (LoRA adapters, or everything for full fine-tuning).
        build_conditioning: rows (one per sample) -> the batch's `Conditioning` (guidance branches).
        latent_shape: (C, F, H, W) of one sample's latent, reference slots included.
        eval_latent_shape, build_eval_conditioning: the same for evaluation, when it runs at another video size
            (`config.eval_size`); default: the training ones.
        reference: the KL reference policy; default: the policy with its adapters disabled (config.reference
            "lora": `policy.adapters_disabled()` or `idgrpo.models.lora.disable_lora`) or a frozen copy ("copy").
        lora: whether the trainable weights are LoRA adapters (kept replicated by FSDP); default: detected.
        """
        self.cfg = config
        self.info = init_distributed()
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        self.log = log or (lambda msg: print(msg, flush=True) if self.rank == 0 else None)
        cd = compute_dtype or (torch.float32 if self.device.type == "cpu" else getattr(torch, config.compute_dtype))
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
        self.steps = StepSchedule.build(self.schedule, self.device, noise_schedule=config.noise_schedule,
                                        noise_level=config.noise_level)
        self.eval_schedule = flow_schedule(config.eval_steps, config.shift, config.grid)
        self.run_dir = Path(run_dir or config.run_dir)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=2, config=config)
        self.ema_checkpointer = Checkpointer(self.run_dir / "checkpoints_ema", keep=2)
        self.optimizer_steps = 0
        self.reward_failures_total = 0
        self.skipped_updates = torch.zeros((), dtype=torch.long, device=self.device)
        self.epoch = 0
        self.history: list[dict] = []
        self.rewards = RewardWorker(score, decode, self.device, overlap=config.overlap_reward)
        self.timer: PhaseTimer | None = None
        """Benchmarks only: per-phase wall times of each epoch (see `PhaseTimer`)."""

    # -- baseline mode (benchmark) -------------------------------------------------------------------------------------

    @property
    def baseline(self) -> BaselineFlags:
        """The baseline switches in force (`config.baseline`; read at every epoch, so a benchmark may change
        `trainer.cfg` between epochs)."""
        return self.cfg.baseline

    def _phase(self, name: str):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _baseline_mode(self):
        """Apply the epoch-wide baseline switches: SDPA attention in the policy (and a frozen reference copy) and the
        eager reference kernels (process-wide, through IDGRPO_KERNELS); both restored afterwards."""
        flags = self.baseline
        restore = []
        try:
            if flags.sdpa_attention:
                modules = [self.policy] + ([self.reference] if isinstance(self.reference, nn.Module) else [])
                for module in modules:
                    inner = module.module if isinstance(module, FSDP) else module
                    if hasattr(inner, "set_attention_impl"):
                        previous = getattr(getattr(inner, "config", None), "attention_impl", "idgrpo")
                        inner.set_attention_impl("sdpa")
                        restore.append(lambda inner=inner, previous=previous: inner.set_attention_impl(previous))
            if flags.eager_kernels:
                previous_env = os.environ.get(KERNELS_ENV_VAR)
                os.environ[KERNELS_ENV_VAR] = "reference"

                def restore_env(previous_env=previous_env):
                    if previous_env is None:
                        os.environ.pop(KERNELS_ENV_VAR, None)
                    else:
                        os.environ[KERNELS_ENV_VAR] = previous_env

                restore.append(restore_env)
            yield flags
        finally:
            for undo in reversed(restore):
                undo()

    # -- one epoch -----------------------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> StepPlan:
        cfg = self.cfg
        if cfg.sde_window_slide_every > 0 and cfg.sde_window_size > 0:
            return StepPlan.sliding(cfg.num_steps, cfg.sde_window_size, epoch, every=cfg.sde_window_slide_every,
                                    stride=cfg.sde_window_stride, timestep_fraction=cfg.timestep_fraction)
        return StepPlan.build(cfg.num_steps, window_start=cfg.sde_window_start, window_size=cfg.sde_window_size,
                              timestep_fraction=cfg.timestep_fraction)

    def rollout(self, epoch: int):
        """Sample this rank's share of the epoch and score it. Returns (assignment, conditioning, plan, rollout
        tensors {states (n, K+1, ...), log_probs (n, K), ref_means (n, K, ...) | None}, local rewards (n,))."""
        cfg = self.cfg
        assignment = assign_epoch(len(self.train_rows), cfg.prompts_per_epoch, cfg.group_size, epoch=epoch,
                                  seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                  shared_initial_noise=cfg.shared_initial_noise)
        rows = [self.train_rows[i] for i in assignment.local_rows]
        seeds, initial_seeds = assignment.local_seeds, assignment.local_initial_seeds
        flags = self.baseline
        with self._phase("rollout"):
            conditioning = self.build_conditioning(rows)
        plan = self.plan(epoch)
        batch = cfg.rollout_batch_size
        # Baseline: the KL anchor is recomputed in the update rather than kept from the rollout.
        reference = None if flags.kl_reference_at_train_time else self.reference
        states, log_probs, ref_means, pending = [], [], [], []
        for start in range(0, len(rows), batch):
            part = slice(start, min(start + batch, len(rows)))
            cond = conditioning.select(part)
            with self._phase("rollout"):
                roll = sample(self.policy, cond, self.schedule, seeds[part], self.latent_shape, plan=plan,
                              steps=self.steps, reference=reference, device=self.device,
                              separate_branches=flags.separate_cfg_forwards,
                              initial_seeds=initial_seeds[part] if initial_seeds is not None else None)
            states.append(roll.states)
            log_probs.append(roll.log_probs)
            if roll.ref_means is not None:
                ref_means.append(roll.ref_means)
            with self._phase("reward"):
                pending.append(self.rewards.submit(cond.video_latents(roll.final),
                                                   [r.references for r in rows[part]], [r.prompt for r in rows[part]],
                                                   synchronous=flags.synchronous_reward,
                                                   via_files=flags.reward_via_files))
        with self._phase("reward"):  # with overlap: only the reward time the rollout did not hide
            rewards = torch.cat([self.rewards.result(p) for p in pending])  # (n,)
        data = {"states": torch.cat(states), "log_probs": torch.cat(log_probs),
                "ref_means": torch.cat(ref_means) if ref_means else None}
        return assignment, conditioning, plan, data, rewards

    def train_epoch(self, epoch: int) -> dict:
        """Rollout, rewards, advantages, update; returns the epoch's diagnostics as floats."""
        cfg = self.cfg
        with self._baseline_mode():
            failures_before = self.rewards.failures
            assignment, conditioning, plan, data, rewards = self.rollout(epoch)
            with self._phase("advantage"):
                failures = torch.tensor([float(self.rewards.failures - failures_before)], device=self.device)
                rewards_all = _all_gather_cat(rewards)  # (N,) in global sample order
                failures_all = _all_gather_cat(failures).sum()
                group_ids = torch.tensor(assignment.row_ids, dtype=torch.int64, device=self.device)
                adv = group_advantage(rewards_all, group_ids, std=cfg.adv_std, clip=cfg.adv_clip,
                                      num_groups=len(set(assignment.row_ids)))
                advantages = adv.advantages[assignment.offset: assignment.offset + assignment.count]  # (n,)
                # The one host read between rollout and update: which samples are trained (decides the
                # micro-batches).
                keep_all = (adv.advantages != 0).cpu()
            meters = _Meters(self.device)
            with self._phase("update"):
                self.update(epoch, plan, conditioning, data, advantages, keep_all, assignment, meters)

        finite = torch.isfinite(rewards_all)
        count = finite.sum().clamp_min(1)
        r0 = torch.where(finite, rewards_all, torch.zeros_like(rewards_all))
        mean = r0.sum() / count
        std = (torch.where(finite, r0 - mean, torch.zeros_like(r0)).square().sum() / count).sqrt()
        nan = torch.tensor(float("nan"), device=self.device)
        summary = {
            "reward_mean": torch.where(finite.any(), mean, nan),
            "reward_std": torch.where(finite.any(), std, nan),
            "zero_std_fraction": adv.zero_std_fraction,
            "nonfinite_rewards": adv.nonfinite_count,
            "reward_failures": failures_all,
            "skipped_updates_total": self.skipped_updates,
            **meters.means(),
        }
        values = torch.stack([v.to(self.device).float().reshape(()) for v in summary.values()]).cpu().tolist()
        record = {"epoch": epoch, **dict(zip(summary, values, strict=True)),
                  "dropped": int((~keep_all).sum()), "trained_samples": int(keep_all.sum()),
                  "sde_window_start": plan.window.start, "optimizer_steps": self.optimizer_steps}
        self.reward_failures_total += int(record["reward_failures"])
        if self.reward_failures_total > cfg.max_reward_failures:
            raise RuntimeError(f"the reward call failed {self.reward_failures_total} times "
                               f"(max_reward_failures={cfg.max_reward_failures}); see the first traceback above")
        return record

    def update(self, epoch, plan, conditioning, data, advantages, keep_all, assignment, meters) -> None:
        """The clipped GRPO update over the epoch's kept samples, `inner_epochs` passes of `updates_per_epoch`
        optimizer steps each. Note [world-size invariance]: every rank draws the same permutation of the *global*
        kept samples and cuts it into the same `chunks` (one per optimizer step); a rank trains the samples of a chunk
        that it rolled out, in micro-batches of train_batch_size, and runs weight-0 passes when it has fewer
        micro-batches than the busiest rank. Each step's gradient is the mean over its chunk's samples and trained
        steps, whatever the number of ranks, so N ranks take the optimizer steps of 1 rank."""
        cfg = self.cfg
        world, n_local = self.world_size, assignment.count
        kept = keep_all.nonzero().flatten()  # global sample ids, on the host (the same on every rank)
        n_kept = kept.numel()
        if n_kept == 0:
            return  # every advantage is zero: nothing to learn from this epoch (counted in `dropped`)
        mb = cfg.train_batch_size
        chunks = min(cfg.updates_per_epoch, n_kept)
        trained = list(plan.trained)
        K = len(trained)
        states, log_probs, ref_means = data["states"], data["log_probs"], data["ref_means"]
        separate = self.baseline.separate_cfg_forwards
        # Baseline: no stored anchor; a reference forward per micro-batch and step recomputes it below.
        ref_at_train_time = ref_means is None and self.reference is not None
        padding = torch.zeros(1, dtype=torch.long, device=self.device)
        first_update_done = False
        for inner in range(cfg.inner_epochs):
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 997 + inner * 31)
            order = kept[torch.randperm(n_kept, generator=gen)]
            parts = [order[c * n_kept // chunks:(c + 1) * n_kept // chunks] for c in range(chunks)]
            mine = [part[part // n_local == self.rank] - assignment.offset for part in parts]  # local indices
            # One host-to-device copy per inner epoch; the micro-batches are device slices of it (no syncs).
            flat = torch.cat(mine)
            flat_dev = (flat.pin_memory() if self.device.type == "cuda" else flat).to(self.device, non_blocking=True)
            start = 0
            for part, local in zip(parts, mine, strict=True):
                num_micro = math.ceil(int(torch.bincount(part // n_local, minlength=world).max()) / mb)
                # Gradient = Σ over the chunk's samples and trained steps of the per-sample loss / (n_chunk·K); the
                # FSDP reduction averages over ranks, hence the factor `world`.
                scale = world / (part.numel() * K)
                order_dev = flat_dev[start:start + local.numel()]
                start += local.numel()
                for i in range(num_micro):
                    size = max(0, min(mb, local.numel() - i * mb))
                    weight = scale * size
                    # A rank out of kept samples runs a weight-0 pass on sample 0, so the collectives stay matched.
                    idx_dev = order_dev[i * mb: i * mb + size] if size else padding
                    cond = conditioning.select(idx_dev)
                    for j, k in enumerate(trained):
                        final_backward = i == num_micro - 1 and j == K - 1
                        hold = self.accumulate_locally and not final_backward
                        sync = self.policy.no_sync() if hold else contextlib.nullcontext()
                        x = states[idx_dev, j]
                        x_next = states[idx_dev, j + 1]
                        batch = x.shape[0]
                        sigma, sigma_next, std, t = self.steps.at(k, batch)
                        if ref_at_train_time:
                            with torch.no_grad():
                                ref_velocity = guided_velocity(self.reference, x, t, cond, separate_branches=separate)
                                # The SDE mean does not depend on the noise: zeros stand in for it.
                                ref_mean = grpo_step(x, ref_velocity, sigma, sigma_next, std, torch.zeros_like(x))[2]
                        else:
                            ref_mean = None if ref_means is None else ref_means[idx_dev, j]
                        with sync:
                            velocity = guided_velocity(self.policy, x, t, cond, separate_branches=separate)
                            loss, stats = grpo_loss(x, x_next, velocity, log_probs[idx_dev, j], advantages[idx_dev],
                                                    sigma, sigma_next, std, ref_mean=ref_mean,
                                                    clip_range=cfg.clip_range, adv_clip=cfg.adv_clip,
                                                    kl_beta=cfg.kl_beta)
                            (loss * weight).backward()
                        # Every rank meters the same names in the same order (weight 0 for padding passes).
                        real = batch if weight > 0 else 0
                        meters.add("loss", loss, real)
                        meters.add("clipfrac", stats["clipfrac"], real)
                        meters.add("approx_kl", stats["approx_kl"], real)
                        meters.add("kl", stats["kl"].mean(), real)
                        deviation = (stats["ratio"] - 1).abs().max()
                        if inner == 0:
                            meters.max("max_abs_ratio_minus_1_first_inner", deviation, real)
                        # Before the first optimizer step the policy is the rollout policy: this must be ~0.
                        meters.max("max_abs_ratio_minus_1_before_update", deviation, 0 if first_update_done else real)
                self._optimizer_step(meters)
                first_update_done = True

    def _optimizer_step(self, meters: _Meters) -> None:
        """Clip, step and EMA; a non-finite gradient norm undoes the step on the device (no host sync) and is
        counted. (AdamW's step counter still advances, which only shifts its bias correction.)"""
        norm = clip_grad_norm_(self.policy, self.cfg.max_grad_norm)
        ok = torch.isfinite(norm)
        state_tensors = [t for p in self.params for t in self.optimizer.state.get(p, {}).values()
                         if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device == ok.device
                         and t.ndim > 0]
        backup = [t.detach().clone() for t in self.params + state_tensors]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t, b in zip(self.params + state_tensors, backup, strict=True):
                t.copy_(torch.where(ok, t, b))
        if self.ema is not None:
            self.ema.step(self.optimizer_steps)
        self.optimizer_steps += 1
        meters.add("grad_norm", torch.where(ok, norm, torch.zeros_like(norm)), 1)
        meters.max("skipped_update", (~ok).float())
        self.skipped_updates = self.skipped_updates + (~ok).long()  # read with the epoch's record

    # -- evaluation ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, epoch: int) -> float:
        """Mean reward over the evaluation rows with fixed noise and the ODE solver (`eval_solver`, `eval_steps`)
        at the evaluation size (`eval_latent_shape`); writes sample videos."""
        cfg = self.cfg
        rows = self.eval_rows
        per_rank = math.ceil(len(rows) / self.world_size)
        mine = list(range(self.rank * per_rank, min(len(rows), (self.rank + 1) * per_rank)))
        swap = self.ema.swapped() if (self.ema is not None and cfg.eval_with_ema) else contextlib.nullcontext()
        rewards = torch.full((per_rank,), float("nan"), device=self.device)
        videos = []
        with swap:
            for start in range(0, len(mine), cfg.rollout_batch_size):
                ids = mine[start:start + cfg.rollout_batch_size]
                batch_rows = [rows[i] for i in ids]
                cond = self.build_eval_conditioning(batch_rows)
                seeds = [10_000_019 + i for i in ids]  # fixed noise: the same per row at every evaluation
                roll = sample(self.policy, cond, self.eval_schedule, seeds, self.eval_latent_shape,
                              solver=cfg.eval_solver, device=self.device)
                frames = self.decode(cond.video_latents(roll.final))
                try:
                    scores = self.score(frames, [r.references for r in batch_rows], [r.prompt for r in batch_rows])
                    scores = torch.as_tensor(scores, device=self.device).float().reshape(-1)
                    rewards[start:start + len(ids)] = scores
                except Exception as e:  # noqa: BLE001 - an evaluation reward failure leaves NaN (ignored)
                    self.log(f"[train-grpo] evaluation reward failed: {e}")
                if self.rank == 0 and len(videos) < cfg.eval_videos:
                    videos += list(frames[: cfg.eval_videos - len(videos)])
        all_rewards = _all_gather_cat(rewards)
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

    # -- loop, checkpoints ---------------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load()
        metrics = Metrics(self.run_dir, rank=self.rank)
        try:
            for epoch in range(self.epoch, cfg.epochs):
                record = self.train_epoch(epoch)
                if cfg.eval_every and self.eval_rows and ((epoch + 1) % cfg.eval_every == 0 or
                                                          epoch + 1 == cfg.epochs):
                    record["eval_reward"] = self.evaluate(epoch)
                self.history.append(record)
                self.epoch = epoch + 1
                for name, value in record.items():
                    metrics.add(name, float(value))
                metrics.flush(epoch)  # JSON lines (+ TensorBoard) on rank 0
                self.log(_format(record))
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                    self.save()
        finally:
            metrics.close()
            self.rewards.close()
        return self.history

    def save(self) -> None:
        """Checkpoint (the engine's crash-safe sharded format: trainable weights, optimizer, counters, history) and
        exports: the EMA weights (a second checkpoint, `ema.safetensors`), the LoRA adapters in PEFT's and diffusers'
        formats (`lora/`, `lora_diffusers/`; the EMA's in `lora_ema/`, `lora_ema_diffusers/`; docs/lora.md), the reward
        curve. A collective: every rank calls it."""
        extra = {"epoch": self.epoch, "optimizer_steps": self.optimizer_steps, "history": self.history,
                 "reward_failures_total": self.reward_failures_total}
        if self.ema is not None:  # saved first: the main checkpoint is what makes a step complete
            with self.ema.swapped():
                self.ema_checkpointer.save(self.epoch, self.policy, None, {"epoch": self.epoch})
                state = self.policy.full_state_dict(trainable_only=True)
                if self.rank == 0:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in state.items()}, str(self.run_dir / "ema.safetensors"))
                self._export_lora("lora_ema", state)
        self.checkpointer.save(self.epoch, self.policy, self.optimizer, extra)
        self._export_lora("lora")
        if self.rank == 0:
            write_curve_png(self.run_dir / "reward_curve.png", self.history)

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
        """Resume from the newest complete checkpoint in run_dir (any world size); returns whether it did."""
        path = self.checkpointer.latest()
        if path is None:
            return False
        step = int(path.name.split("_")[-1])
        if self.ema is not None:
            ema_path = self.ema_checkpointer.directory / path.name
            if (ema_path / "index.json").is_file():
                with self.ema.swapped():
                    self.ema_checkpointer.load(ema_path, self.policy)
                    shadow = [p.detach().float().clone() for p in self.params]
            else:
                shadow = None
        _, extra = self.checkpointer.load(path, self.policy, self.optimizer)
        if self.ema is not None:
            self.ema.shadow = shadow or [p.detach().float().clone() for p in self.params]
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


class _Meters:
    """Per-epoch device-side accumulators (weighted means and maxima), reduced over ranks and read once per epoch.

    Every rank must record the same names in the same order; weight-0 records are ignored (padding passes).
    """

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor, weight: float) -> None:
        value = value.detach().float().reshape(()) * weight if weight else torch.zeros((), device=self.device)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0.0) + weight

    def max(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        value = value.detach().float().reshape(()) if weight else torch.zeros((), device=self.device)
        self.maxima[name] = torch.maximum(self.maxima[name], value) if name in self.maxima else value

    def means(self) -> dict[str, torch.Tensor]:
        names = sorted(self.sums)
        maxima = sorted(self.maxima)
        if not names and not maxima:
            return {}
        local = torch.stack([self.sums[k] for k in names] + [torch.tensor(self.counts[k], device=self.device)
                                                              for k in names] + [self.maxima[k] for k in maxima])
        rows = _all_gather_cat(local[None])  # (world, 2·|names| + |maxima|)
        sums, counts = rows[:, :len(names)].sum(0), rows[:, len(names):2 * len(names)].sum(0)
        out = {k: sums[i] / counts[i].clamp_min(1e-12) for i, k in enumerate(names)}
        out.update({k: rows[:, 2 * len(names) + i].max() for i, k in enumerate(maxima)})
        return out


def _format(record: dict) -> str:
    keys = ("reward_mean", "reward_std", "zero_std_fraction", "dropped", "clipfrac", "approx_kl", "kl",
            "max_abs_ratio_minus_1_first_inner", "grad_norm", "eval_reward")
    parts = [f"epoch {int(record['epoch'])}"] + [f"{k} {record[k]:.4g}" for k in keys if k in record]
    return "[train-grpo] " + "  ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Reward curve PNG (no plotting dependency)
# ----------------------------------------------------------------------------------------------------------------------


def _png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (H, W, 3) -> PNG file bytes (filter 0 per row, zlib)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].contiguous().numpy().tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _draw_line(img: torch.Tensor, x0: int, y0: int, x1: int, y1: int, color) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for s in range(steps + 1):
        x = round(x0 + (x1 - x0) * s / steps)
        y = round(y0 + (y1 - y0) * s / steps)
        img[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = torch.tensor(color, dtype=torch.uint8)


# 3x5 pixel glyphs (rows top to bottom) for the curve's labels: digits, number signs and the few capitals used.
_GLYPHS = {ch: rows.split() for ch, rows in {
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 111 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 001 001 001",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111", "-": "000 000 111 000 000", "+": "000 010 111 010 000",
    ".": "000 000 000 000 010", " ": "000 000 000 000 000", "A": "010 101 111 101 101", "C": "111 100 100 100 111",
    "D": "110 101 101 101 110", "E": "111 100 111 100 111", "H": "101 101 111 101 101", "I": "111 010 010 010 111",
    "L": "100 100 100 100 111", "N": "110 101 101 101 101", "O": "111 101 101 101 111", "P": "111 101 111 100 100",
    "R": "110 101 110 101 101", "T": "111 010 010 010 010", "V": "101 101 101 101 010", "W": "101 101 101 111 101",
}.items()}


def _text_width(text: str, scale: int) -> int:
    return len(text) * 4 * scale - scale


def _draw_text(img: torch.Tensor, x: int, y: int, text: str, scale: int = 2, color=(0, 0, 0)) -> None:
    """Draw `text` (characters of _GLYPHS; others as blanks) with its top-left corner at (x, y), clipped."""
    h, w, _ = img.shape
    ink = torch.tensor(color, dtype=torch.uint8)
    for i, ch in enumerate(text.upper()):
        rows = _GLYPHS.get(ch, _GLYPHS[" "])
        for r, bits in enumerate(rows):
            for c, bit in enumerate(bits):
                if bit == "1":
                    x0, y0 = x + (4 * i + c) * scale, y + r * scale
                    if 0 <= x0 and 0 <= y0 and x0 + scale <= w and y0 + scale <= h:
                        img[y0:y0 + scale, x0:x0 + scale] = ink


def _label(v: float) -> str:
    text = f"{v:.3g}"
    if "e" in text:  # 3x5 glyphs have no "e": fall back to fixed point
        text = f"{v:.4f}".rstrip("0").rstrip(".")
    return text


def write_curve_png(path: str | Path, history: list[dict], *, width: int = 480, height: int = 240) -> Path | None:
    """Plot the training reward mean (blue) and the evaluation reward (red) per epoch as a PNG. From 200x120
    pixels up, the axes are labelled (reward range, first and last epoch) and the series named."""
    spec = (("reward_mean", "TRAIN", (31, 119, 180)), ("eval_reward", "EVAL", (214, 39, 40)))
    series = [([h["epoch"] for h in history if _finite(h.get(key))], [h[key] for h in history if _finite(h.get(key))],
               color, name) for key, name, color in spec]
    series = [s for s in series if s[0]]
    values = [v for _, ys, _, _ in series for v in ys]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    epochs = [e for xs, _, _, _ in series for e in xs]
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
    labelled = width >= 200 and height >= 120
    scale = 2
    y_labels = [_label(hi), _label(lo)]
    left = max(16, max(_text_width(t, scale) for t in y_labels) + 10) if labelled else 16
    top, right, bottom = 16, 16, (16 + 8 * scale + 6 if labelled else 16)
    img = torch.full((height, width, 3), 255, dtype=torch.uint8)
    img[top:height - bottom + 1, left] = 0
    img[height - bottom, left:width - right] = 0

    def to_px(e, v):
        x = left + (e - e0) / (e1 - e0) * (width - left - right - 1)
        y = height - bottom - (v - lo) / (hi - lo) * (height - top - bottom - 1)
        return round(x), round(y)

    if labelled:
        glyph_h = 5 * scale
        ticks = list(zip(y_labels, (hi, lo), strict=True))
        if lo < 0 < hi:  # a dotted zero line, labelled where it does not crowd the range labels
            _, zy = to_px(e0, 0.0)
            img[zy, left + 1:width - right:3] = 160
            if min(abs(zy - to_px(e0, hi)[1]), abs(zy - to_px(e0, lo)[1])) > glyph_h + 2:
                ticks.append(("0", 0.0))
        for text, v in ticks:
            _, py = to_px(e0, v)
            img[py, left - 4:left] = 0  # tick
            _draw_text(img, left - 6 - _text_width(text, scale), min(max(0, py - glyph_h // 2), height - glyph_h), text)
        base = height - bottom + 5
        for e in (e0, max(epochs)):
            px, _ = to_px(e, lo)
            img[height - bottom:height - bottom + 4, px] = 0
            text = _label(e)
            _draw_text(img, min(max(0, px - _text_width(text, scale) // 2), width - _text_width(text, scale)), base,
                       text)
        _draw_text(img, (width - _text_width("EPOCH", scale)) // 2, base, "EPOCH")
        legend_x = width - right
        for _, _, color, name in reversed(series):
            legend_x -= _text_width(name, scale) + 3 * scale + 16
            img[2:2 + 3 * scale, legend_x:legend_x + 3 * scale] = torch.tensor(color, dtype=torch.uint8)
            _draw_text(img, legend_x + 3 * scale + 4, 2, name, color=color)
        _draw_text(img, left + 4, 2, "REWARD")

    for xs, ys, color, _ in series:
        points = [to_px(e, v) for e, v in zip(xs, ys, strict=True)]
        for (ax, ay), (bx, by) in zip(points, points[1:]):
            _draw_line(img, ax, ay, bx, by, color)
        for px, py in points:
            img[max(0, py - 2):py + 2, max(0, px - 2):px + 2] = torch.tensor(color, dtype=torch.uint8)
    path = Path(path)
    path.write_bytes(_png_bytes(img))
    return path


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
