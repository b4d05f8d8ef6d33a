"""Normalisation glue of the DiT and the VLM: RMSNorm, LayerNorm, fused LN + adaLN modulation,
gated residual add.

All statistics and arithmetic run in fp32 (float64 inputs stay float64); outputs take the
input dtype unless stated. Spec: MODELS.md §1.3 (Wan block), §1.5 (precision), §7 (Qwen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idgrpo.kernels.backend import resolve


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 at least; float64 when any input is float64 (the tests' ground truth)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _per_sample(v: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """(B, C), (B, 1, C), (1, C) or (C,) modulation vectors -> (B, 1, C) view."""
    return v.reshape(-1, 1, width).expand(batch, 1, width)


# ----------------------------------------------------------------------------- references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    ct = _compute_dtype(x, weight)
    xf = x.to(ct)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(ct)
    return out.to(x.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    ct = _compute_dtype(x, weight, bias)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    return F.layer_norm(x.to(ct), (x.shape[-1],), w, b, eps).to(x.dtype)


def layer_norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    B, _, C = x.shape  # (B, L, C)
    ct = _compute_dtype(x, shift, scale)
    shift = _per_sample(shift, B, C).to(ct)  # (B, 1, C)
    scale = _per_sample(scale, B, C).to(ct)
    normed = F.layer_norm(x.to(ct), (C,), None, None, eps)
    return (normed * (1 + scale) + shift).to(out_dtype or x.dtype)


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    B, _, C = x.shape  # (B, L, C)
    ct = _compute_dtype(x, y, gate)
    return (x.to(ct) + y.to(ct) * _per_sample(gate, B, C).to(ct)).to(x.dtype)


# ----------------------------------------------------------------------------- public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim (Wan's q/k norm spans the full width, not per head)."""
    if resolve(backend, x, weight) == "triton":
        return _triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, affine when weight/bias are given."""
    if resolve(backend, x, weight, bias) == "triton":
        return _triton_layer_norm(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                        out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """adaLN: LN_noaffine(x) * (1 + scale) + shift. x (B, L, C); shift/scale (B, C) or (B, 1, C)."""
    if resolve(backend, x, shift, scale) == "triton":
        return _triton_layer_norm_modulate(x, shift, scale, eps, out_dtype)
    return layer_norm_modulate_reference(x, shift, scale, eps, out_dtype=out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x + y * gate in fp32, dtype of x. x, y (B, L, C); gate (B, C) or (B, 1, C)."""
    if resolve(backend, x, y, gate) == "triton":
        return _triton_gated_residual(x, y, gate)
    return gated_residual_reference(x, y, gate)


# Note: the Triton paths land in the next commit; until then they run the reference so that
# callers on CUDA already get correct results.
_triton_rms_norm = rms_norm_reference
_triton_layer_norm = layer_norm_reference


def _triton_layer_norm_modulate(x, shift, scale, eps, out_dtype):
    return layer_norm_modulate_reference(x, shift, scale, eps, out_dtype=out_dtype)


_triton_gated_residual = gated_residual_reference
