"""The update phase of a GRPO epoch: group advantages from the gathered rewards, the micro-batch plan, the
forward/backward step of one micro-batch at one trained step, and the optimizer step.

    advantages = gather_advantages(rollout, std="group", clip=5.0)
    for update_pass in plan_update(advantages.kept, samples_per_rank=8, rank=0, world_size=1, micro_batch=2,
                                   updates_per_epoch=2, trained_steps=24, seed=0, epoch=3, inner_epochs=1):
        for step in update_pass.steps:              # one optimizer step each
            for micro in step:                      # forward_backward_step per trained step, weighted by micro.weight
                ...
            optimizer_step(policy, optimizer, max_grad_norm=1.0)

Note [world-size invariance]: every rank draws the same permutation of the *global* kept samples and cuts it into
the same shares (one per optimizer step); a rank trains the samples of a share that it rolled out, in micro-batches,
and runs weight-0 passes when it has fewer micro-batches than the busiest rank, so the collectives of the update
stay matched. Each step's gradient is the mean over its share's samples and trained steps, whatever the number of
ranks, so N ranks take the optimizer steps of 1 rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from idgrpo.engine import clip_grad_norm_, step_if_finite
from idgrpo.kernels.group_advantage import GroupAdvantage, group_advantage
from idgrpo.kernels.grpo_loss import grpo_loss, grpo_step
from idgrpo.rl.config import GRPOConfig
from idgrpo.rl.data import all_gather_cat, all_gather_owned
from idgrpo.rl.rollout import EpochRollout
from idgrpo.rl.sampler import Conditioning, Policy, guided_velocity

# ----------------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EpochAdvantages:
    """The epoch's rewards of every rank and the advantages that decide the update.

        advantages = gather_advantages(rollout, std="group", clip=5.0)
        advantages.kept.sum()                  # samples the update trains on, over all ranks
    """

    rewards: torch.Tensor
    """(N,) fp32, every rank's rewards in global sample order."""
    advantages: torch.Tensor
    """(n,) fp32, this rank's samples' normalised, clipped advantages (0: not trained on)."""
    kept: torch.Tensor
    """(N,) bool on the host: the samples the update trains on (GRPO: advantage != 0; NFT: a finite reward); the
    same on every rank."""
    groups: GroupAdvantage
    """The kernel's per-group statistics (zero_std_fraction, nonfinite_count, ...)."""
    reward_failures: torch.Tensor
    """() fp32: reward calls that raised during the rollout, over all ranks."""


def gather_advantages(rollout: EpochRollout, *, std: str, clip: float, sp_size: int = 1,
                      keep: str = "nonzero") -> EpochAdvantages:
    """All-gather the rewards (a collective) and normalise them per group (`std` "group") or over the batch
    ("global"), clipped to ±clip. A NaN/Inf reward, a zero-variance group: advantage 0, so the sample is not trained.
    sp_size: the sequence-parallel group size; each reward then comes from the rank of its group that scored it
    (`all_gather_owned`), and the advantages are computed once per sample, identically on every rank.
    keep: which samples the update trains on: "nonzero" advantages (GRPO: a zero advantage contributes no gradient)
    or every "finite" reward (NFT: a zero advantage is r = 1/2, which still trains, as in the official script).

    This makes the epoch's one host read between rollout and update: which samples are kept, which decides the
    micro-batches."""
    assignment = rollout.assignment
    device = rollout.rewards.device
    failures = torch.tensor([float(rollout.reward_failures)], device=device)
    rewards = all_gather_owned(rollout.rewards, sp_size)  # (N,) in global sample order
    failures = all_gather_cat(failures).sum()
    group_ids = torch.tensor(assignment.row_ids, dtype=torch.int64, device=device)
    groups = group_advantage(rewards, group_ids, std=std, clip=clip, num_groups=len(set(assignment.row_ids)))
    local = groups.advantages[assignment.offset: assignment.offset + assignment.count]  # (n,)
    kept = groups.advantages != 0 if keep == "nonzero" else torch.isfinite(rewards)
    return EpochAdvantages(rewards=rewards, advantages=local, kept=kept.cpu(), groups=groups,
                           reward_failures=failures)


# ----------------------------------------------------------------------------------------------------------------------
# The micro-batch plan (pure: host tensors in, host tensors out)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an optimizer step on this rank: `UpdatePass.order[start:start + size]`.

        samples = update_pass.order[micro.start:micro.start + micro.size]   # local sample indices; none: padding
    """

    start: int
    size: int
    """Samples; 0 is a padding pass, run on local sample 0 with weight 0 so that this rank's collectives match the
    busiest rank's."""
    weight: float
    """The multiplier of the micro-batch's mean loss: world_size · size / (samples of the step's share · trained
    steps), so the step's gradient, averaged over ranks by the engine, is the mean over its share and steps."""


@dataclass(frozen=True)
class UpdatePass:
    """One inner epoch of the update on this rank.

        (update_pass,) = plan_update(torch.tensor([True, True, False, True]), samples_per_rank=4, rank=0,
                                     world_size=1, micro_batch=2, updates_per_epoch=1, trained_steps=3, seed=0,
                                     epoch=0, inner_epochs=1)
        [(m.size, m.weight) for m in update_pass.steps[0]]       # [(2, 2/9), (1, 1/9)]: 3 samples x 3 steps
    """

    order: torch.Tensor
    """(m,) int64 on the host: this rank's local sample indices in training order (all steps, concatenated)."""
    steps: list[list[MicroBatch]]
    """Per optimizer step, its micro-batches; every rank has the same number of steps and of micro-batches in each."""


def plan_update(kept: torch.Tensor, *, samples_per_rank: int, rank: int, world_size: int, micro_batch: int,
                updates_per_epoch: int, trained_steps: int, seed: int, epoch: int,
                inner_epochs: int) -> list[UpdatePass]:
    """Decide the update of one epoch (Note [world-size invariance]) from `kept` ((N,) bool, the gathered samples
    with a non-zero advantage; rank r rolled out samples r·n ... (r + 1)·n − 1 with n = samples_per_rank).

    Per inner epoch: the kept samples in a permutation seeded by (seed, epoch, inner), cut into
    min(updates_per_epoch, kept) shares of near-equal size; in each share, this rank's samples in micro-batches of
    `micro_batch`, padded to the busiest rank's count of micro-batches. No kept sample: no pass (no optimizer step).
    """
    kept_ids = kept.nonzero().flatten()  # global sample ids (the same on every rank)
    n_kept = kept_ids.numel()
    if n_kept == 0:
        return []
    shares = min(updates_per_epoch, n_kept)
    passes = []
    for inner in range(inner_epochs):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 997 + inner * 31)
        order = kept_ids[torch.randperm(n_kept, generator=gen)]
        parts = [order[c * n_kept // shares:(c + 1) * n_kept // shares] for c in range(shares)]
        mine = [part[part // samples_per_rank == rank] - rank * samples_per_rank for part in parts]  # local indices
        steps, start = [], 0
        for part, local in zip(parts, mine, strict=True):
            busiest = int(torch.bincount(part // samples_per_rank, minlength=world_size).max())
            scale = world_size / (part.numel() * trained_steps)
            micro = []
            for i in range(math.ceil(busiest / micro_batch)):
                size = max(0, min(micro_batch, local.numel() - i * micro_batch))
                micro.append(MicroBatch(start + i * micro_batch, size, scale * size))
            steps.append(micro)
            start += local.numel()
        passes.append(UpdatePass(torch.cat(mine), steps))
    return passes


# ----------------------------------------------------------------------------------------------------------------------
# Forward/backward and optimizer steps
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_mean(reference: Policy, conditioning: Conditioning, x: torch.Tensor, timestep: torch.Tensor,
                   sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor, *,
                   separate_branches: bool = False) -> torch.Tensor:
    """The KL anchor of one step recomputed by a reference forward (the benchmark baseline's
    `kl_reference_at_train_time`; the default path keeps it from the rollout): the mean of the SDE step under
    `reference`. The mean does not depend on the noise, so zeros stand in for it."""
    velocity = guided_velocity(reference, x, timestep, conditioning, separate_branches=separate_branches)
    return grpo_step(x, velocity, sigma, sigma_next, std, torch.zeros_like(x))[2]


def forward_backward_step(policy: Policy, conditioning: Conditioning, x: torch.Tensor, x_next: torch.Tensor,
                          old_log_probs: torch.Tensor, advantages: torch.Tensor, timestep: torch.Tensor,
                          sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor, *,
                          ref_mean: torch.Tensor | None, weight: float, config: GRPOConfig,
                          separate_branches: bool = False) -> tuple[torch.Tensor, dict]:
    """One micro-batch at one trained step: the guided velocity under the current policy, the clipped GRPO loss with
    its KL term against `ref_mean`, and backward of loss·weight (gradients accumulate into the policy's).

    x, x_next: (B, C, F, H, W) the stored states around the step; old_log_probs, advantages: (B,); timestep, sigma,
    sigma_next, std: (B,) per-sample step values. Returns the loss and `grpo_loss`'s statistics, detached."""
    velocity = guided_velocity(policy, x, timestep, conditioning, separate_branches=separate_branches)
    loss, stats = grpo_loss(x, x_next, velocity, old_log_probs, advantages, sigma, sigma_next, std, ref_mean=ref_mean,
                            clip_range=config.clip_range, adv_clip=config.adv_clip, kl_beta=config.kl_beta)
    (loss * weight).backward()
    return loss, stats


def optimizer_step(policy, optimizer: torch.optim.Optimizer, *, max_grad_norm: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the accumulated gradients, step, clear them. Returns the gradient norm before clipping and 1.0 when the
    update was skipped (0-d device tensors, no host read on CUDA's fused AdamW).

    Note [non-finite updates]: the engine's `step_if_finite` decides, for every trainer alike: a non-finite gradient
    norm (or, for the Adam family, an update that would leave a weight non-finite, e.g. an infinite learning rate)
    skips the step on every rank and leaves weights, moments and AdamW's step count as they were. Nothing is copied
    to be restored."""
    norm = clip_grad_norm_(policy, max_grad_norm)
    skipped = step_if_finite(optimizer, norm)
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


class Meters:
    """Per-epoch device-side accumulators (weighted means and maxima), reduced over ranks and read once per epoch.

        meters = Meters(device)
        meters.add("loss", loss, weight=batch)        # a weighted mean
        meters.max("max_ratio", ratio.max())          # a maximum
        meters.means()                                # {"loss": ..., "max_ratio": ...} over every rank (a collective)

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
        """Weighted means and maxima over every rank (a collective)."""
        names = sorted(self.sums)
        maxima = sorted(self.maxima)
        if not names and not maxima:
            return {}
        local = torch.stack([self.sums[k] for k in names] + [torch.tensor(self.counts[k], device=self.device)
                                                              for k in names] + [self.maxima[k] for k in maxima])
        rows = all_gather_cat(local[None])  # (world, 2·|names| + |maxima|)
        sums, counts = rows[:, :len(names)].sum(0), rows[:, len(names):2 * len(names)].sum(0)
        out = {k: sums[i] / counts[i].clamp_min(1e-12) for i, k in enumerate(names)}
        out.update({k: rows[:, 2 * len(names) + i].max() for i, k in enumerate(maxima)})
        return out
