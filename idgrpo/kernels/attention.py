"""Fused attention: QK^T, online softmax, PV, forward and backward (dq, dk, dv).

One function serves every attention in the project:

- Wan DiT self-attention (B, L, H, D) with optional per-sample key lengths (padding);
- Wan cross-attention to the text (Lq != Lk, variable text lengths via `k_lens`);
- the Qwen2.5-VL language model: causal, grouped-query heads (H a multiple of Hkv);
- the Qwen2.5-VL vision tower: packed variable-length sequences (`cu_seqlens`), D = 80.

Conventions: layout (B, L, H, D) (what the projections produce: no transposes around the
call); causal masks are bottom-right aligned (query i sees key j iff j <= i + Lk - Lq,
the flash-attn convention); a query row that sees no key at all returns 0 (not NaN).
"""

from __future__ import annotations

import math

import torch

from idgrpo.kernels import backend as _backend

# ----------------------------------------------------------------------------------------
# Reference (plain PyTorch, the ground truth)
# ----------------------------------------------------------------------------------------


def _dense_reference(q, k, v, causal, scale, k_lens):
    batch, len_q, n_heads, head_dim = q.shape
    len_k, n_kv_heads = k.shape[1], k.shape[2]
    # Softmax statistics in fp32 at least (float64 stays float64 for the test oracle).
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    group = n_heads // n_kv_heads
    qh = q.to(compute_dtype).transpose(1, 2)  # (B, H, Lq, D)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)

    key_index = torch.arange(len_k, device=q.device)
    visible = torch.ones(1, 1, len_q, len_k, dtype=torch.bool, device=q.device)
    if causal:
        query_index = torch.arange(len_q, device=q.device)
        visible = visible & (key_index[None, :] <= query_index[:, None] + (len_k - len_q))
    if k_lens is not None:
        visible = visible & (key_index[None, None, None, :] < k_lens.to(q.device).view(batch, 1, 1, 1))
    # Rows that see no key give 0: give them finite scores so softmax stays NaN-free
    # (also in backward), then zero their probabilities.
    row_sees_a_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~row_sees_a_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_sees_a_key
    out = probs @ vh  # (B, H, Lq, D)
    return out.transpose(1, 2).to(q.dtype)  # (B, Lq, H, D)


def attention_reference(q, k, v, *, causal=False, scale=None, k_lens=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Plain-PyTorch attention with the exact semantics of `attention` (see there).

    Computes in fp32 (float64 when given float64) and returns q.dtype. Varlen inputs are
    handled one sequence at a time (reads cu_seqlens on the host: fine for a reference).
    """
    _check_inputs(q, k, v, k_lens, cu_seqlens_q, cu_seqlens_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        return _dense_reference(q, k, v, causal, scale, k_lens)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(starts_q) - 1):
        q_seq = q[starts_q[s]:starts_q[s + 1]].unsqueeze(0)  # (1, Lq_s, H, D)
        k_seq = k[starts_k[s]:starts_k[s + 1]].unsqueeze(0)  # (1, Lk_s, Hkv, D)
        v_seq = v[starts_k[s]:starts_k[s + 1]].unsqueeze(0)
        outs.append(_dense_reference(q_seq, k_seq, v_seq, causal, scale, None)[0])
    return torch.cat(outs, dim=0)  # (Tq, H, D)


def _check_inputs(q, k, v, k_lens, cu_seqlens_q, cu_seqlens_k):
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("varlen attention needs both cu_seqlens_q and cu_seqlens_k")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError(f"varlen attention takes packed (T, H, D) tensors, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k_lens is not None:
            raise ValueError("k_lens is for dense inputs; varlen sequences carry their lengths in cu_seqlens")
        if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must both be (S + 1,)")
    else:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"attention takes (B, L, H, D) tensors, got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError("q, k and v must have the same batch size")
        if k_lens is not None and k_lens.shape != (q.shape[0],):
            raise ValueError(f"k_lens must be (B,) = ({q.shape[0]},), got {tuple(k_lens.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")


# ----------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, k_lens=None,
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, backend=None):
    """softmax(q k^T * scale + mask) v, differentiable in q, k and v.

    Dense: q (B, Lq, H, D), k/v (B, Lk, Hkv, D) with H % Hkv == 0 (grouped-query heads:
    query head h uses kv head h // (H // Hkv)); returns (B, Lq, H, D) in q.dtype.
    Varlen (packed): q (Tq, H, D), k/v (Tk, Hkv, D), cu_seqlens_q/cu_seqlens_k int32 (S + 1,)
    prefix sums with cu_seqlens[-1] == T; attention stays within each sequence.

    scale: defaults to 1/sqrt(D). k_lens: optional (B,) ints; key j of sample b is masked
    when j >= k_lens[b]. causal: query i sees key j iff j <= i + (Lk - Lq), per sequence
    for varlen. Rows that see no key return 0. max_seqlen_q/k: the longest sequence
    (varlen only); the Triton path reads them from cu_seqlens (a host sync) when omitted.
    """
    _check_inputs(q, k, v, k_lens, cu_seqlens_q, cu_seqlens_k)
    _backend.resolve(backend, q, k, v)  # validates `backend`; the Triton path lands in the next commit
    return attention_reference(q, k, v, causal=causal, scale=scale, k_lens=k_lens,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
