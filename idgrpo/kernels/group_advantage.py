"""Group-relative advantages for GRPO: normalise each reward inside its prompt group.

A group is one prompt row together with its reference images, identified by an integer id
per sample (never by the prompt text: two rows sharing a prompt but not their references
are different groups). For each group (and each reward column when rewards are (N, T)):

    mean = mean of the group's finite rewards
    std  = population std of the group's finite rewards   (ddof=1 with unbiased=True)
           or, with std="global", the std of every finite reward in the batch
    A    = clip((r - mean) / (std + eps), -clip, clip)

These are the semantics of Flow-GRPO's `PerPromptStatTracker` (population std + 1e-4,
per column) followed by its advantage clamp. Degenerate cases are defined, not NaN:

- a non-finite reward (NaN / ±Inf) is left out of every statistic, gets advantage 0
  and is counted in `nonfinite_count`;
- a group whose finite rewards are all equal (this includes a group of one sample and a
  group with no finite reward) has std 0, every advantage in it is exactly 0, and it is
  counted in `zero_std_fraction`.

Group ids are arbitrary int64 values (unsorted, not contiguous); per-group outputs are
indexed by the compacted id, i.e. the order of `torch.unique(group_ids)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from idgrpo.kernels.backend import resolve


class GroupAdvantage(NamedTuple):
    advantages: torch.Tensor  # (N,) or (N, T) fp32
    group_mean: torch.Tensor  # (G,) or (G, T) fp32, over the group's finite rewards
    group_std: torch.Tensor  # (G,) or (G, T) fp32, the group's own std (even with std="global")
    group_count: torch.Tensor  # (G,) or (G, T) int64, finite rewards per group
    zero_std_fraction: torch.Tensor  # () or (T,) fp32, fraction of groups whose std is 0
    nonfinite_count: torch.Tensor  # () int64, non-finite rewards in the batch


def _check(rewards: torch.Tensor, group_ids: torch.Tensor, std: str, eps: float, clip: float | None):
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (N, T), got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape[:1]:
        raise ValueError(f"group_ids must be ({rewards.shape[0]},), got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if std not in ("group", "global"):
        raise ValueError(f"std={std!r}: expected 'group' or 'global'")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")


def group_advantage_reference(rewards, group_ids, *, std="group", eps=1e-4, unbiased=False, clip=5.0,
                              num_groups=None) -> GroupAdvantage:
    """Plain PyTorch, computed in float64 (fp32 inputs) or the input's dtype if wider."""
    _check(rewards, group_ids, std, eps, clip)
    squeeze = rewards.ndim == 1
    r = rewards.reshape(rewards.shape[0], -1)  # (N, T)
    r = r.to(torch.promote_types(r.dtype, torch.float64))
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups_found = int(inverse.max()) + 1 if inverse.numel() else 0
    if num_groups is not None and num_groups != num_groups_found:
        raise ValueError(f"num_groups={num_groups} but group_ids holds {num_groups_found} distinct ids")
    G, T = num_groups_found, r.shape[1]
    finite = torch.isfinite(r)
    r0 = torch.where(finite, r, torch.zeros_like(r))
    index = inverse[:, None].expand_as(r)

    def group_sum(values):
        return torch.zeros(G, T, dtype=values.dtype).index_add_(0, inverse, values)

    count = group_sum(finite.to(r.dtype))  # (G, T)
    mean = group_sum(r0) / count.clamp_min(1)
    centered = torch.where(finite, r0 - mean.gather(0, index), torch.zeros_like(r))
    ddof = 1 if unbiased else 0
    var = group_sum(centered.square()) / (count - ddof).clamp_min(1)
    inf = torch.full_like(r, math.inf)
    gmax = torch.full((G, T), -math.inf, dtype=r.dtype).scatter_reduce(0, index, torch.where(finite, r, -inf), "amax")
    gmin = torch.full((G, T), math.inf, dtype=r.dtype).scatter_reduce(0, index, torch.where(finite, r, inf), "amin")
    zero_std = (count <= ddof) | ~(gmax > gmin)  # all finite rewards equal (or none / too few)
    group_std = torch.where(zero_std, torch.zeros_like(var), var.sqrt())

    if std == "global":
        n = finite.sum(0).to(r.dtype)  # (T,)
        gmean = r0.sum(0) / n.clamp_min(1)
        gc = torch.where(finite, r0 - gmean, torch.zeros_like(r))
        denom = (gc.square().sum(0) / (n - ddof).clamp_min(1)).sqrt()[None, :]
    else:
        denom = group_std.gather(0, index)
    adv = (r0 - mean.gather(0, index)) / (denom + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    adv = torch.where(finite & ~zero_std.gather(0, index), adv, torch.zeros_like(adv))

    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    result = GroupAdvantage(
        advantages=adv.to(out_dtype),
        group_mean=mean.to(out_dtype),
        group_std=group_std.to(out_dtype),
        group_count=count.to(torch.int64),
        zero_std_fraction=zero_std.to(out_dtype).mean(0),
        nonfinite_count=(~finite).sum().to(torch.int64),
    )
    if squeeze:
        result = result._replace(advantages=result.advantages[:, 0], group_mean=result.group_mean[:, 0],
                                 group_std=result.group_std[:, 0], group_count=result.group_count[:, 0],
                                 zero_std_fraction=result.zero_std_fraction[0])
    return result


def group_advantage(rewards, group_ids, *, std="group", eps=1e-4, unbiased=False, clip=5.0, num_groups=None,
                    backend=None) -> GroupAdvantage:
    """Group-normalised, clipped advantages and per-group statistics (see the module docstring).

    rewards: (N,) or (N, T) float on any device; group_ids: (N,) integer ids.
    num_groups: the number of distinct ids when the caller knows it. Passing it keeps the
    Triton path free of host syncs; without it the wrapper reads that one number back.
    """
    resolve(backend, rewards, group_ids)  # validates `backend`; the Triton kernel is not in yet
    return group_advantage_reference(rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip,
                                     num_groups=num_groups)
