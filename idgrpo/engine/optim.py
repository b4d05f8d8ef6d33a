"""AdamW over the local fp32 shards, and gradient-norm clipping across shards."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


def build_optimizer(params: Iterable[nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): apex FusedAdam when importable and on CUDA, else
    `torch.optim.AdamW(fused=True)` on CUDA and `foreach=True` on CPU."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"bad AdamW hyper-parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
    on_cuda = params[0].device.type == "cuda"
    if on_cuda:
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
        except ImportError:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


def clip_grad_norm_(fsdp_model_or_params, max_norm: float) -> torch.Tensor:
    """Scale gradients so that their global L2 norm is at most `max_norm`; return the norm
    before clipping (a device tensor: no host sync).

    Sharded gradients' squared norms are summed over ranks (one all-reduce); replicated ones
    (identical on every rank) are counted once. Every rank must call this.
    """
    if hasattr(fsdp_model_or_params, "trainable_parameters"):
        params = fsdp_model_or_params.trainable_parameters()
    else:
        params = list(fsdp_model_or_params)
    if not params:
        raise ValueError("clip_grad_norm_: no parameters")
    device = params[0].device
    sharded = [p.grad for p in params if p.grad is not None and not getattr(p, "_idgrpo_replicated", False)]
    replicated = [p.grad for p in params if p.grad is not None and getattr(p, "_idgrpo_replicated", False)]

    def sum_sq(grads):
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        norms = torch._foreach_norm(grads)
        return torch.stack(norms).float().square().sum()

    total_sq = sum_sq(sharded)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_sq)
    total = (total_sq + sum_sq(replicated)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = sharded + replicated
    if grads:
        torch._foreach_mul_(grads, coef)
    return total


def step_if_finite(optimizer: torch.optim.Optimizer, *values: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()` unless any of `values` (the loss, the gradient norm) holds a NaN/Inf.

    Returns a 0-d float tensor on device: 1.0 when the update was skipped (add it to Metrics to
    count skips). With fused torch Adam/AdamW (the CUDA default) the skip happens on device
    through the optimizer's `found_inf` input, with no host sync; with other optimizers (apex,
    CPU foreach) the decision costs one host read, which on CPU is free.
    """
    if not values:
        raise ValueError("step_if_finite needs at least one tensor to check")
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all()
    skipped = (~finite).float()
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        pg.get("fused") for pg in optimizer.param_groups)
    if fused:
        optimizer.found_inf = skipped  # read by torch's fused Adam kernels: skip the whole update
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()
    return skipped
