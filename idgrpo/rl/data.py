"""Which samples an epoch holds and on which rank: the distributed group sampler, and the gather that brings
per-sample values of every rank back into the global sample order.

    assignment = assign_epoch(num_rows=100, prompts_per_epoch=4, group_size=8, epoch=3, seed=0, rank=1, world_size=4)
    assignment.local_rows          # the dataset rows of this rank's 8 samples (of 32)
    rewards = all_gather_cat(local_rewards)   # (32,) in global sample order, on every rank

Under sequence parallelism (docs/scale-out.md) the samples are assigned to the data-parallel groups
(`rank=layout.dp_rank, world_size=layout.dp_size`): every rank of a group holds the group's samples, and
`all_gather_owned` gathers the values each rank computed for its share of them (the rewards it scored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EpochAssignment:
    """The global sample list of one epoch and this rank's contiguous slice of it (`assign_epoch`'s result).

        a = assign_epoch(10, prompts_per_epoch=2, group_size=4, epoch=0, seed=0, rank=1, world_size=2)
        a.row_ids[a.offset:a.offset + a.count] == a.local_rows    # this rank's 4 of the 8 samples
    """

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

    Every rank computes the same global list from (seed, epoch), so no communication is needed. A sample's noise
    seed is a function of (seed, epoch, position in the global list), so the same global batch gives the same samples
    on any world size. With `shared_initial_noise`, the samples of one group get one initial-latent seed (a function
    of seed, epoch and row; bit 62 set, which no step-noise seed has) and keep their own step-noise seeds.
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


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the equally-shaped tensors of every rank in rank order (the global sample order, since each rank
    holds a contiguous slice); the tensor itself on one rank. A collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_owned(t: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """`all_gather_cat` for a world of sequence-parallel groups of `group_size` consecutive ranks that hold the same
    n samples, where each rank computed only the entries i with i % group_size == its place in the group (the
    samples it decoded and scored; its other entries are ignored). Returns the (world / group_size · n, ...) values
    in global sample order, each from the rank that owns it. `all_gather_cat` itself for groups of one. A
    collective."""
    if group_size == 1:
        return all_gather_cat(t)
    rows = all_gather_cat(t[None]).unflatten(0, (-1, group_size))  # (dp, group, n, ...)
    i = torch.arange(t.shape[0], device=t.device)
    return rows[:, i % group_size, i].flatten(0, 1)
