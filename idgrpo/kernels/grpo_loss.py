"""The flow-matching SDE step with its Gaussian log-probability, and the GRPO loss (spec §6.3).

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

from idgrpo.kernels.backend import resolve

SCHEDULES = ("identity_grpo", "flow_grpo")
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
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
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


def grpo_step(x, velocity, sigma, sigma_next, std_dev_t, noise, *, deterministic=False, backend=None):
    """One SDE step: (x_next (x.dtype), log_prob (B,) fp32, mean (B, ...) fp32); no grad."""
    resolve(backend, x, velocity, noise)  # validates `backend`; the Triton kernel is not in yet
    return grpo_step_reference(x, velocity, sigma, sigma_next, std_dev_t, noise, deterministic=deterministic)


def grpo_loss(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t, *, ref_mean=None,
              clip_range=1e-3, adv_clip=5.0, kl_beta=0.004, backend=None):
    """The GRPO loss (scalar, differentiable w.r.t. `velocity`) and its stats (see the module docstring)."""
    resolve(backend, x, x_next, velocity, ref_mean)
    return grpo_loss_reference(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std_dev_t,
                               ref_mean=ref_mean, clip_range=clip_range, adv_clip=adv_clip, kl_beta=kl_beta)
