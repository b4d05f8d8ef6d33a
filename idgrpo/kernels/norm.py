"""Normalisation glue of the DiT and the VLM: RMSNorm, LayerNorm, fused LN + adaLN modulation,
gated residual add.

All statistics and arithmetic run in fp32 (float64 inputs stay float64); outputs take the
input dtype unless stated. Where they are used: docs/models.md#transformer-block (Wan block),
#dit-numerics-and-precision and #qwen-reward-backbone (Qwen).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


# ----------------------------------------------------------------------------- Triton kernels
#
# Every kernel sees x as (N, C) rows with a unit column stride; row r belongs to sample
# r // L (L = rows per sample; for rms_norm/layer_norm the whole tensor is one "sample").
# The per-row weight is W[sample * w_sample_stride + c]: stride 0 for an ordinary affine
# weight, C for adaLN's per-sample (1 + scale). Reductions over rows (weight/shift/scale/gate
# gradients) are written as per-program partials and summed in a fixed order by torch:
# no atomics, so gradients are bitwise reproducible.


@triton.jit
def _norm_fwd_kernel(X, Y, W, Bias, Mean, Rstd, N, L, C, stride_x, stride_y, w_sample_stride, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, W_PLUS_ONE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    cols = tl.arange(0, BLOCK_C)  # (C,)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    sample = (rows // L).to(tl.int64)
    if HAS_W:
        w = tl.load(W + sample[:, None] * w_sample_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if W_PLUS_ONE:
            w = w + 1.0
        y = y * w
    if HAS_B:
        y += tl.load(Bias + sample[:, None] * w_sample_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(X, DY, W, DX, DW_partial, DB_partial, Mean, Rstd, L, C, rows_per_prog, num_partials,
                     stride_x, stride_dy, stride_dx, w_sample_stride,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, W_PLUS_ONE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (samples, num_partials): program p of sample s owns rows [p * rows_per_prog, ...) of s.
    sample = tl.program_id(0)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_W:
        w = tl.load(W + sample.to(tl.int64) * w_sample_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        if W_PLUS_ONE:
            w = w + 1.0
    acc_dw = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = part * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        local = first + r0 + tl.arange(0, BLOCK_R)  # row index within the sample
        row_ok = (local < L) & (local < first + rows_per_prog)
        mask = row_ok[:, None] & col_ok[None, :]
        rows = sample.to(tl.int64) * L + local
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
            acc_dw += dy * xhat
        else:
            wdy = dy
        if HAS_B:
            acc_db += dy
        # d/dx of (x - mean) * rstd applied to wdy: rstd * (wdy - xhat * <wdy, xhat>/C - <wdy>/C)
        c1 = tl.sum(wdy * xhat, axis=1) / C
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / C
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    slot = (sample.to(tl.int64) * num_partials + part) * C
    if HAS_W:
        tl.store(DW_partial + slot + cols, tl.sum(acc_dw, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB_partial + slot + cols, tl.sum(acc_db, axis=0), mask=col_ok)


@triton.jit
def _gated_residual_fwd_kernel(X, Y, G, OUT, N, L, C, stride_x, stride_y, stride_out, g_sample_stride,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < N)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    sample = (rows // L).to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + rows64[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + sample[:, None] * g_sample_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], (x + y * g).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(DOUT, Y, G, DY, DG_partial, L, C, rows_per_prog, num_partials,
                               stride_dout, stride_y, stride_dy, g_sample_stride,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (samples, num_partials, column blocks); dy = dout * gate, dgate partial = sum dout * y.
    sample = tl.program_id(0)
    part = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    g = tl.load(G + sample.to(tl.int64) * g_sample_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    first = part * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        local = first + r0 + tl.arange(0, BLOCK_R)
        row_ok = (local < L) & (local < first + rows_per_prog)
        mask = row_ok[:, None] & col_ok[None, :]
        rows = sample.to(tl.int64) * L + local
        dout = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + rows[:, None] * stride_dy + cols[None, :], (dout * g[None, :]).to(DY.dtype.element_ty),
                 mask=mask)
        acc += dout * y
    tl.store(DG_partial + (sample.to(tl.int64) * num_partials + part) * C + cols, tl.sum(acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launch helpers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C) with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_block(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for full-row tiles of width C: ~4K elements per tile."""
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(16, 4096 // block_c))
    num_warps = 4 if block_c * block_r <= 2048 else 8 if block_c * block_r <= 8192 else 16
    return block_r, block_c, num_warps


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_partials(samples: int, rows_per_sample: int, block_r: int, device: torch.device) -> int:
    """Row-range programs per sample for the backward reductions: enough to fill the GPU,
    few enough that the partial buffer stays small. Deterministic for a given shape/device."""
    if device.type == "cuda":
        target = 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4  # interpreter: still exercises several partials
    per_sample = max(1, target // samples)
    return max(1, min(per_sample, triton.cdiv(rows_per_sample, block_r)))


def _per_sample_rows(v: torch.Tensor, batch: int, width: int) -> tuple[torch.Tensor, int]:
    """Modulation vector -> ((B or 1, C) contiguous, sample stride 0 when broadcast)."""
    v2 = v.reshape(-1, width).contiguous()
    if v2.shape[0] not in (1, batch):
        raise ValueError(f"modulation of shape {tuple(v.shape)} does not broadcast to batch {batch}")
    return v2, (0 if v2.shape[0] == 1 and batch > 1 else width)


def _grad_like(grad: torch.Tensor, like: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """(S, P, C) fp32 partials -> a gradient shaped and typed like `like` (sums in a fixed
    order; a vector broadcast over the batch also sums over samples)."""
    grad = grad.sum(dim=1)  # (S, C)
    shape, dtype = like
    if shape.numel() == grad.shape[-1] and grad.shape[0] > 1:
        grad = grad.sum(dim=0, keepdim=True)
    return grad.reshape(shape).to(dtype)


def _norm_forward(x2, weight, bias, w_sample_stride, rows_per_sample, eps, is_rms, w_plus_one, out_dtype):
    N, C = x2.shape
    y = torch.empty((N, C), dtype=out_dtype, device=x2.device)
    mean = torch.empty(N, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x2.device)
    block_r, block_c, num_warps = _row_block(C)
    dummy = rstd
    _norm_fwd_kernel[(triton.cdiv(N, block_r),)](
        x2, y, weight if weight is not None else dummy, bias if bias is not None else dummy, mean, rstd,
        N, rows_per_sample, C, x2.stride(0), y.stride(0), w_sample_stride, eps,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, W_PLUS_ONE=w_plus_one,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return y, mean, rstd


def _norm_backward(dy2, x2, weight, has_bias, w_sample_stride, samples, mean, rstd, is_rms, w_plus_one, dx_dtype):
    N, C = x2.shape
    L = N // samples
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    dx = torch.empty((N, C), dtype=dx_dtype, device=x2.device)
    block_r, block_c, num_warps = _row_block(C)
    parts = _num_partials(samples, L, block_r, x2.device)
    rows_per_prog = triton.cdiv(L, parts)
    has_w = weight is not None
    dw_partial = torch.empty((samples, parts, C), dtype=torch.float32, device=x2.device) if has_w else None
    db_partial = torch.empty((samples, parts, C), dtype=torch.float32, device=x2.device) if has_bias else None
    _norm_bwd_kernel[(samples, parts)](
        x2, dy2, weight if has_w else rstd, dx, dw_partial if has_w else rstd, db_partial if has_bias else rstd,
        mean, rstd, L, C, rows_per_prog, parts, x2.stride(0), dy2.stride(0), dx.stride(0), w_sample_stride,
        IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, W_PLUS_ONE=w_plus_one,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return dx, dw_partial, db_partial


# ----------------------------------------------------------------------------- autograd wrappers


class _RowNorm(torch.autograd.Function):
    """rms_norm / layer_norm: one affine (weight, bias) shared by every row."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        x2 = _rows(x)
        w = None if weight is None else weight.contiguous()
        b = None if bias is None else bias.contiguous()
        y, mean, rstd = _norm_forward(x2, w, b, 0, x2.shape[0], eps, is_rms, False, x.dtype)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.x_shape = is_rms, bias is not None, x.shape
        ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        dx, dw_p, db_p = _norm_backward(_rows(dy), x2, w, ctx.has_bias, 0, 1, mean, rstd, ctx.is_rms, False,
                                        x2.dtype)
        dw = None if w is None else _grad_like(dw_p, (w.shape, w.dtype))
        db = None if db_p is None else _grad_like(db_p, ctx.bias_like)
        return dx.reshape(ctx.x_shape), dw, db, None, None


class _LayerNormModulate(torch.autograd.Function):
    """LN_noaffine(x) * (1 + scale[b]) + shift[b]: adaLN's per-sample affine."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        B, L, C = x.shape
        x2 = _rows(x)
        shift2, shift_stride = _per_sample_rows(shift, B, C)
        scale2, scale_stride = _per_sample_rows(scale, B, C)
        if shift_stride != scale_stride:  # one sample stride serves both in the kernels
            shift2, scale2 = shift2.expand(B, C).contiguous(), scale2.expand(B, C).contiguous()
        stride = max(shift_stride, scale_stride)
        y, mean, rstd = _norm_forward(x2, scale2, shift2, stride, L, eps, False, True, out_dtype or x.dtype)
        ctx.save_for_backward(x2, scale2, mean, rstd)
        ctx.meta = (B, L, C, stride)
        ctx.shift_like, ctx.scale_like = (shift.shape, shift.dtype), (scale.shape, scale.dtype)
        return y.reshape(B, L, C)

    @staticmethod
    def backward(ctx, dy):
        x2, scale2, mean, rstd = ctx.saved_tensors
        B, L, C, stride = ctx.meta
        dx, dscale_p, dshift_p = _norm_backward(_rows(dy), x2, scale2, True, stride, B, mean, rstd, False, True,
                                                x2.dtype)
        dshift, dscale = _grad_like(dshift_p, ctx.shift_like), _grad_like(dscale_p, ctx.scale_like)
        return dx.reshape(B, L, C), dshift, dscale, None, None


class _GatedResidual(torch.autograd.Function):
    """x + y * gate[b]."""

    @staticmethod
    def forward(ctx, x, y, gate):
        B, L, C = x.shape
        x2, y2 = _rows(x), _rows(y)
        gate2, g_stride = _per_sample_rows(gate, B, C)
        out = torch.empty((B * L, C), dtype=x.dtype, device=x.device)
        block_c = min(triton.next_power_of_2(C), 1024)
        block_r = max(1, 4096 // block_c)
        _gated_residual_fwd_kernel[(triton.cdiv(B * L, block_r), triton.cdiv(C, block_c))](
            x2, y2, gate2, out, B * L, L, C, x2.stride(0), y2.stride(0), out.stride(0), g_stride,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
        ctx.save_for_backward(y2, gate2)
        ctx.meta = (B, L, C, g_stride, x.dtype)
        ctx.gate_like = (gate.shape, gate.dtype)
        return out.reshape(B, L, C)

    @staticmethod
    def backward(ctx, dout):
        y2, gate2 = ctx.saved_tensors
        B, L, C, g_stride, x_dtype = ctx.meta
        dout2 = _rows(dout)
        dy = torch.empty_like(y2, memory_format=torch.contiguous_format)
        block_c = min(triton.next_power_of_2(C), 1024)
        block_r = max(1, 4096 // block_c)
        parts = _num_partials(B, L, block_r, dout.device)
        partials = torch.empty((B, parts, C), dtype=torch.float32, device=dout.device)
        _gated_residual_bwd_kernel[(B, parts, triton.cdiv(C, block_c))](
            dout2, y2, gate2, dy, partials, L, C, triton.cdiv(L, parts), parts,
            dout2.stride(0), y2.stride(0), dy.stride(0), g_stride,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
        return dout.to(x_dtype), dy.reshape(B, L, C), _grad_like(partials, ctx.gate_like)


def _triton_rms_norm(x, weight, eps):
    return _RowNorm.apply(x, weight, None, eps, True)


def _triton_layer_norm(x, weight, bias, eps):
    return _RowNorm.apply(x, weight, bias, eps, False)


def _triton_layer_norm_modulate(x, shift, scale, eps, out_dtype):
    return _LayerNormModulate.apply(x, shift, scale, eps, out_dtype)


def _triton_gated_residual(x, y, gate):
    return _GatedResidual.apply(x, y, gate)


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


