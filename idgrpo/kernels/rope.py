"""Rotary position embeddings: Wan's 3-D RoPE (interleaved pairs) and Qwen2.5-VL's M-RoPE
(rotate-half pairs), both applied by one op with a pairing flag.

docs/models.md#wan-rope (Wan: head_dim split d_t = d - 4*floor(d/6), d_h = d_w = 2*floor(d/6),
each axis with its own exponent denominator, theta 10000, interleaved (2i, 2i+1) pairs) and
#language-model-and-m-rope (Qwen: inv_freq = theta^(-2k/D), sections [16, 24, 24] over the D/2 frequency slots,
rotate-half pairs (i, i + D/2)). Tables are built in float64 and stored in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from idgrpo.kernels.backend import resolve


def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels of head_dim carried by the (t, h, w) axes: 128 -> (44, 42, 42)."""
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw
    if head_dim % 2 or d_t <= 0 or d_hw <= 0:
        raise ValueError(f"head_dim={head_dim}: need an even head_dim >= 6")
    return d_t, d_hw, d_hw


def wan_rope_table(grid_sizes: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin fp32 (L, head_dim // 2) for a (F, H, W) token grid flattened row-major (f, h, w)."""
    frames, height, width = (int(s) for s in grid_sizes)
    angles = []  # per axis: (L, d_a // 2)
    grids = torch.meshgrid(torch.arange(frames, dtype=torch.float64), torch.arange(height, dtype=torch.float64),
                           torch.arange(width, dtype=torch.float64), indexing="ij")
    for pos, d_a in zip(grids, wan_axis_dims(head_dim)):
        inv_freq = theta ** (-torch.arange(0, d_a, 2, dtype=torch.float64) / d_a)  # (d_a // 2,)
        angles.append(pos.reshape(-1, 1) * inv_freq)
    angle = torch.cat(angles, dim=-1)  # (L, head_dim // 2)
    return angle.cos().float().to(device), angle.sin().float().to(device)


def mrope_table(position_ids: torch.Tensor, head_dim: int, sections: tuple[int, ...] = (16, 24, 24),
                theta: float = 1_000_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL M-RoPE: position_ids (3, B, L) -> cos/sin fp32 (B, L, head_dim // 2) for
    `apply_rope(..., interleaved=False)`. Frequency slot k takes its position from the
    (t, h, w) row whose section contains k."""
    if position_ids.dim() != 3 or position_ids.shape[0] != len(sections):
        raise ValueError(f"position_ids must be ({len(sections)}, B, L), got {tuple(position_ids.shape)}")
    if sum(sections) != head_dim // 2:
        raise ValueError(f"sections {sections} must sum to head_dim // 2 = {head_dim // 2}")
    device = position_ids.device
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)  # (D/2,)
    row_of_slot = torch.repeat_interleave(torch.arange(len(sections), device=device),
                                          torch.tensor(sections, device=device))  # (D/2,)
    pos = position_ids.to(torch.float64)[row_of_slot]  # (D/2, B, L)
    angle = pos.permute(1, 2, 0) * inv_freq  # (B, L, D/2)
    return angle.cos().float(), angle.sin().float()


# ----------------------------------------------------------------------------- reference


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                         interleaved: bool = True) -> torch.Tensor:
    B, L, H, D = x.shape  # (B, L, H, D)
    n = cos.shape[-2]  # tokens covered by the table; the rest (padding) pass through
    if n > L:
        raise ValueError(f"table covers {n} tokens but x has {L}")
    ct = torch.promote_types(torch.promote_types(x.dtype, torch.float32), cos.dtype)
    c = cos.to(ct).reshape(-1, n, 1, D // 2)  # (B or 1, n, 1, D/2)
    s = sin.to(ct).reshape(-1, n, 1, D // 2)
    xr = x[:, :n].to(ct)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : D // 2], xr[..., D // 2:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[:, n:]), dim=1)


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, BL, L, H, n_table, half,
                 stride_xb, stride_xl, stride_xh, stride_ob, stride_ol, stride_oh, stride_cb, stride_cl,
                 INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    # A program rotates BLOCK_T tokens x all heads: (BLOCK_T, BLOCK_H, BLOCK_P) complex pairs
    # (several tokens per program keep few-head tensors, e.g. Qwen's 2 KV heads, from launching
    # tiny programs). Pair i is channels (2i, 2i+1) when INTERLEAVED (Wan) and (i, i + D/2)
    # otherwise (rotate-half, Qwen). INVERSE rotates by -angle: a rotation's backward is its transpose.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat (b, l) index
    heads = tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    token_ok = tokens < BL
    b = (tokens // L).to(tl.int64)
    l = (tokens % L).to(tl.int64)
    mask = token_ok[:, None, None] & (heads < H)[None, :, None] & (pairs < half)[None, None, :]
    if INTERLEAVED:
        first, second = 2 * pairs, 2 * pairs + 1
    else:
        first, second = pairs, pairs + half
    x_at = X + (b * stride_xb + l * stride_xl)[:, None, None] + (heads * stride_xh)[None, :, None]
    x1 = tl.load(x_at + first[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + second[None, None, :], mask=mask, other=0.0).to(tl.float32)
    # Tokens past the table (padding) pass through unchanged (selected, not rotated by 0).
    in_table = (token_ok & (l < n_table))[:, None] & (pairs < half)[None, :]  # (T, P)
    table = (b * stride_cb + l * stride_cl)[:, None] + pairs[None, :]
    c = tl.load(COS + table, mask=in_table, other=1.0)[:, None, :]
    s = tl.load(SIN + table, mask=in_table, other=0.0)[:, None, :]
    if INVERSE:
        s = -s
    keep = in_table[:, None, :]
    y1 = tl.where(keep, x1 * c - x2 * s, x1)
    y2 = tl.where(keep, x2 * c + x1 * s, x2)
    o_at = OUT + (b * stride_ob + l * stride_ol)[:, None, None] + (heads * stride_oh)[None, :, None]
    tl.store(o_at + first[None, None, :], y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_at + second[None, None, :], y2.to(OUT.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool):
    B, L, H, D = x.shape  # (B, L, H, D)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = cos.shape[-2]
    if n > L:
        raise ValueError(f"table covers {n} tokens but x has {L}")
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    if cos.shape != sin.shape or cos.shape[-1] != D // 2 or cos.dim() not in (2, 3):
        raise ValueError(f"cos/sin must be (L, {D // 2}) or (B, L, {D // 2}), got {tuple(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"table batch {cos.shape[0]} does not match x batch {B}")
    stride_cb = 0 if cos.dim() == 2 or cos.shape[0] == 1 else cos.stride(0)
    out = torch.empty((B, L, H, D), dtype=x.dtype, device=x.device)
    block_h, block_p = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    block_t = max(1, min(16, 2048 // (block_h * block_p)))  # ~2K pairs per program
    _rope_kernel[(triton.cdiv(B * L, block_t),)](
        x, cos, sin, out, B * L, L, H, n, D // 2,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        stride_cb, cos.stride(-2),
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_P=block_p,
        num_warps=4 if block_t * block_h * block_p <= 2048 else 8)
    return out


class _ApplyRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _rope_launch(x, cos, sin, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, ctx.interleaved, inverse=True), None, None, None


# ----------------------------------------------------------------------------- public op


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True,
               backend: str | None = None) -> torch.Tensor:
    """Rotate x (B, L, H, D) by cos/sin (L', D/2) or (B, L', D/2), L' <= L; tokens >= L' unchanged.
    interleaved=True pairs (2i, 2i+1) (Wan); False pairs (i, i + D/2) (Qwen rotate-half)."""
    if resolve(backend, x, cos, sin) == "triton":
        return _ApplyRope.apply(x, cos, sin, interleaved)
    return apply_rope_reference(x, cos, sin, interleaved=interleaved)
