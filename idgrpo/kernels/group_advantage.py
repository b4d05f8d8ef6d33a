"""Group-relative advantages for GRPO: normalise each reward inside its prompt group.

A group is one prompt row together with its reference images, identified by an integer id
per sample (never by the prompt text: two rows sharing a prompt but not their references
are different groups). For each group (and each reward column when rewards are (N, T)):

    mean = mean of the group's finite rewards
    std  = population std of the group's finite rewards   (ddof=1 with unbiased=True)
           or, with std="global", the std of every finite reward in the batch
    A    = clip((r - mean) / (std + eps), -clip, clip)

These are the semantics of the `PerPromptStatTracker` of Flow-GRPO and Identity-GRPO
(float64 NumPy, `np.std` with its default ddof=0, + 1e-4, per column) followed by the
trainer's advantage clamp. Which samples get an advantage of exactly 0 matters: the official
trainer and `idgrpo.rl.trainer` both drop samples whose advantages are all zero. So both
paths reproduce the formula's zeros, and degenerate cases are defined, not NaN:

- a non-finite reward (NaN / ±Inf) is left out of every statistic, gets advantage 0
  and is counted in `nonfinite_count`;
- a group whose finite rewards are all equal (this includes a group of one sample and a
  group with no finite reward) has std 0, every advantage in it is exactly 0 (the
  formula's value; with eps=0 it would be 0/0), and it is counted in `zero_std_fraction`.
  A group with two different finite rewards is never zeroed as a whole, however close the
  rewards are: its advantages follow the formula.

Numerics. The reference computes in float64. The Triton kernel works in fp32 and stays close
to the float64 formula on the fp32 rewards whatever their common offset. A one-pass
E[r^2] - E[r]^2, or even a plain fp32 mean, loses everything below ~6e-8 * |mean| (at a mean
of 1e4 that is ~6e-4 of reward, the size of a near-tied group's spread) and can round a
near-tied group's mean onto the tied value, zeroing those samples. The kernel instead shifts
by the smallest finite reward s and carries the mean as s + offset: d = r - s is exact when r
and s agree to within a factor of two (Sterbenz) and otherwise off by one rounding of a number
no larger than the range R of the rewards; offset is the mean of the d, the centred value is
(r - s) - offset, and the std comes from a second pass over centred values divided by R (in
[-1, 1], so their squares neither overflow nor underflow). Every error is thus a multiple,
growing with the group size n, of fp32 roundings of R, never of |mean|. As R <= sqrt(2n) std,
an advantage is off by O(n^1.5 * 6e-8 * (1 + |A|)): a few 1e-7 for GRPO-sized groups, and
the tests hold it to 1e-5 at offsets up to 1e6. Tied rewards give d = 0 exactly, so an
all-equal group comes out exactly 0 by construction, and a reward exactly at a representable
mean gets an exact 0, as in float64. std="global" uses the same scheme over the whole batch.

Group ids are arbitrary int64 values (unsorted, not contiguous); per-group outputs are
indexed by the compacted id, i.e. the order of `torch.unique(group_ids)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from idgrpo.kernels.backend import interpreting, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path works without triton
    triton = None


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
    zero_std = ~(gmax > gmin)  # all finite rewards equal, or none (count <= ddof implies this)
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


# ---------------------------------------------------------------------------------------------
# Triton: samples are sorted by group id on device (sort + cumsum + scatter, no host read);
# then ONE launch with one program per (group, block of reward columns) walks its members in
# sorted order. Each statistic is the shifted two-pass form of the module docstring's
# "Numerics": pass 1 count/min/max, pass 2 sum of (r - min), pass 3 range-scaled centred
# squares, then a last pass writes the advantages. Every sum runs in a fixed order in fp32, so
# the result is deterministic. With std="global" each program also runs passes 1-3 over the
# whole batch (positions 0..N of the same sorted order, the same block size), so every program
# arrives at bit-identical global statistics.

if triton is not None:

    @triton.jit
    def _load_sorted(rewards_ptr, perm_ptr, k, end, cols, col_mask, T, BLOCK: tl.constexpr):
        """Rewards at sorted positions k..k+BLOCK (masked at `end`), their offsets and finiteness."""
        rows = k + tl.arange(0, BLOCK)
        row_mask = rows < end
        idx = tl.load(perm_ptr + rows, mask=row_mask, other=0)
        mask = row_mask[:, None] & col_mask[None, :]
        offs = idx[:, None] * T + cols[None, :]
        r = tl.load(rewards_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        finite = mask & (tl.abs(r) < float("inf"))  # false for NaN too
        return r, finite, mask, offs

    @triton.jit
    def _shifted_stats(rewards_ptr, perm_ptr, start, end, cols, col_mask, T,
                       DDOF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
        """Statistics of the finite rewards at sorted positions start..end, per column.

        Returns (count, nonfinite, shift, offset, std, zero_std) where mean = shift + offset:
        `shift` is the smallest finite reward, so `offset` and every centred value are small
        numbers computed without the cancellation a large common offset would cause.
        """
        count = tl.zeros((BLOCK_T,), tl.int32)
        nonfinite = tl.zeros((BLOCK_T,), tl.int32)
        hi = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        lo = tl.full((BLOCK_T,), float("inf"), tl.float32)
        for k in range(start, end, BLOCK):
            r, finite, mask, offs = _load_sorted(rewards_ptr, perm_ptr, k, end, cols, col_mask, T, BLOCK)
            count += tl.sum(finite.to(tl.int32), axis=0)
            nonfinite += tl.sum((mask & ~finite).to(tl.int32), axis=0)
            hi = tl.maximum(hi, tl.max(tl.where(finite, r, float("-inf")), axis=0))
            lo = tl.minimum(lo, tl.min(tl.where(finite, r, float("inf")), axis=0))
        # hi > lo is false exactly when all finite rewards are equal (or there are none); such a
        # group has std 0 and every advantage in it is exactly 0, also when eps is 0.
        zero_std = ~(hi > lo)
        shift = tl.where(count > 0, lo, 0.0)
        spread = tl.where(zero_std, 1.0, hi - lo)

        total = tl.zeros((BLOCK_T,), tl.float32)
        for k in range(start, end, BLOCK):
            r, finite, mask, offs = _load_sorted(rewards_ptr, perm_ptr, k, end, cols, col_mask, T, BLOCK)
            total += tl.sum(tl.where(finite, r - shift[None, :], 0.0), axis=0)
        # IEEE-rounded (plain "/" may be off by an ulp on GPUs): an exactly representable mean
        # must come out exact for a sample sitting on it to get an advantage of exactly 0.
        offset = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))

        # Centred values divided by the range lie in [-1, 1]: their squares neither overflow
        # nor underflow in fp32 whatever the scale of the rewards.
        squares = tl.zeros((BLOCK_T,), tl.float32)
        for k in range(start, end, BLOCK):
            r, finite, mask, offs = _load_sorted(rewards_ptr, perm_ptr, k, end, cols, col_mask, T, BLOCK)
            scaled = tl.where(finite, ((r - shift[None, :]) - offset[None, :]) / spread[None, :], 0.0)
            squares += tl.sum(scaled * scaled, axis=0)
        std = tl.where(zero_std, 0.0, spread * tl.sqrt(squares / tl.maximum(count - DDOF, 1).to(tl.float32)))
        return count, nonfinite, shift, offset, std, zero_std

    @triton.jit
    def _group_advantage_kernel(rewards_ptr, perm_ptr, seg_start_ptr, adv_ptr, mean_ptr, std_ptr, count_ptr,
                                zero_ptr, nonfinite_ptr, N, T, eps, clip,
                                DDOF: tl.constexpr, GLOBAL_STD: tl.constexpr, HAS_CLIP: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_ALL: tl.constexpr):
        g, col_block = tl.program_id(0), tl.program_id(1)
        cols = col_block * BLOCK_T + tl.arange(0, BLOCK_T)
        col_mask = cols < T
        start = tl.load(seg_start_ptr + g)
        end = tl.load(seg_start_ptr + g + 1)
        count, nonfinite, shift, offset, std, zero_std = _shifted_stats(
            rewards_ptr, perm_ptr, start, end, cols, col_mask, T, DDOF, BLOCK_M, BLOCK_T)
        if GLOBAL_STD:
            _, _, _, _, global_std, _ = _shifted_stats(
                rewards_ptr, perm_ptr, 0, N, cols, col_mask, T, DDOF, BLOCK_ALL, BLOCK_T)
            denominator = global_std + eps
        else:
            denominator = std + eps

        for k in range(start, end, BLOCK_M):
            r, finite, mask, offs = _load_sorted(rewards_ptr, perm_ptr, k, end, cols, col_mask, T, BLOCK_M)
            # centred exactly as in the squares pass: a tied or at-the-mean reward gives an exact 0
            adv = ((r - shift[None, :]) - offset[None, :]) / denominator[None, :]
            if HAS_CLIP:
                adv = tl.minimum(tl.maximum(adv, -clip), clip)
            adv = tl.where(finite & ~zero_std[None, :], adv, 0.0)
            tl.store(adv_ptr + offs, adv, mask=mask)

        out = g * T + cols
        tl.store(mean_ptr + out, shift + offset, mask=col_mask)
        tl.store(std_ptr + out, std, mask=col_mask)
        tl.store(count_ptr + out, count.to(tl.int64), mask=col_mask)
        tl.store(zero_ptr + out, zero_std.to(tl.float32), mask=col_mask)
        tl.store(nonfinite_ptr + out, nonfinite.to(tl.int64), mask=col_mask)


def _group_advantage_triton(rewards, group_ids, *, std, eps, unbiased, clip, num_groups):
    _check(rewards, group_ids, std, eps, clip)
    N = rewards.shape[0]
    if N == 0:
        return group_advantage_reference(rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip)
    squeeze = rewards.ndim == 1
    r = rewards.reshape(N, -1).contiguous()  # (N, T)
    T = r.shape[1]
    device = r.device
    # Compact the ids without reading anything back: sort, mark where the id changes, and
    # number the groups by a prefix sum (the order of torch.unique).
    sorted_ids, perm = torch.sort(group_ids.to(device=device, dtype=torch.int64), stable=True)
    group_of_sorted = torch.zeros(N, dtype=torch.int64, device=device)  # (N,)
    torch.cumsum(sorted_ids[1:] != sorted_ids[:-1], 0, out=group_of_sorted[1:])
    if num_groups is None:
        num_groups = int(group_of_sorted[-1]) + 1  # the one host read; pass num_groups to avoid it
    else:
        torch._assert_async(group_of_sorted[-1] + 1 == num_groups,
                            "group_advantage: num_groups differs from the number of distinct group ids")
    G = num_groups
    # seg_start[g] = first sorted position of group g; seg_start[G] = N closes the last group.
    seg_start = torch.full((G + 1,), N, dtype=torch.int64, device=device)
    seg_start.scatter_reduce_(0, group_of_sorted.clamp_max(G), torch.arange(N, device=device), "amin")

    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    adv = torch.empty(N, T, dtype=torch.float32, device=device)
    mean = torch.empty(G, T, dtype=torch.float32, device=device)
    group_std = torch.empty_like(mean)
    zero = torch.empty_like(mean)
    count = torch.empty(G, T, dtype=torch.int64, device=device)
    nonfinite = torch.empty_like(count)
    BLOCK_T = min(triton.next_power_of_2(T), 16)
    _group_advantage_kernel[(G, triton.cdiv(T, BLOCK_T))](
        r, perm, seg_start, adv, mean, group_std, count, zero, nonfinite, N, T, float(eps),
        float(clip) if clip is not None else 0.0,
        DDOF=1 if unbiased else 0, GLOBAL_STD=std == "global", HAS_CLIP=clip is not None,
        BLOCK_M=16, BLOCK_T=BLOCK_T, BLOCK_ALL=64 if interpreting() else 512)
    result = GroupAdvantage(
        advantages=adv.to(out_dtype), group_mean=mean.to(out_dtype), group_std=group_std.to(out_dtype),
        group_count=count, zero_std_fraction=zero.mean(0).to(out_dtype), nonfinite_count=nonfinite.sum())
    if squeeze:
        result = result._replace(advantages=result.advantages[:, 0], group_mean=result.group_mean[:, 0],
                                 group_std=result.group_std[:, 0], group_count=result.group_count[:, 0],
                                 zero_std_fraction=result.zero_std_fraction[0])
    return result


def group_advantage(rewards, group_ids, *, std="group", eps=1e-4, unbiased=False, clip=5.0, num_groups=None,
                    backend=None) -> GroupAdvantage:
    """Group-normalised, clipped advantages and per-group statistics (see the module docstring).

    rewards: (N,) or (N, T) float on any device; group_ids: (N,) integer ids.
    num_groups: the number of distinct ids when the caller knows it (e.g. prompts per batch).
    Passing it keeps the Triton path free of host syncs; without it the wrapper reads that
    one number back from the device.
    """
    if resolve(backend, rewards, group_ids) == "reference":
        return group_advantage_reference(rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip,
                                         num_groups=num_groups)
    return _group_advantage_triton(rewards, group_ids, std=std, eps=eps, unbiased=unbiased, clip=clip,
                                   num_groups=num_groups)
