"""AdamW over the local fp32 shards, the warm-up + cosine learning-rate schedule, gradient-norm clipping across
shards, and updates that never leave a non-finite weight.

Note [non-finite updates]: an update is committed only when the checked values (the loss, the gradient norm) are
finite on every rank *and* the weights it would produce are finite. The would-be weights of the Adam family are
computed before the step, chunk by chunk into small temporaries, from the weights, gradients and moments; nothing
is copied to be restored later. The decision is a device tensor: torch's fused Adam/AdamW (the CUDA default
without apex) skips the update on device through its `found_inf` input, so the step has no host sync; other
optimizers cost one host read (free on CPU). `NonFiniteGuard` counts the undone updates on device and reads the
count once per logging interval (docs/reliability.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from idgrpo.engine.faults import fault_point


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


def warmup_cosine(step: int, total: int, *, warmup: int, floor: float = 0.05) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based) of `total`: a linear warm-up over `warmup`
    steps (at least one) times a cosine from 1 down to `floor` at step `total` (and past it).

        for group in optimizer.param_groups:
            group["lr"] = peak_lr * warmup_cosine(step, total_steps, warmup=max(1, int(0.03 * total_steps)))

    Note: the cosine's argument is `pi * min(1, step / total)`, not `pi * step / total`; the two differ in the last
    bit for some steps, and the golden runs pin this one."""
    return min(1.0, (step + 1) / max(1, warmup)) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


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


class NonFiniteError(RuntimeError):
    """Weights or updates that are not finite (NaN/Inf): a run stopped by `NonFiniteGuard`, or a save refused."""


def nonfinite_summary(tensor: torch.Tensor) -> str | None:
    """None when every value of `tensor` is finite (or it holds no floats), else e.g. "2 NaN, 1 Inf of 64 values".
    One host read."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    values = tensor.detach() if tensor.dtype.itemsize > 1 else tensor.detach().float()  # no isnan for float8
    if bool(torch.isfinite(values).all()):
        return None
    counts = [f"{int(n)} {kind}" for kind, n in (("NaN", torch.isnan(values).sum()), ("Inf", torch.isinf(values).sum()))
              if n]
    return f"{', '.join(counts)} of {tensor.numel()} values"


_CHECK_CHUNK = 1 << 22  # elements per temporary of the would-be-weights check (16 MiB in fp32)


def _adam_update_is_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Whether the next step of an Adam-family optimizer leaves every parameter finite (a 0-d bool device tensor),
    computed without changing anything; None for other optimizers (Note [non-finite updates])."""
    apex = type(optimizer).__name__ == "FusedAdam"
    if not (isinstance(optimizer, torch.optim.Adam) or apex):
        return None
    flags = []
    for pg in optimizer.param_groups:
        beta1, beta2 = pg["betas"]
        lr, weight_decay, eps = pg["lr"], pg["weight_decay"], pg["eps"]
        decoupled = getattr(optimizer, "adam_w_mode", False) if apex else pg.get(
            "decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        for p in pg["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            t = state.get("step", pg.get("step", 0)) + 1  # apex keeps the step count in the group
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            flat, grad = p.detach().reshape(-1), p.grad.detach().reshape(-1)
            moments = [state[k].reshape(-1) if k in state else None
                       for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
            for lo in range(0, flat.numel(), _CHECK_CHUNK):
                window = slice(lo, lo + _CHECK_CHUNK)
                w, g = flat[window].float(), grad[window].float()
                if pg.get("maximize", False):
                    g = -g
                if weight_decay and not decoupled:
                    g = g + weight_decay * w
                m, v, v_max = (None if x is None else x[window] for x in moments)
                m_new = g * (1 - beta1) if m is None else torch.lerp(m, g, 1 - beta1)
                v_new = g * g * (1 - beta2) if v is None else torch.addcmul(v * beta2, g, g, value=1 - beta2)
                if pg.get("amsgrad", False) and v_max is not None:
                    v_new = torch.maximum(v_new, v_max)
                denominator = v_new.div_(bias2).sqrt_().add_(eps)
                update = m_new.div_(denominator).mul_(lr / bias1)
                scale = 1 - lr * weight_decay if decoupled else 1.0
                flags.append(torch.isfinite(w * scale - update).all())
    if not flags:
        return None
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def step_if_finite(optimizer: torch.optim.Optimizer, *values: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()` unless one of `values` (the loss, the gradient norm) holds a NaN/Inf on any rank, or the
    update would leave a weight non-finite (Adam family; Note [non-finite updates]). A collective when several
    processes run: every rank must call it, and all of them skip or step together.

    Returns a 0-d float tensor on device: 1.0 when the update was undone (give it to `NonFiniteGuard.update` and
    add it to Metrics to count them). A skipped update leaves weights, moments and the step count as they were.
    """
    if not values:
        raise ValueError("step_if_finite needs at least one tensor to check")
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all()
    weights_finite = _adam_update_is_finite(optimizer)
    if weights_finite is not None:
        finite = finite & weights_finite.to(finite.device)
    skipped = (~finite).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)  # one rank's bad shard undoes the update everywhere
    fault_point("step")
    fused = isinstance(optimizer, torch.optim.Adam) and all(pg.get("fused") for pg in optimizer.param_groups)
    if fused:
        optimizer.found_inf = skipped  # read by torch's fused Adam kernels: skip the whole update
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skipped):
        optimizer.step()
    return skipped


class NonFiniteGuard:
    """Stops a run whose updates keep being undone (`step_if_finite` returned 1.0 `limit` times in a row).

        guard = NonFiniteGuard(20, hint="lower --lr")
        for step in ...:
            guard.update(step_if_finite(optimizer, loss, grad_norm))   # device ops, no sync
            if step % log_every == 0:
                undone = guard.check(step)                               # one host read; raises NonFiniteError

    A streak that crosses a logging interval is counted whole; `limit` 0 never stops the run.
    """

    def __init__(self, limit: int, *, hint: str = ""):
        if limit < 0:
            raise ValueError(f"NonFiniteGuard: limit must be >= 0, got {limit}")
        self.limit = limit
        self.hint = hint
        self._streak: torch.Tensor | None = None  # undone updates since the last committed one
        self._longest: torch.Tensor | None = None  # longest streak since the last check
        self._undone: torch.Tensor | None = None  # undone updates since the last check

    def update(self, skipped: torch.Tensor) -> None:
        skipped = skipped.detach().float().reshape(())
        if self._streak is None:
            self._streak = self._longest = self._undone = torch.zeros_like(skipped)
        self._streak = (self._streak + 1) * skipped
        self._longest = torch.maximum(self._longest, self._streak)
        self._undone = self._undone + skipped

    def check(self, step: int | None = None) -> int:
        """The number of updates undone since the last check; raises NonFiniteError once `limit` were undone in a
        row."""
        if self._streak is None:
            return 0
        longest, undone = (int(x) for x in torch.stack([self._longest, self._undone]).tolist())
        self._longest, self._undone = self._streak, torch.zeros_like(self._undone)
        if self.limit and longest >= self.limit:
            where = f" (checked at step {step})" if step is not None else ""
            raise NonFiniteError(
                f"{longest} updates in a row were undone because the loss, the gradient norm or the updated weights "
                f"were not finite (NaN/Inf){where}; the run is stopped (limit {self.limit}). The weights are those "
                f"of the last finite update, and no checkpoint holds a non-finite value"
                + (f"; {self.hint}" if self.hint else ""))
        return undone
