"""The flow-matching SDE step with its Gaussian log-probability, and the GRPO loss
(docs/models.md#sde-step-and-log-probability, #grpo-objective).

With σ the current and σ' the next noise level (dt = σ' − σ < 0), s_t the noise level of
the schedule (`sde_noise_std`) and v the velocity, one Euler–Maruyama step of
dx = [v + s_t²/(2σ)(x + (1−σ)v)]dt + s_t dW is

    μ  = x·(1 + s_t²/(2σ)·dt) + v·(1 + s_t²(1−σ)/(2σ))·dt
    x' = μ + s_t√(−dt)·ε                (deterministic: x' = x + dt·v)
    log p(x'|x) = mean over every non-batch element of
                  −(x'−μ)²/(2(s_t√(−dt))²) − log(s_t√(−dt)) − log√(2π)

The GRPO loss recomputes log p of the stored x' under the current velocity and, per sample,

    ratio = exp(log p_new − log p_old),  A = clip(advantage, ±adv_clip)
    policy = max(−A·ratio, −A·clip(ratio, 1 ± clip_range))
    KL     = mean((μ_θ − μ_ref)²) / (2(s_t√(−dt))²)
    loss   = mean_b(policy) + kl_beta·mean_b(KL)

All arithmetic is fp32 whatever the latent dtype (float64 inputs stay float64 in the
references, which is how the tests get their ground truth). σ, σ' and s_t are per-sample
(B,) tensors so that nothing is read back to the host.
"""

from __future__ import annotations

import math

import torch

from idgrpo.kernels.backend import interpreting, resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path works without triton
    triton = None

NOISE_SCHEDULES = ("identity_grpo", "flow_grpo")
"""The SDE noise-level schedules of `sde_noise_std` (not the sampling grids of `idgrpo.rl.schedules`)."""
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(t, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) per-sample scalar (tensor or float) -> (B, 1, ..., 1) broadcastable against `like`."""
    t = torch.as_tensor(t, dtype=dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != like.shape[:1]:
        raise ValueError(f"per-sample tensors must be ({like.shape[0]},), got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sde_noise_std(sigma, sigma_next, sigmas_1, *, schedule="identity_grpo", noise_level=0.7) -> torch.Tensor:
    """The SDE noise level s_t per sample, (B,) fp32 (float64 if σ is float64).

    identity_grpo: s_t = σ_min + (σ_max − σ_min)·σ with σ_max = sigmas[1], σ_min = 0, i.e.
        sigmas[1]·σ (Identity-GRPO's Wan pipeline; `noise_level` does not enter).
    flow_grpo: s_t = noise_level·√(σ/(1−σ)), with 1 − sigmas[1] as the denominator where σ = 1.
    `sigma_next` does not enter either schedule; it is taken so that every step helper sees
    the same (σ, σ') pair.
    """
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {NOISE_SCHEDULES}")
    sigma = torch.as_tensor(sigma)
    dtype = torch.promote_types(sigma.dtype, torch.float32) if sigma.is_floating_point() else torch.float32
    sigma = sigma.to(dtype)
    sigmas_1 = torch.as_tensor(sigmas_1, dtype=dtype, device=sigma.device)
    if sigma_next is not None and torch.as_tensor(sigma_next).shape != sigma.shape:
        raise ValueError(f"sigma {tuple(sigma.shape)} and sigma_next {tuple(torch.as_tensor(sigma_next).shape)} differ")
    if schedule == "identity_grpo":
        return sigmas_1 * sigma
    denominator = 1 - torch.where(sigma == 1, sigmas_1, sigma)
    return torch.sqrt(sigma / denominator) * noise_level


def sde_mean_reference(x, velocity, sigma, sigma_next, std_dev_t) -> torch.Tensor:
    """μ of the step, computed in fp32 (or wider)."""
    dtype = _compute_dtype(x, velocity)
    x, v = x.to(dtype), velocity.to(dtype)
    sigma, sigma_next, s = (_per_sample(t, x, dtype) for t in (sigma, sigma_next, std_dev_t))
    dt = sigma_next - sigma
    return x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt


def sde_log_prob_reference(x_next, mean, sigma, sigma_next, std_dev_t) -> torch.Tensor:
    """Per-sample log p(x'|x) (mean over non-batch dims), exactly as Flow-GRPO writes it."""
    dtype = mean.dtype
    sigma, sigma_next, s = (_per_sample(t, mean, dtype) for t in (sigma, sigma_next, std_dev_t))
    std = s * torch.sqrt(-(sigma_next - sigma))
    log_prob = -((x_next.detach().to(dtype) - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def grpo_step_reference(x, velocity, sigma, sigma_next, std_dev_t, noise, *, deterministic=False):
    """(x_next in x.dtype, log_prob (B,), mean (B, ...)) of one SDE step; no grad."""
    with torch.no_grad():
        mean = sde_mean_reference(x, velocity, sigma, sigma_next, std_dev_t)
        dtype = mean.dtype
        sigma_b, sigma_next_b, s = (_per_sample(t, mean, dtype) for t in (sigma, sigma_next, std_dev_t))
        dt = sigma_next_b - sigma_b
        if deterministic:
            x_next = x.to(dtype) + dt * velocity.to(dtype)
        else:
            x_next = mean + s * torch.sqrt(-dt) * noise.to(dtype)
        x_next = x_next.to(x.dtype)  # the log-prob is measured on what the caller stores
        log_prob = sde_log_prob_reference(x_next, mean, sigma, sigma_next, std_dev_t)
    return x_next, log_prob, mean


def _check_loss_args(clip_range, adv_clip, kl_beta):
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")


def _policy_terms(log_prob, kl, old_log_prob, advantages, clip_range, adv_clip, kl_beta):
    """The (B,)-vector part of the loss, shared by the reference and the fused path."""
    dtype = log_prob.dtype
    advantages = advantages.to(dtype)
    if adv_clip is not None:
        advantages = advantages.clamp(-adv_clip, adv_clip)
    log_ratio = log_prob - old_log_prob.to(dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss + kl_beta * kl.mean()
    stats = {
        "log_prob": log_prob.detach(),
        "ratio": ratio.detach(),
        "kl": kl.detach(),
        "policy_loss": policy_loss.detach(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).to(dtype).mean(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
    }
    return loss, stats


def grpo_loss_reference(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t, *,
                        ref_mean=None, clip_range=1e-3, adv_clip=5.0, kl_beta=0.004):
    """(loss scalar, stats) with autograd through `velocity` only."""
    _check_loss_args(clip_range, adv_clip, kl_beta)
    mean = sde_mean_reference(x.detach(), velocity, sigma, sigma_next, std_dev_t)
    log_prob = sde_log_prob_reference(x_next, mean, sigma, sigma_next, std_dev_t)
    if ref_mean is None:
        kl = torch.zeros_like(log_prob)
    else:
        dtype = mean.dtype
        sigma_b, sigma_next_b, s = (_per_sample(t, mean, dtype) for t in (sigma, sigma_next, std_dev_t))
        variance = s**2 * -(sigma_next_b - sigma_b)
        kl = ((mean - ref_mean.detach().to(dtype)) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (
            2 * variance.reshape(-1))
    return _policy_terms(log_prob, kl, old_log_prob, advantages, clip_range, adv_clip, kl_beta)


# ---------------------------------------------------------------------------------------------
# Triton: each program owns BLOCK elements of one sample and writes its partial sums; a second
# launch (one program per sample) adds a sample's partials in a fixed order and applies the
# per-sample formula, so results are deterministic. The per-sample coefficients are computed in
# the kernels from σ, σ', s_t (one shared jit helper, so the sampler and the loss agree to the
# bit): a step is two launches, the loss forward two, its backward one.


def _block_size() -> int:
    # Small blocks under the interpreter so the tests cross several blocks with a ragged tail.
    return 128 if interpreting() else 2048


if triton is not None:

    @triton.jit
    def _step_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, b):
        """μ = x·cx + v·cv, dt = σ' − σ and the step's std s_t√(−dt), in fp32, for sample b."""
        sigma = tl.load(sigma_ptr + b).to(tl.float32)
        dt = tl.load(sigma_next_ptr + b).to(tl.float32) - sigma
        s = tl.load(std_ptr + b).to(tl.float32)
        s2 = s * s
        cx = 1.0 + s2 / (2.0 * sigma) * dt
        cv = (1.0 + s2 * (1.0 - sigma) / (2.0 * sigma)) * dt
        return cx, cv, dt, s * tl.sqrt(-dt)

    @triton.jit
    def _sde_step_kernel(x_ptr, v_ptr, noise_ptr, x_next_ptr, mean_ptr, partial_ptr,
                         sigma_ptr, sigma_next_ptr, std_ptr, M, NUM_BLOCKS,
                         DETERMINISTIC: tl.constexpr, BLOCK: tl.constexpr):
        block, b = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        offs = b.to(tl.int64) * M + cols
        cx, cv, dt, step_std = _step_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, b)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = x * cx + v * cv
        if DETERMINISTIC:
            x_next = x + dt * v
        else:
            noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x_next = mean + step_std * noise
        # The log-prob is measured on x_next as stored, so that recomputing it from the
        # stored latent (grpo_loss, on-policy) gives back exactly this value.
        x_next_stored = x_next.to(x_next_ptr.dtype.element_ty)
        tl.store(x_next_ptr + offs, x_next_stored, mask=mask)
        tl.store(mean_ptr + offs, mean, mask=mask)
        diff = tl.where(mask, x_next_stored.to(tl.float32) - mean, 0.0)
        tl.store(partial_ptr + b * NUM_BLOCKS + block, tl.sum(diff * diff, axis=0))

    @triton.jit
    def _sde_logprob_fwd_kernel(x_ptr, x_next_ptr, v_ptr, ref_ptr, partial_lp_ptr, partial_kl_ptr,
                                sigma_ptr, sigma_next_ptr, std_ptr, M, NUM_BLOCKS,
                                HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
        block, b = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        offs = b.to(tl.int64) * M + cols
        cx, cv, dt, step_std = _step_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, b)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_next = tl.load(x_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = x * cx + v * cv
        diff = tl.where(mask, x_next - mean, 0.0)
        tl.store(partial_lp_ptr + b * NUM_BLOCKS + block, tl.sum(diff * diff, axis=0))
        if HAS_REF:
            ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dev = tl.where(mask, mean - ref, 0.0)
            tl.store(partial_kl_ptr + b * NUM_BLOCKS + block, tl.sum(dev * dev, axis=0))

    @triton.jit
    def _sde_logprob_finish_kernel(partial_lp_ptr, partial_kl_ptr, log_prob_ptr, kl_ptr,
                                   sigma_ptr, sigma_next_ptr, std_ptr, M, NUM_BLOCKS, LOG_SQRT_2PI,
                                   HAS_KL: tl.constexpr, BLOCK_P: tl.constexpr):
        # log p_b = −Σ(x'−μ)²/(2·var·M) − log(s_t√(−dt)) − log√(2π);  KL_b = Σ(μ−μ_ref)²/(2·var·M)
        b = tl.program_id(0)
        _, _, _, step_std = _step_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, b)
        acc_lp = tl.zeros((BLOCK_P,), tl.float32)
        acc_kl = tl.zeros((BLOCK_P,), tl.float32)
        for k in range(0, NUM_BLOCKS, BLOCK_P):
            idx = k + tl.arange(0, BLOCK_P)
            mask = idx < NUM_BLOCKS
            acc_lp += tl.load(partial_lp_ptr + b * NUM_BLOCKS + idx, mask=mask, other=0.0)
            if HAS_KL:
                acc_kl += tl.load(partial_kl_ptr + b * NUM_BLOCKS + idx, mask=mask, other=0.0)
        denominator = 2.0 * step_std * step_std * M
        tl.store(log_prob_ptr + b, -tl.sum(acc_lp, axis=0) / denominator - tl.log(step_std) - LOG_SQRT_2PI)
        if HAS_KL:
            tl.store(kl_ptr + b, tl.sum(acc_kl, axis=0) / denominator)

    @triton.jit
    def _sde_logprob_bwd_kernel(x_ptr, x_next_ptr, v_ptr, ref_ptr, grad_v_ptr, grad_lp_ptr, grad_lp_stride,
                                grad_kl_ptr, grad_kl_stride, sigma_ptr, sigma_next_ptr, std_ptr, M,
                                HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
        # d log_prob_b / d v = cv·(x' − μ)/(var·M);  d KL_b / d v = cv·(μ − μ_ref)/(var·M)
        block, b = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        offs = b.to(tl.int64) * M + cols
        cx, cv, dt, step_std = _step_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, b)
        scale = cv / (step_std * step_std * M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_next = tl.load(x_next_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = x * cx + v * cv
        grad = (tl.load(grad_lp_ptr + b * grad_lp_stride).to(tl.float32) * scale) * (x_next - mean)
        if HAS_REF:
            ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad += (tl.load(grad_kl_ptr + b * grad_kl_stride).to(tl.float32) * scale) * (mean - ref)
        tl.store(grad_v_ptr + offs, grad.to(grad_v_ptr.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1).contiguous()


def _per_sample_fp32(t, batch: int, device) -> torch.Tensor:
    """(B,) contiguous fp32 on `device`; a no-op (no launch) for what the sampler passes."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-sample tensors must be ({batch},), got shape {tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def _finish(partial_lp, partial_kl, schedule, M):
    """(log_prob (B,), kl (B,) or None) from per-block partial sums; one launch."""
    B, num_blocks = partial_lp.shape
    log_prob = torch.empty(B, dtype=torch.float32, device=partial_lp.device)
    kl = torch.empty_like(log_prob) if partial_kl is not None else None
    has_kl = partial_kl is not None
    _sde_logprob_finish_kernel[(B,)](partial_lp, partial_kl if has_kl else partial_lp, log_prob,
                                     kl if has_kl else log_prob, *schedule, M, num_blocks, LOG_SQRT_2PI,
                                     HAS_KL=has_kl, BLOCK_P=min(1024, triton.next_power_of_2(num_blocks)))
    return log_prob, kl


def _grpo_step_triton(x, velocity, sigma, sigma_next, std_dev_t, noise, *, deterministic):
    B = x.shape[0]
    if noise is None and not deterministic:
        raise ValueError("grpo_step needs `noise` unless deterministic=True")
    if velocity.shape != x.shape or (noise is not None and noise.shape != x.shape):
        raise ValueError(f"x, velocity and noise must share a shape; got {tuple(x.shape)}, "
                         f"{tuple(velocity.shape)}, {None if noise is None else tuple(noise.shape)}")
    M = x[0].numel()
    schedule = [_per_sample_fp32(t, B, x.device) for t in (sigma, sigma_next, std_dev_t)]
    x_flat, v_flat = _flat(x, B), _flat(velocity, B)
    noise_flat = x_flat if deterministic else _flat(noise, B)  # not read when deterministic
    x_next = torch.empty_like(x_flat)
    mean = torch.empty(x_flat.shape, dtype=torch.float32, device=x.device)
    BLOCK = _block_size()
    num_blocks = triton.cdiv(M, BLOCK)
    partial = torch.empty(B, num_blocks, dtype=torch.float32, device=x.device)
    _sde_step_kernel[(num_blocks, B)](x_flat, v_flat, noise_flat, x_next, mean, partial, *schedule,
                                      M, num_blocks, DETERMINISTIC=deterministic, BLOCK=BLOCK)
    log_prob, _ = _finish(partial, None, schedule, M)
    return x_next.view(x.shape), log_prob, mean.view(x.shape)


class _SdeLogProbKL(torch.autograd.Function):
    """(log_prob (B,), kl (B,)) of stored steps under the current velocity; grad to velocity only."""

    @staticmethod
    def forward(ctx, x, x_next, velocity, ref_mean, sigma, sigma_next, std_dev_t):
        B = x.shape[0]
        M = x[0].numel()
        schedule = [_per_sample_fp32(t, B, x.device) for t in (sigma, sigma_next, std_dev_t)]
        tensors = [_flat(t, B) for t in (x, x_next, velocity)]
        has_ref = ref_mean is not None
        ref = _flat(ref_mean, B) if has_ref else tensors[0]  # not read without a reference
        BLOCK = _block_size()
        num_blocks = triton.cdiv(M, BLOCK)
        partial_lp = torch.empty(B, num_blocks, dtype=torch.float32, device=x.device)
        partial_kl = torch.empty_like(partial_lp) if has_ref else None
        _sde_logprob_fwd_kernel[(num_blocks, B)](*tensors, ref, partial_lp,
                                                 partial_kl if has_ref else partial_lp, *schedule, M, num_blocks,
                                                 HAS_REF=has_ref, BLOCK=BLOCK)
        log_prob, kl = _finish(partial_lp, partial_kl, schedule, M)
        if kl is None:
            kl = torch.zeros_like(log_prob)
        ctx.save_for_backward(*tensors, ref, *schedule)
        ctx.has_ref, ctx.shape, ctx.dtype = has_ref, velocity.shape, velocity.dtype
        return log_prob, kl

    @staticmethod
    def backward(ctx, grad_log_prob, grad_kl):
        x, x_next, velocity, ref, *schedule = ctx.saved_tensors
        B, M = x.shape
        grad_v = torch.empty(B, M, dtype=ctx.dtype, device=x.device)
        BLOCK = _block_size()
        # The incoming (B,) grads are often expanded scalars (stride 0): read them by stride.
        _sde_logprob_bwd_kernel[(triton.cdiv(M, BLOCK), B)](
            x, x_next, velocity, ref, grad_v, grad_log_prob, grad_log_prob.stride(0), grad_kl, grad_kl.stride(0),
            *schedule, M, HAS_REF=ctx.has_ref, BLOCK=BLOCK)
        return None, None, grad_v.view(ctx.shape), None, None, None, None


def _grpo_loss_triton(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t, *,
                      ref_mean, clip_range, adv_clip, kl_beta):
    _check_loss_args(clip_range, adv_clip, kl_beta)
    for name, t in (("x_next", x_next), ("velocity", velocity), ("ref_mean", ref_mean)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's {tuple(x.shape)}")
    log_prob, kl = _SdeLogProbKL.apply(x.detach(), x_next.detach(), velocity,
                                       None if ref_mean is None else ref_mean.detach(), sigma, sigma_next, std_dev_t)
    return _policy_terms(log_prob, kl, old_log_prob, advantages, clip_range, adv_clip, kl_beta)


def grpo_step(x, velocity, sigma, sigma_next, std_dev_t, noise, *, deterministic=False, backend=None):
    """One SDE step: (x_next (x.dtype), log_prob (B,) fp32, mean (B, ...) fp32); no grad.

    `noise` (B, ...) is the standard normal draw ε; it is not read when `deterministic`.
    """
    with torch.no_grad():
        if resolve(backend, x, velocity, noise) == "reference":
            return grpo_step_reference(x, velocity, sigma, sigma_next, std_dev_t, noise,
                                       deterministic=deterministic)
        return _grpo_step_triton(x, velocity, sigma, sigma_next, std_dev_t, noise, deterministic=deterministic)


def grpo_loss(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t, *, ref_mean=None,
              clip_range=1e-3, adv_clip=5.0, kl_beta=0.004, backend=None):
    """The GRPO loss (scalar, differentiable w.r.t. `velocity`) and its stats (see the module docstring).

    stats: log_prob, ratio, kl (B,); policy_loss, clipfrac, approx_kl scalars; all detached, on device.
    """
    impl = grpo_loss_reference if resolve(backend, x, x_next, velocity, ref_mean) == "reference" \
        else _grpo_loss_triton
    return impl(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t, ref_mean=ref_mean,
                clip_range=clip_range, adv_clip=adv_clip, kl_beta=kl_beta)
