"""Fused attention: QK^T, online softmax, PV, forward and backward (dq, dk, dv).

One function serves every attention in the project:

- Wan DiT self-attention (B, L, H, D) with optional per-sample key lengths (padding);
- Wan cross-attention to the text (Lq != Lk, variable text lengths via `k_lens`);
- the Qwen2.5-VL language model: causal, grouped-query heads (H a multiple of Hkv);
- the Qwen2.5-VL vision tower: packed variable-length sequences (`cu_seqlens`), D = 80.

Conventions: layout (B, L, H, D) (what the projections produce: no transposes around the
call); causal masks are bottom-right aligned (query i sees key j iff j <= i + Lk - Lq,
the flash-attn convention); a query row that sees no key at all returns 0 (not NaN).

Design of the Triton path (FlashAttention-2 style):

- Forward: one program per (query block, head, sequence). It loads its query tile once
  and loops over key tiles with an online softmax (running max and sum in fp32, exp2 with
  the scale folded in); it writes O and the row log-sum-exp (log2 units, +inf for rows
  that see no key) for the backward. Causal programs stop at their last row's diagonal.
- Backward: a small kernel computes delta = rowsum(dO * O); one kernel per
  (key block, kv head, sequence) accumulates dk and dv over all query tiles of all query
  heads of its GQA group (one flat loop), and a separate kernel per (query block, head,
  sequence) accumulates dq over key tiles. Each gradient element is owned by exactly one
  program, so there are no atomics: results do not depend on scheduling. Both reduce over
  32-wide tiles so that their accumulators and per-step tiles fit in registers on Ampere
  and Hopper; each target autotunes over its own spill-free configs (`attention_configs`,
  Note [registers of the backward]).
- Determinism and batch invariance: every sum runs in a fixed order inside one program,
  the tile being reduced over has a fixed size whatever config the autotuner picks, and
  the autotune key leaves out the batch size (Note [fixed reduction tiles]). A sample is
  bitwise identical alone or inside a batch; a run is bitwise identical to the next.
- Varlen and GQA map onto the same grid: the grid's third axis is the sample (dense) or
  the sequence (varlen: the batch stride is 0 and each program reads its start and length
  from cu_seqlens; programs past a short sequence's end return at once); query head h
  reads kv head h // (H // Hkv), so GQA needs no copy of k and v.
- Only edge tiles (padding keys, sequence ends, the causal diagonal) are masked; tiles
  wholly inside the visible region run mask-free (Note [masked and unmasked tiles]).
- Head dims that are not powers of two (80) run in the next power-of-two tile (128) with
  masked loads. fp32 inputs use IEEE fp32 dots (no TF32), bf16/fp16 accumulate in fp32.
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
# Triton kernels
# ----------------------------------------------------------------------------------------

# Note [fixed reduction tiles]: the tile that a kernel *reduces over* (keys in the forward
# and dq kernels, queries in the dk/dv kernel) has a fixed size, and only the other tile,
# the warps and the stages are autotuned. The order of every floating-point sum then does
# not depend on which config the autotuner picks, so a result cannot change between two
# processes that tuned differently. The autotune key leaves out the batch size (and the
# number of varlen sequences), so a sample computed alone and inside a batch always runs
# the same config: batch invariance.
#
# Note [registers of the backward]: a program of the backward keeps fp32 accumulators of a
# whole tile (dk and dv: 2 x BLOCK_N x BLOCK_D; dq: BLOCK_M x BLOCK_D) in registers for its
# whole loop, next to the (tile x reduced tile) scores, probabilities and their gradients of
# the current step. Registers a thread may hold end at 255, and past them ptxas spills to
# local memory on every loop step. What keeps the backward inside them:
# - the backward kernels reduce over 32-wide tiles (the forward over 64): the per-step
#   tiles halve, and their reduction order stays fixed (Note [fixed reduction tiles]);
# - the dk/dv kernel walks the query heads of its GQA group and their query tiles as one flat
#   loop, head after head, masking only edge tiles under a branch: a loop over heads around
#   pipelined loops over tiles (unmasked, masked) alone made every config spill with grouped
#   heads;
# - 8 warps share a 128-row tile (4 warps would hold twice the accumulator per thread). A
#   64-row tile takes 8 warps on Ampere but 4 on Hopper, where a warpgroup (4 warps) covers
#   64 rows of a wgmma: Triton lays 8 warps over a 64-row scores tile as two warpgroups
#   computing the same rows twice (warpsPerCTA [8, 1] in the TTGIR);
# - the autotuner tries, per target, only configs that compile without spills for every
#   case `python -m bench.aot --only attention` covers (head dims 64, 80, 128; bf16, fp16;
#   causal or not; dense, padded or varlen): `attention_configs`. That check compiles with
#   Triton for sm_80 and sm_90 on a machine without a GPU and fails on any spill here; its
#   table (bench/results/aot-*.txt) lists registers and spills per config.
_REDUCE_TILES = {"fwd": 64, "dkdv": 32, "dq": 32}
_TUNED_TILE_NAMES = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}
# (tuned tile, num_warps, num_stages) per kernel and target (compute capability). The first
# config of the Ampere list is the one the interpreter runs.
_TUNED_CONFIGS = {
    "fwd": {
        80: [(64, 4, 2), (64, 4, 3), (128, 8, 3)],
        90: [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3)],
    },
    "dkdv": {
        80: [(64, 8, 2), (64, 8, 3)],
        90: [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3)],
    },
    "dq": {
        80: [(64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2), (128, 8, 3)],
        90: [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3)],
    },
}


def attention_configs(kind: str, capability: int) -> list[tuple[int, int, int]]:
    """The (tuned tile, num_warps, num_stages) configs the autotuner of attention kernel `kind`
    ("fwd", "dkdv" or "dq") tries on a GPU of compute capability `capability` (major * 10 +
    minor: 80 for A100, 90 for H100). 9.0 and later get the Hopper list, earlier GPUs the
    Ampere one; only sm_80 and sm_90 are checked for spills (Note [registers of the backward])."""
    if kind not in _TUNED_CONFIGS:
        raise ValueError(f"attention kernel kind {kind!r}: expected one of {', '.join(_TUNED_CONFIGS)}")
    return list(_TUNED_CONFIGS[kind][90 if capability >= 90 else 80])


def _candidate_options(kind: str) -> list[tuple[int, int, int]]:
    """Every config of `kind` on any target, the Ampere list first."""
    return list(dict.fromkeys(option for per_target in _TUNED_CONFIGS[kind].values() for option in per_target))


def _candidate_configs(kind: str) -> list:
    """The autotuner's configs: every target's (its pruning keeps the device's own list); the
    interpreter keeps the first."""
    tile = _TUNED_TILE_NAMES[kind]
    return _backend.autotune_configs([triton.Config({tile: size}, num_warps=warps, num_stages=stages)
                                      for size, warps, stages in _candidate_options(kind)])


def _pruning(kind: str) -> dict:
    """The autotuner's early pruning for kernel `kind`: the configs of the device's target (in
    the order of its list), and only the first of them for fp32, the accuracy path (tests,
    debugging), whose IEEE-fp32 dots take minutes to compile per config. Tensors on the CPU
    run under the interpreter, which has one config anyway."""
    tile = _TUNED_TILE_NAMES[kind]

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        if q.device.type != "cpu":
            major, minor = torch.cuda.get_device_capability(q.device)
            held = {(c.kwargs[tile], c.num_warps, c.num_stages): c for c in configs}
            configs = [held[option] for option in attention_configs(kind, major * 10 + minor) if option in held]
        return configs[:1] if q.dtype == torch.float32 else configs

    return {"early_config_prune": prune}


_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "VARLEN", "HAS_K_LENS", "TUNE_LEN_Q", "TUNE_LEN_K"]


if _backend.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _sequence_bounds(batch, CU_Q, CU_K, K_LENS, len_q, len_k,
                         VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr):
        """Where program `batch`'s sequence starts in the (packed) token axis, how long its
        queries and keys are, how many keys are unmasked, and the causal diagonal offset."""
        if VARLEN:
            q_start = tl.load(CU_Q + batch)
            q_len = tl.load(CU_Q + batch + 1) - q_start
            k_start = tl.load(CU_K + batch)
            k_len = tl.load(CU_K + batch + 1) - k_start
        else:
            q_start = 0
            q_len = len_q
            k_start = 0
            k_len = len_k
        k_valid = k_len
        if HAS_K_LENS:
            k_valid = tl.minimum(k_len, tl.load(K_LENS + batch))
        # Causal, bottom-right aligned: query i sees key j iff j <= i + causal_offset.
        causal_offset = k_len - q_len
        return q_start, q_len, k_start, k_len, k_valid, causal_offset

    @triton.jit
    def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
        """A (rows, BLOCK_D) tile; masks only what can be out of bounds (zeros there)."""
        if MASK_ROWS:
            if PAD_D:
                tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            if PAD_D:
                tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs)
        return tile

    @triton.jit
    def _visible(rows, cols, k_valid, causal_offset, CAUSAL: tl.constexpr):
        """(BLOCK_M, BLOCK_N) mask of the keys `cols` each query `rows` may attend to."""
        visible = (cols < k_valid)[None, :] & (rows >= 0)[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        return visible

    # Note [masked and unmasked tiles]: tiles that lie entirely inside the visible region
    # (no padding key, no sequence end, wholly below the causal diagonal) run without any
    # mask; only the edge tiles pay for masking. The tiles are still visited in the same
    # order, and masking a visible element is the identity, so the split changes no bit.

    @triton.jit
    def _fwd_key_tiles(acc, row_sum, row_max, q, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
                       start_n, end_n, k_valid, causal_offset, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        """Online softmax over the key tiles [start_n, end_n) for one query tile."""
        offs_n = tl.arange(0, BLOCK_N)
        for tile_n in range(start_n, end_n, BLOCK_N):
            cols = tile_n + offs_n
            kv_rows = (k_start + cols).to(tl.int64)[:, None]
            k = _load_tile(k_base + kv_rows * stride_kl, cols < k_valid, d_ok, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
            v = _load_tile(v_base + kv_rows * stride_vl, cols < k_valid, d_ok, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            if MASKED:
                scores = tl.where(_visible(rows, cols, k_valid, causal_offset, CAUSAL), scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            # A row that has seen only masked keys keeps max -inf; shift by 0 so that
            # exp2(-inf - shift) = 0 instead of exp2(-inf + inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            correction = tl.exp2(row_max - shift)
            probs = tl.exp2(scores - shift[:, None])
            row_sum = row_sum * correction + tl.sum(probs, 1)
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        return acc, row_sum, row_max

    @triton.autotune(configs=_candidate_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_pruning("fwd"))
    @triton.jit
    def _attention_fwd_kernel(
        Q, K, V, O, LSE, K_LENS, CU_Q, CU_K,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        stride_lse_b, stride_lse_h,
        len_q, len_k, sm_scale, group,
        TUNE_LEN_Q, TUNE_LEN_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program = one (query tile, head, sequence): loops over key tiles with an
        online softmax; writes O and the row log-sum-exp (log2 units) for the backward."""
        block_m = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2)
        q_start, q_len, k_start, k_len, k_valid, causal_offset = _sequence_bounds(
            batch, CU_Q, CU_K, K_LENS, len_q, len_k, VARLEN, HAS_K_LENS)
        first_row = block_m * BLOCK_M
        if first_row >= q_len:
            return
        kv_head = head // group
        rows = first_row + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        d_ok = offs_d < HEAD_DIM  # head dim 80 runs in a 128-wide tile

        q_rows = (q_start + rows).to(tl.int64)[:, None]
        q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh + q_rows * stride_ql + offs_d[None, :],
                       row_ok, d_ok, True, PAD_D)  # (BLOCK_M, BLOCK_D)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh + offs_d[None, :]
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh + offs_d[None, :]

        qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        end_n = k_valid
        full_end = k_valid  # keys below it are visible to every row of the tile
        if CAUSAL:  # keys past the last row's diagonal are invisible to the whole tile
            end_n = tl.minimum(end_n, first_row + BLOCK_M + causal_offset)
            full_end = tl.minimum(full_end, first_row + causal_offset + 1)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
        acc, row_sum, row_max = _fwd_key_tiles(
            acc, row_sum, row_max, q, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
            0, full_end, k_valid, causal_offset, qk_scale, False, CAUSAL, PAD_D, DOT_PRECISION, BLOCK_N)
        acc, row_sum, row_max = _fwd_key_tiles(
            acc, row_sum, row_max, q, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
            full_end, end_n, k_valid, causal_offset, qk_scale, True, CAUSAL, PAD_D, DOT_PRECISION, BLOCK_N)

        sees_a_key = row_sum > 0.0
        out = acc / tl.where(sees_a_key, row_sum, 1.0)[:, None]
        # +inf for rows without keys: the backward's exp2(s - lse) is then exactly 0.
        lse = tl.where(sees_a_key, row_max + tl.log2(tl.where(sees_a_key, row_sum, 1.0)), float("inf"))
        o_ptrs = O + batch.to(tl.int64) * stride_ob + head * stride_oh + q_rows * stride_ol + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse_ptrs = LSE + batch.to(tl.int64) * stride_lse_b + head * stride_lse_h + q_start + rows
        tl.store(lse_ptrs, lse, mask=row_ok)

    @triton.jit
    def _attention_bwd_delta_kernel(
        O, DO, DELTA, CU_Q,
        stride_ob, stride_ol, stride_oh,
        stride_dob, stride_dol, stride_doh,
        stride_lse_b, stride_lse_h,
        len_q,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """delta = rowsum(dO * O) in fp32, the softmax-Jacobian term shared by dq and dk."""
        block_m = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2)
        if VARLEN:
            q_start = tl.load(CU_Q + batch)
            q_len = tl.load(CU_Q + batch + 1) - q_start
        else:
            q_start = 0
            q_len = len_q
        if block_m * BLOCK_M >= q_len:
            return
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
        token = (q_start + rows).to(tl.int64)[:, None]
        o = tl.load(O + batch.to(tl.int64) * stride_ob + head * stride_oh + token * stride_ol + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + batch.to(tl.int64) * stride_dob + head * stride_doh + token * stride_dol
                     + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + batch.to(tl.int64) * stride_lse_b + head * stride_lse_h + q_start + rows, delta,
                 mask=rows < q_len)

    @triton.jit
    def _dkdv_query_tiles(dk, dv, k, v, q_group, do_group, lse_group, delta_group,
                          stride_ql, stride_qh, stride_dol, stride_doh, stride_lse_h, group,
                          q_start, q_len, cols, k_valid, causal_offset, qk_scale, d_ok,
                          begin_m, full_start, full_end, end_m,
                          CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
        """Accumulates dk, dv of one key tile over the query tiles [begin_m, end_m) of every
        query head of the GQA group (`*_group` point at its first head), head after head, in
        ascending tiles; only tiles outside [full_start, full_end) are masked. Tiles are
        transposed (keys x queries) so dk and dv accumulate without transposes.

        One flat loop over (head, tile), with the mask under a branch: a loop over heads
        around pipelined loops over tiles kept more registers live and spilled on every
        target (Note [registers of the backward]), and per-region loops would visit the heads
        in an order that depends on the key tile (Note [fixed reduction tiles])."""
        offs_m = tl.arange(0, BLOCK_M)
        n_tiles = tl.cdiv(tl.maximum(end_m - begin_m, 0), BLOCK_M)
        for step in range(0, group * n_tiles):
            member = step // n_tiles
            tile_m = begin_m + (step - member * n_tiles) * BLOCK_M
            rows = tile_m + offs_m
            row_ok = rows < q_len
            q_rows = (q_start + rows).to(tl.int64)[:, None]
            q = _load_tile(q_group + member * stride_qh + q_rows * stride_ql, row_ok, d_ok, True,
                           PAD_D)  # (BLOCK_M, BLOCK_D)
            do = _load_tile(do_group + member * stride_doh + q_rows * stride_dol, row_ok, d_ok, True,
                            PAD_D)  # (BLOCK_M, BLOCK_D)
            stats = member * stride_lse_h + rows
            lse = tl.load(lse_group + stats, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_group + stats, mask=row_ok, other=0.0)
            scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            probs_t = tl.exp2(scores_t - lse[None, :])
            if (tile_m < full_start) | (tile_m >= full_end):
                visible_t = (cols < k_valid)[:, None] & row_ok[None, :]
                if CAUSAL:
                    visible_t = visible_t & (cols[:, None] <= rows[None, :] + causal_offset)
                probs_t = tl.where(visible_t, probs_t, 0.0)
            dv += tl.dot(probs_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dprobs_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dscores_t = probs_t * (dprobs_t - delta[None, :])
            dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.autotune(configs=_candidate_configs("dkdv"), key=_TUNE_KEY, prune_configs_by=_pruning("dkdv"))
    @triton.jit
    def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, K_LENS, CU_Q, CU_K,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_dob, stride_dol, stride_doh,
        stride_dkb, stride_dkl, stride_dkh,
        stride_dvb, stride_dvl, stride_dvh,
        stride_lse_b, stride_lse_h,
        len_q, len_k, sm_scale, group,
        TUNE_LEN_Q, TUNE_LEN_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program = one (key tile, kv head, sequence): accumulates dk and dv over every
        query tile of every query head in its GQA group, in a fixed order (no atomics)."""
        block_n = tl.program_id(0)
        kv_head = tl.program_id(1)
        batch = tl.program_id(2)
        q_start, q_len, k_start, k_len, k_valid, causal_offset = _sequence_bounds(
            batch, CU_Q, CU_K, K_LENS, len_q, len_k, VARLEN, HAS_K_LENS)
        first_col = block_n * BLOCK_N
        if first_col >= k_len:
            return
        cols = first_col + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        kv_rows = (k_start + cols).to(tl.int64)[:, None]
        k = _load_tile(K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh + kv_rows * stride_kl
                       + offs_d[None, :], cols < k_valid, d_ok, True, PAD_D)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh + kv_rows * stride_vl
                       + offs_d[None, :], cols < k_valid, d_ok, True, PAD_D)  # (BLOCK_N, BLOCK_D)
        qk_scale = sm_scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        # Query tiles [begin_m, full_start) straddle the causal diagonal, [full_start,
        # full_end) see every key of this tile, [full_end, end_m) hold the sequence end.
        # Keys that are all padding get zero gradients: their loop is empty.
        end_m = tl.where(first_col < k_valid, q_len, 0)
        begin_m = 0
        full_start = 0
        if CAUSAL:  # queries before this tile's first diagonal see none of its keys
            begin_m = tl.maximum(first_col - causal_offset, 0) // BLOCK_M * BLOCK_M
            full_start = tl.cdiv(tl.maximum(first_col + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(full_start, begin_m), end_m)
        full_end = tl.where(first_col + BLOCK_N <= k_valid, q_len // BLOCK_M * BLOCK_M, 0)
        full_end = tl.minimum(tl.maximum(full_end, full_start), end_m)
        first_head = kv_head * group
        q_group = Q + batch.to(tl.int64) * stride_qb + first_head * stride_qh + offs_d[None, :]
        do_group = DO + batch.to(tl.int64) * stride_dob + first_head * stride_doh + offs_d[None, :]
        stats_group = batch.to(tl.int64) * stride_lse_b + first_head * stride_lse_h + q_start
        lse_group = LSE + stats_group
        delta_group = DELTA + stats_group
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, q_group, do_group, lse_group, delta_group, stride_ql, stride_qh, stride_dol, stride_doh,
            stride_lse_h, group, q_start, q_len, cols, k_valid, causal_offset, qk_scale, d_ok,
            begin_m, full_start, full_end, end_m, CAUSAL, PAD_D, DOT_PRECISION, BLOCK_M)
        dk = dk * sm_scale

        out_mask = (cols < k_len)[:, None] & d_ok[None, :]
        tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head * stride_dkh + kv_rows * stride_dkl
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head * stride_dvh + kv_rows * stride_dvl
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
                      start_n, end_n, k_valid, causal_offset, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        """Accumulates dq of one query tile over the key tiles [start_n, end_n)."""
        offs_n = tl.arange(0, BLOCK_N)
        for tile_n in range(start_n, end_n, BLOCK_N):
            cols = tile_n + offs_n
            kv_rows = (k_start + cols).to(tl.int64)[:, None]
            k = _load_tile(k_base + kv_rows * stride_kl, cols < k_valid, d_ok, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
            v = _load_tile(v_base + kv_rows * stride_vl, cols < k_valid, d_ok, MASKED, PAD_D)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            probs = tl.exp2(scores - lse[:, None])
            if MASKED:
                probs = tl.where(_visible(rows, cols, k_valid, causal_offset, CAUSAL), probs, 0.0)
            dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            dscores = probs * (dprobs - delta[:, None])
            dq += tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)
        return dq

    @triton.autotune(configs=_candidate_configs("dq"), key=_TUNE_KEY, prune_configs_by=_pruning("dq"))
    @triton.jit
    def _attention_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, K_LENS, CU_Q, CU_K,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_dob, stride_dol, stride_doh,
        stride_dqb, stride_dql, stride_dqh,
        stride_lse_b, stride_lse_h,
        len_q, len_k, sm_scale, group,
        TUNE_LEN_Q, TUNE_LEN_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program = one (query tile, head, sequence): accumulates dq over key tiles."""
        block_m = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2)
        q_start, q_len, k_start, k_len, k_valid, causal_offset = _sequence_bounds(
            batch, CU_Q, CU_K, K_LENS, len_q, len_k, VARLEN, HAS_K_LENS)
        first_row = block_m * BLOCK_M
        if first_row >= q_len:
            return
        kv_head = head // group
        rows = first_row + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        d_ok = offs_d < HEAD_DIM
        q_rows = (q_start + rows).to(tl.int64)[:, None]
        q = _load_tile(Q + batch.to(tl.int64) * stride_qb + head * stride_qh + q_rows * stride_ql + offs_d[None, :],
                       row_ok, d_ok, True, PAD_D)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO + batch.to(tl.int64) * stride_dob + head * stride_doh + q_rows * stride_dol
                        + offs_d[None, :], row_ok, d_ok, True, PAD_D)  # (BLOCK_M, BLOCK_D)
        stats_ptrs = batch.to(tl.int64) * stride_lse_b + head * stride_lse_h + q_start + rows
        lse = tl.load(LSE + stats_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stats_ptrs, mask=row_ok, other=0.0)
        k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh + offs_d[None, :]
        v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh + offs_d[None, :]
        qk_scale = sm_scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        end_n = k_valid
        full_end = k_valid
        if CAUSAL:
            end_n = tl.minimum(end_n, first_row + BLOCK_M + causal_offset)
            full_end = tl.minimum(full_end, first_row + causal_offset + 1)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
        dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
                           0, full_end, k_valid, causal_offset, qk_scale, False, CAUSAL, PAD_D, DOT_PRECISION,
                           BLOCK_N)
        dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, k_start, rows, d_ok,
                           full_end, end_n, k_valid, causal_offset, qk_scale, True, CAUSAL, PAD_D, DOT_PRECISION,
                           BLOCK_N)
        dq = dq * sm_scale
        tl.store(DQ + batch.to(tl.int64) * stride_dqb + head * stride_dqh + q_rows * stride_dql + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, uninitialised: the kernels must write
    all of it. The tests swap this for a NaN-filled allocation to catch skipped elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Geometry:
    """How tensors map to kernel programs. Dense (B, L, H, D): one program column per
    sample. Varlen (T, H, D): one program column per sequence; the batch stride is 0 and
    each program finds its tokens through cu_seqlens."""

    def __init__(self, q, k, causal, scale, k_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        self.causal = bool(causal)
        self.head_dim = q.shape[-1]
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)
        self.n_heads, self.n_kv_heads = q.shape[-2], k.shape[-2]
        self.group = self.n_heads // self.n_kv_heads
        self.dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
        dummy = torch.empty(1, dtype=torch.int32, device=q.device)  # stands in for absent pointers
        self.k_lens = dummy if k_lens is None else k_lens.to(device=q.device, dtype=torch.int32)
        self.has_k_lens = k_lens is not None
        if self.varlen:
            self.cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
            self.cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
            self.batch = self.cu_q.shape[0] - 1
            if max_seqlen_q is None:  # a host sync; pass max_seqlen_* to avoid it
                max_seqlen_q = int((self.cu_q[1:] - self.cu_q[:-1]).max()) if self.batch else 0
            if max_seqlen_k is None:
                max_seqlen_k = int((self.cu_k[1:] - self.cu_k[:-1]).max()) if self.batch else 0
            self.len_q, self.len_k = int(max_seqlen_q), int(max_seqlen_k)
        else:
            self.cu_q = self.cu_k = dummy
            self.batch, self.len_q, self.len_k = q.shape[0], q.shape[1], k.shape[1]
        # Autotune buckets: lengths rounded up to a power of two, so a new length does not
        # trigger a new tuning run (and the batch size is never part of the key).
        self.tune_len_q = triton.next_power_of_2(max(self.len_q, 1))
        self.tune_len_k = triton.next_power_of_2(max(self.len_k, 1))

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, token, head) strides; the head-dim stride is 1."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def stats_buffer(self, q) -> tuple[torch.Tensor, int, int]:
        """An fp32 per-(sequence, head, query) buffer (LSE, delta) and its (batch, head) strides."""
        if self.varlen:
            buf = _output_buffer((self.n_heads, q.shape[0]), torch.float32, q.device)  # (H, Tq)
            return buf, 0, buf.stride(0)
        buf = _output_buffer((q.shape[0], self.n_heads, q.shape[1]), torch.float32, q.device)  # (B, H, Lq)
        return buf, buf.stride(0), buf.stride(1)

    def common(self) -> dict:
        return dict(len_q=self.len_q, len_k=self.len_k, sm_scale=self.scale, group=self.group,
                    TUNE_LEN_Q=self.tune_len_q, TUNE_LEN_K=self.tune_len_k,
                    HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, PAD_D=self.block_d != self.head_dim,
                    CAUSAL=self.causal, VARLEN=self.varlen,
                    HAS_K_LENS=self.has_k_lens, DOT_PRECISION=self.dot_precision)


def _attention_forward(q, k, v, geo: _Geometry):
    out = _output_buffer(q.shape, q.dtype, q.device)
    lse, stride_lse_b, stride_lse_h = geo.stats_buffer(q)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(geo.len_q, meta["BLOCK_M"]), geo.n_heads, geo.batch)  # noqa: E731
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, geo.k_lens, geo.cu_q, geo.cu_k,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(out),
        stride_lse_b, stride_lse_h, **geo.common(), BLOCK_N=_REDUCE_TILES["fwd"],
    )
    return out, lse


def _attention_backward(q, k, v, out, lse, grad_out, geo: _Geometry):
    grad_q = _output_buffer(q.shape, q.dtype, q.device)
    grad_k = _output_buffer(k.shape, k.dtype, k.device)
    grad_v = _output_buffer(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    delta, stride_lse_b, stride_lse_h = geo.stats_buffer(q)
    delta_tile = 64
    _attention_bwd_delta_kernel[(triton.cdiv(geo.len_q, delta_tile), geo.n_heads, geo.batch)](
        out, grad_out, delta, geo.cu_q, *geo.strides(out), *geo.strides(grad_out), stride_lse_b, stride_lse_h,
        geo.len_q, HEAD_DIM=geo.head_dim, BLOCK_D=geo.block_d, VARLEN=geo.varlen, BLOCK_M=delta_tile,
    )
    strides_qkv_do = (*geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(grad_out))
    grid_kv = lambda meta: (triton.cdiv(geo.len_k, meta["BLOCK_N"]), geo.n_kv_heads, geo.batch)  # noqa: E731
    _attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, grad_k, grad_v, lse, delta, geo.k_lens, geo.cu_q, geo.cu_k,
        *strides_qkv_do, *geo.strides(grad_k), *geo.strides(grad_v), stride_lse_b, stride_lse_h,
        **geo.common(), BLOCK_M=_REDUCE_TILES["dkdv"],
    )
    grid_q = lambda meta: (triton.cdiv(geo.len_q, meta["BLOCK_M"]), geo.n_heads, geo.batch)  # noqa: E731
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, grad_q, lse, delta, geo.k_lens, geo.cu_q, geo.cu_k,
        *strides_qkv_do, *geo.strides(grad_q), stride_lse_b, stride_lse_h,
        **geo.common(), BLOCK_N=_REDUCE_TILES["dq"],
    )
    return grad_q, grad_k, grad_v


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geo: _Geometry):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _attention_forward(q, k, v, geo)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geo = geo
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _attention_backward(q, k, v, out, lse, _last_dim_contiguous(grad_out), ctx.geo)
        return *grads, None


def _attention_triton(q, k, v, causal, scale, k_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if q.dtype not in _TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"the Triton attention takes q, k, v of one dtype among fp32/bf16/fp16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}; use backend='reference' for others")
    geo = _Geometry(q, k, causal, scale, k_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _TritonAttention.apply(q, k, v, geo)


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
    if _backend.resolve(backend, q, k, v) == "triton":
        return _attention_triton(q, k, v, causal, scale, k_lens, cu_seqlens_q, cu_seqlens_k,
                                 max_seqlen_q, max_seqlen_k)
    return attention_reference(q, k, v, causal=causal, scale=scale, k_lens=k_lens,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
