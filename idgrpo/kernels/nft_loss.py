"""The DiffusionNFT training loss (docs/objectives.md; the formula is in `nft_loss`'s docstring),
with a fused Triton kernel.

Note: the adaptive weights w± are detached, so every per-sample reduction the loss needs
(Σ|e±|, Σe±², Σ(v_new − v_ref)²) is a plain sum over the sample: the forward is one pass over
the five latents, and the backward one more, with

    d loss_b / d v_new = [2σ·A·(−r·e₊/w₊ + (1 − r)·e₋/w₋) + 2·kl_beta·(v_new − v_ref)] / M

per element of sample b (M its element count; β cancels). The backward recomputes e± from
the latents rather than storing them: two more latent-sized buffers would cost more traffic
than the four loads they replace.
"""

from __future__ import annotations

import torch

from idgrpo.kernels.backend import resolve
from idgrpo.kernels.grpo_loss import _block_size, _compute_dtype, _flat, _per_sample, _per_sample_fp32

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path works without triton
    triton = None

WEIGHT_FLOOR = 1e-5  # the official clip of the adaptive weights


def _check_args(v_new, v_old, v_ref, x_t, x0, advantages, beta, adv_clip_max, kl_beta):
    if not beta > 0:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    if not adv_clip_max > 0:
        raise ValueError(f"nft_loss: adv_clip_max must be > 0, got {adv_clip_max}")
    if not kl_beta >= 0:
        raise ValueError(f"nft_loss: kl_beta must be >= 0, got {kl_beta}")
    if kl_beta > 0 and v_ref is None:
        raise ValueError(f"nft_loss: kl_beta={kl_beta} needs the reference velocity v_ref")
    if v_new.ndim < 2 or v_new.shape[0] == 0 or v_new[0].numel() == 0:
        raise ValueError(f"nft_loss: v_new must be (B, ...) with B > 0 and non-empty samples, got "
                         f"{tuple(v_new.shape)}")
    for name, t in (("v_old", v_old), ("v_ref", v_ref), ("x_t", x_t), ("x0", x0)):
        if t is not None and t.shape != v_new.shape:
            raise ValueError(f"nft_loss: {name} has shape {tuple(t.shape)}, expected v_new's {tuple(v_new.shape)}")
    if torch.as_tensor(advantages).shape != v_new.shape[:1]:
        raise ValueError(f"nft_loss: advantages must be ({v_new.shape[0]},), got shape "
                         f"{tuple(torch.as_tensor(advantages).shape)}")


def nft_loss_reference(v_new, v_old, v_ref, x_t, x0, sigma, advantages, *, beta, adv_clip_max, kl_beta=0.0):
    """The loss (scalar) written as the official script computes it; autograd through `v_new` only."""
    _check_args(v_new, v_old, v_ref, x_t, x0, advantages, beta, adv_clip_max, kl_beta)
    dtype = _compute_dtype(v_new, v_old, v_ref, x_t, x0)
    v_new = v_new.to(dtype)
    v_old, x_t, x0 = (t.detach().to(dtype) for t in (v_old, x_t, x0))
    sigma = _per_sample(sigma, x0, dtype)
    dims = tuple(range(1, x0.ndim))
    advantages = torch.as_tensor(advantages, device=x0.device).to(dtype).clamp(-adv_clip_max, adv_clip_max)
    r = torch.clamp(advantages / adv_clip_max / 2.0 + 0.5, 0, 1)
    positive = beta * v_new + (1 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_new
    error_pos = x_t - sigma * positive - x0
    error_neg = x_t - sigma * negative - x0
    weight_pos = error_pos.detach().abs().mean(dim=dims).clamp_min(WEIGHT_FLOOR)
    weight_neg = error_neg.detach().abs().mean(dim=dims).clamp_min(WEIGHT_FLOOR)
    loss_pos = (error_pos**2).mean(dim=dims) / weight_pos
    loss_neg = (error_neg**2).mean(dim=dims) / weight_neg
    policy = r * loss_pos / beta + (1.0 - r) * loss_neg / beta
    loss = (policy * adv_clip_max).mean()
    if kl_beta > 0:
        loss = loss + kl_beta * ((v_new - v_ref.detach().to(dtype)) ** 2).mean(dim=dims).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Triton: each program owns BLOCK elements of one sample and writes its partial sums; a
# second launch (one program per sample) adds a sample's partials in a fixed order, so results
# are deterministic, and writes the sample's loss and the two coefficients its gradient needs.
# Forward: two launches; backward: one, which recomputes e± rather than storing them.


if triton is not None:

    @triton.jit
    def _x0_errors(v_new_ptr, v_old_ptr, x_t_ptr, x0_ptr, offs, mask, sigma, beta):
        """(v_new, e₊, e₋) in fp32 for the elements at `offs`."""
        v_new = tl.load(v_new_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_old = tl.load(v_old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_t = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        error_pos = x_t - sigma * (beta * v_new + (1.0 - beta) * v_old) - x0
        error_neg = x_t - sigma * ((1.0 + beta) * v_old - beta * v_new) - x0
        return v_new, error_pos, error_neg

    @triton.jit
    def _nft_fwd_kernel(v_new_ptr, v_old_ptr, v_ref_ptr, x_t_ptr, x0_ptr, sigma_ptr, partial_ptr, beta,
                        B, M, NUM_BLOCKS, HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
        # partial_ptr: (4 + HAS_KL, B, NUM_BLOCKS) = Σ|e₊|, Σ|e₋|, Σe₊², Σe₋² [, Σ(v_new − v_ref)²] per block
        block, b = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        offs = b.to(tl.int64) * M + cols
        sigma = tl.load(sigma_ptr + b)
        # masked lanes load zeros for every latent, so their errors and drift are exactly 0
        v_new, error_pos, error_neg = _x0_errors(v_new_ptr, v_old_ptr, x_t_ptr, x0_ptr, offs, mask, sigma, beta)
        out = partial_ptr + b * NUM_BLOCKS + block
        plane = B * NUM_BLOCKS
        tl.store(out, tl.sum(tl.abs(error_pos), axis=0))
        tl.store(out + plane, tl.sum(tl.abs(error_neg), axis=0))
        tl.store(out + 2 * plane, tl.sum(error_pos * error_pos, axis=0))
        tl.store(out + 3 * plane, tl.sum(error_neg * error_neg, axis=0))
        if HAS_KL:
            v_ref = tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            drift = v_new - v_ref
            tl.store(out + 4 * plane, tl.sum(drift * drift, axis=0))

    @triton.jit
    def _nft_finish_kernel(partial_ptr, sigma_ptr, adv_ptr, loss_ptr, coef_ptr, beta, adv_clip_max, kl_beta,
                           B, M, NUM_BLOCKS, WEIGHT_FLOOR: tl.constexpr, HAS_KL: tl.constexpr,
                           BLOCK_P: tl.constexpr):
        # loss_ptr: (B,) per-sample A·policy + kl_beta·KL;  coef_ptr: (2, B) the factors of e₊ and e₋
        # in the gradient, −2σ·A·r/(w₊·M) and 2σ·A·(1 − r)/(w₋·M)
        b = tl.program_id(0)
        plane = B * NUM_BLOCKS
        base = partial_ptr + b * NUM_BLOCKS
        abs_pos = tl.zeros((BLOCK_P,), tl.float32)
        abs_neg = tl.zeros((BLOCK_P,), tl.float32)
        sq_pos = tl.zeros((BLOCK_P,), tl.float32)
        sq_neg = tl.zeros((BLOCK_P,), tl.float32)
        sq_kl = tl.zeros((BLOCK_P,), tl.float32)
        for k in range(0, NUM_BLOCKS, BLOCK_P):
            idx = k + tl.arange(0, BLOCK_P)
            mask = idx < NUM_BLOCKS
            abs_pos += tl.load(base + idx, mask=mask, other=0.0)
            abs_neg += tl.load(base + plane + idx, mask=mask, other=0.0)
            sq_pos += tl.load(base + 2 * plane + idx, mask=mask, other=0.0)
            sq_neg += tl.load(base + 3 * plane + idx, mask=mask, other=0.0)
            if HAS_KL:
                sq_kl += tl.load(base + 4 * plane + idx, mask=mask, other=0.0)
        m = M * 1.0  # M is a constexpr when it equals 1: no .to()
        weight_pos = tl.maximum(tl.sum(abs_pos, axis=0) / m, WEIGHT_FLOOR)
        weight_neg = tl.maximum(tl.sum(abs_neg, axis=0) / m, WEIGHT_FLOOR)
        advantage = tl.minimum(tl.maximum(tl.load(adv_ptr + b), -adv_clip_max), adv_clip_max)
        r = tl.minimum(tl.maximum(advantage / adv_clip_max / 2.0 + 0.5, 0.0), 1.0)
        policy = r * (tl.sum(sq_pos, axis=0) / m) / weight_pos / beta \
            + (1.0 - r) * (tl.sum(sq_neg, axis=0) / m) / weight_neg / beta
        loss = policy * adv_clip_max
        if HAS_KL:
            loss += kl_beta * (tl.sum(sq_kl, axis=0) / m)
        tl.store(loss_ptr + b, loss)
        scale = 2.0 * tl.load(sigma_ptr + b) * adv_clip_max / m
        tl.store(coef_ptr + b, -scale * r / weight_pos)
        tl.store(coef_ptr + B + b, scale * (1.0 - r) / weight_neg)

    @triton.jit
    def _nft_bwd_kernel(v_new_ptr, v_old_ptr, v_ref_ptr, x_t_ptr, x0_ptr, sigma_ptr, coef_ptr, grad_loss_ptr,
                        grad_loss_stride, grad_v_ptr, beta, kl_beta, B, M,
                        HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
        block, b = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        offs = b.to(tl.int64) * M + cols
        sigma = tl.load(sigma_ptr + b)
        v_new, error_pos, error_neg = _x0_errors(v_new_ptr, v_old_ptr, x_t_ptr, x0_ptr, offs, mask, sigma, beta)
        g = tl.load(grad_loss_ptr + b * grad_loss_stride).to(tl.float32)
        grad = (g * tl.load(coef_ptr + b)) * error_pos + (g * tl.load(coef_ptr + B + b)) * error_neg
        if HAS_KL:
            v_ref = tl.load(v_ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad += (g * 2.0 * kl_beta / (M * 1.0)) * (v_new - v_ref)
        tl.store(grad_v_ptr + offs, grad.to(grad_v_ptr.dtype.element_ty), mask=mask)


class _NftPerSampleLoss(torch.autograd.Function):
    """(B,) per-sample loss A·policy_b + kl_beta·KL_b; grad to v_new only."""

    @staticmethod
    def forward(ctx, v_new, v_old, v_ref, x_t, x0, sigma, advantages, beta, adv_clip_max, kl_beta):
        B = v_new.shape[0]
        M = v_new[0].numel()
        has_kl = kl_beta > 0
        latents = [_flat(t, B) for t in (v_new, v_old, v_ref if has_kl else v_new, x_t, x0)]  # v_ref unread
        sigma = _per_sample_fp32(sigma, B, v_new.device)
        advantages = _per_sample_fp32(advantages, B, v_new.device)
        BLOCK = _block_size()
        num_blocks = triton.cdiv(M, BLOCK)
        partial = torch.empty(4 + has_kl, B, num_blocks, dtype=torch.float32, device=v_new.device)
        _nft_fwd_kernel[(num_blocks, B)](*latents, sigma, partial, beta, B, M, num_blocks,
                                         HAS_KL=has_kl, BLOCK=BLOCK)
        loss = torch.empty(B, dtype=torch.float32, device=v_new.device)
        coef = torch.empty(2, B, dtype=torch.float32, device=v_new.device)
        _nft_finish_kernel[(B,)](partial, sigma, advantages, loss, coef, beta, adv_clip_max, kl_beta, B, M,
                                 num_blocks, WEIGHT_FLOOR=WEIGHT_FLOOR, HAS_KL=has_kl,
                                 BLOCK_P=min(1024, triton.next_power_of_2(num_blocks)))
        ctx.save_for_backward(*latents, sigma, coef)
        ctx.beta, ctx.kl_beta, ctx.shape, ctx.dtype = beta, kl_beta, v_new.shape, v_new.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        v_new, v_old, v_ref, x_t, x0, sigma, coef = ctx.saved_tensors
        B, M = v_new.shape
        grad_v = torch.empty(B, M, dtype=ctx.dtype, device=v_new.device)
        BLOCK = _block_size()
        # The incoming (B,) grad is usually mean's expanded scalar (stride 0): read it by stride.
        _nft_bwd_kernel[(triton.cdiv(M, BLOCK), B)](v_new, v_old, v_ref, x_t, x0, sigma, coef, grad_loss,
                                                    grad_loss.stride(0), grad_v, ctx.beta, ctx.kl_beta, B, M,
                                                    HAS_KL=ctx.kl_beta > 0, BLOCK=BLOCK)
        return grad_v.view(ctx.shape), *([None] * 9)


def _nft_loss_triton(v_new, v_old, v_ref, x_t, x0, sigma, advantages, *, beta, adv_clip_max, kl_beta=0.0):
    _check_args(v_new, v_old, v_ref, x_t, x0, advantages, beta, adv_clip_max, kl_beta)
    detached = [None if t is None else t.detach() for t in (v_old, v_ref, x_t, x0)]
    return _NftPerSampleLoss.apply(v_new, *detached, sigma, advantages, float(beta), float(adv_clip_max),
                                   float(kl_beta)).mean()


def nft_loss(v_new, v_old, v_ref, x_t, x0, sigma, advantages, *, beta, adv_clip_max, kl_beta=0.0, backend=None):
    """The DiffusionNFT loss: a scalar, differentiable w.r.t. `v_new` only.

    With σ the per-sample noise level, x_t = (1 − σ)·x0 + σ·noise (Wan's flow matching; the
    official SD3 script's t = timestep/1000 is the same σ), velocities predicting x0 as
    x_t − σ·v, β = `beta`, A = `adv_clip_max`, and means over every non-batch element:

        r      = clip(clip(advantage, ±A)/A/2 + 1/2, 0, 1)          optimality probability
        e₊     = x_t − σ·(β·v_new + (1 − β)·v_old) − x0              implicit positive policy's x0 error
        e₋     = x_t − σ·((1 + β)·v_old − β·v_new) − x0              implicit negative policy's
        w±     = max(mean|e±|, 1e-5), detached                       adaptive weights
        policy = r·mean(e₊²)/w₊/β + (1 − r)·mean(e₋²)/w₋/β
        loss   = mean_b(A·policy) + kl_beta·mean_b(mean((v_new − v_ref)²))

    v_new: (B, ...) the trained model's velocity; v_old: the sampling (old) policy's; v_ref: the
    reference model's, only read when kl_beta > 0 (None is accepted then); x_t, x0: the noised and
    clean latents; sigma: (B,) or a scalar; advantages: (B,). Arithmetic is fp32 whatever the
    latent dtype (float64 in the reference for float64 inputs); the gradient has v_new's dtype.
    `backend`: see `idgrpo.kernels.backend`.
    """
    impl = nft_loss_reference if resolve(backend, v_new, v_old, v_ref, x_t, x0) == "reference" \
        else _nft_loss_triton
    return impl(v_new, v_old, v_ref, x_t, x0, sigma, advantages, beta=beta, adv_clip_max=adv_clip_max,
                kl_beta=kl_beta)
