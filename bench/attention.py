"""Fused attention: TFLOP/s of our Triton kernel against every attention backend available
in the same run (torch SDPA flash / efficient / cuDNN, flash-attn 2 and 3 when importable).

FLOPs follow the standard convention: forward 4 * B * H * Lq * Lk * D (summed over
sequences for varlen), backward 2.5x the forward, fwd+bwd 3.5x. The backward time is
(fwd+bwd) - fwd. Each row also gives the max |difference| of its output from ours.

Shapes (bf16, non-causal, D = 128 unless said):
- wan1.3b-self:   (1, 32760, 12, 128) 81x480x832 video, Wan2.1-1.3B
- wan14b-self:    (1, 32760, 40, 128) Wan2.1-14B
- wan-cross:      32760 queries x 512 text keys, 12 heads
- idgrpo-train:   (8, 3510, 12, 128)  Identity-GRPO's 240x416x33 (9x15x26 tokens), group of 8
- qwenvit-window: varlen, D = 80, 16 heads: 8 images of 32x58 patches cut in 8x8 windows
                  (28 windows of 64 tokens + 4 of 16 each); SDPA runs the windows grouped
                  by length (its best case: no mask)
- qwenvit-full:   varlen, D = 80, 16 heads: the same 8 images as 8 full sequences of 1856

Usage:
    python -m bench attention            # GPU, full sizes
    python -m bench attention --quick    # CPU: tiny shapes, checks that the benchmark runs
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import report, time_fn  # noqa: E402
from idgrpo.kernels.attention import attention, attention_reference  # noqa: E402


def _windows_of_an_image(rows: int, cols: int, window: int) -> list[int]:
    """Token counts of the window x window windows tiling a rows x cols patch grid."""
    return [min(window, rows - r) * min(window, cols - c)
            for r in range(0, rows, window) for c in range(0, cols, window)]


def _shapes(quick: bool, on_gpu: bool) -> list[dict]:
    """Each shape: name, batch, heads, kv_heads, head_dim, and len_q/len_k (dense) or
    seq_lens (varlen: one length per packed sequence, queries = keys)."""
    if quick:
        small = dict(batch=1, heads=2, kv_heads=2)
        return [
            dict(name="self (tiny)", len_q=130, len_k=130, head_dim=128, **small),
            dict(name="cross (tiny)", len_q=130, len_k=19, head_dim=128, **small),
            dict(name="vit-window (tiny)", seq_lens=_windows_of_an_image(12, 10, 8), head_dim=80, **small),
        ] if not on_gpu else [
            dict(name="wan-self (small)", batch=1, len_q=4096, len_k=4096, heads=12, kv_heads=12, head_dim=128),
            dict(name="qwenvit-window (small)", batch=1, seq_lens=_windows_of_an_image(32, 58, 8),
                 heads=16, kv_heads=16, head_dim=80),
        ]
    image = _windows_of_an_image(32, 58, 8)
    return [
        dict(name="wan1.3b-self", batch=1, len_q=32760, len_k=32760, heads=12, kv_heads=12, head_dim=128),
        dict(name="wan14b-self", batch=1, len_q=32760, len_k=32760, heads=40, kv_heads=40, head_dim=128),
        dict(name="wan-cross", batch=1, len_q=32760, len_k=512, heads=12, kv_heads=12, head_dim=128),
        dict(name="idgrpo-train", batch=8, len_q=3510, len_k=3510, heads=12, kv_heads=12, head_dim=128),
        dict(name="qwenvit-window", batch=1, seq_lens=image * 8, heads=16, kv_heads=16, head_dim=80),
        dict(name="qwenvit-full", batch=1, seq_lens=[sum(image)] * 8, heads=16, kv_heads=16, head_dim=80),
    ]


def _forward_flops(shape: dict) -> float:
    pairs = sum(n * n for n in shape["seq_lens"]) if "seq_lens" in shape else \
        shape["batch"] * shape["len_q"] * shape["len_k"]
    return 4.0 * pairs * shape["heads"] * shape["head_dim"]


def _inputs(shape: dict, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    h, hkv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    if "seq_lens" in shape:
        total = sum(shape["seq_lens"])
        q, k, v = rand(total, h, d), rand(total, hkv, d), rand(total, hkv, d)  # (T, H, D)
    else:
        b = shape["batch"]
        q = rand(b, shape["len_q"], h, d)  # (B, Lq, H, D)
        k, v = rand(b, shape["len_k"], hkv, d), rand(b, shape["len_k"], hkv, d)  # (B, Lk, Hkv, D)
    return q, k, v


def _ours(shape, device, backend):
    if "seq_lens" not in shape:
        return lambda q, k, v: attention(q, k, v, backend=backend)
    lens = shape["seq_lens"]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return lambda q, k, v: attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                                     max_seqlen_k=max(lens), backend=backend)


def _sdpa(shape, device, sdpa_backend):
    from torch.nn.attention import sdpa_kernel

    def dense(q, k, v):  # (B, L, H, D) views in, no copies: SDPA takes (B, H, L, D) strides
        with sdpa_kernel([sdpa_backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    if "seq_lens" not in shape:
        return dense
    # Varlen: SDPA has no packed sequences; run each group of equal-length sequences as
    # one dense batch (its best case) and scatter back.
    lens = shape["seq_lens"]
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    groups = {}
    for s, n in enumerate(lens):
        groups.setdefault(n, []).append(torch.arange(starts[s], starts[s] + n))
    index = {n: torch.stack(rows).to(device) for n, rows in groups.items()}  # (S_n, n)

    def grouped(q, k, v):
        out = torch.empty_like(q)
        for rows in index.values():
            out[rows] = dense(q[rows], k[rows], v[rows])  # (S_n, n, H, D)
        return out

    return grouped


def _flash_attn(shape, device, module_name):
    module = __import__(module_name)
    unpack = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731  FA3 may also return the LSE
    if "seq_lens" not in shape:
        return lambda q, k, v: unpack(module.flash_attn_func(q, k, v))
    lens = shape["seq_lens"]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return lambda q, k, v: unpack(module.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens)))


def _implementations(device) -> list[tuple[str, object]]:
    """(name, make(shape, device) -> fn(q, k, v)) for every implementation worth trying here."""
    from torch.nn.attention import SDPBackend

    if device == "cpu":
        impls = [("ours (triton interpreter)", lambda s, d: _ours(s, d, "triton")),
                 ("reference (pytorch)", lambda s, d: _ours(s, d, "reference"))]
    else:
        impls = [("ours (triton)", lambda s, d: _ours(s, d, "triton"))]
    sdpa_backends = [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]
    for label, backend in sdpa_backends:
        impls.append((label, lambda s, d, b=backend: _sdpa(s, d, b)))
    for label, module_name in [("flash-attn-2", "flash_attn"), ("flash-attn-3", "flash_attn_interface")]:
        try:
            __import__(module_name)
        except ImportError:
            continue
        impls.append((label, lambda s, d, m=module_name: _flash_attn(s, d, m)))
    return impls


def _measure(fn, q, k, v, warmup, iters) -> dict:
    grad_out = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    t_fwd = time_fn(fwd, warmup=warmup, iters=iters)["ms_median"]
    t_both = time_fn(fwd_bwd, warmup=warmup, iters=iters)["ms_median"]
    return {"fwd_ms": t_fwd, "bwd_ms": max(t_both - t_fwd, 1e-9), "fwd_bwd_ms": t_both}


def main(quick: bool = False) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter computes bf16 wrongly
    warmup, iters = (5, 20) if on_gpu else (0, 1)
    if not on_gpu and not quick:
        print("attention: no GPU, so the full shapes (32k tokens through the Triton interpreter) are out of reach; "
              "running the --quick shapes")
        quick = True
    rows, skipped = [], []
    for shape in _shapes(quick, on_gpu):
        q, k, v = _inputs(shape, dtype, device)
        flops = _forward_flops(shape)
        with torch.no_grad():
            ours_out = _ours(shape, device, "triton")(q, k, v)
            truth = _fp32_truth(shape, q, k, v, device)
        shape_rows = []
        for label, make in _implementations(device):
            try:
                fn = make(shape, device)
                with torch.no_grad():
                    out = fn(q, k, v)
                times = _measure(fn, q, k, v, warmup, iters)
            except RuntimeError as e:  # the backend does not take this shape/dtype/device
                skipped.append(f"{shape['name']}: {label}: {str(e).splitlines()[0][:90]}")
                continue
            shape_rows.append({
                "shape": shape["name"], "impl": label, "dtype": str(dtype).removeprefix("torch."),
                **times,
                "fwd_tflops": flops / (times["fwd_ms"] * 1e-3) / 1e12,
                "bwd_tflops": 2.5 * flops / (times["bwd_ms"] * 1e-3) / 1e12,
                "fwd_bwd_tflops": 3.5 * flops / (times["fwd_bwd_ms"] * 1e-3) / 1e12,
                "max_diff_vs_ours": (out.float() - ours_out.float()).abs().max().item(),
                "max_err_vs_fp32_ref": (out[..., :truth.shape[-3], :, :].float() - truth).abs().max().item(),
            })
        baselines = [r for r in shape_rows if r["impl"].startswith(("sdpa", "flash-attn"))]
        for r in shape_rows:
            if r["impl"].startswith("ours") and baselines:
                best_fwd = max(b["fwd_tflops"] for b in baselines)
                best_bwd = max(b["bwd_tflops"] for b in baselines)
                r["fwd_x_best_baseline"] = r["fwd_tflops"] / best_fwd
                r["bwd_x_best_baseline"] = r["bwd_tflops"] / best_bwd
        rows += shape_rows
        del q, k, v, ours_out, truth
        if on_gpu:
            torch.cuda.empty_cache()
    columns = ["shape", "impl", "dtype", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "fwd_bwd_tflops",
               "fwd_x_best_baseline", "bwd_x_best_baseline", "max_diff_vs_ours", "max_err_vs_fp32_ref"]
    if skipped:
        print("skipped (not available for that shape/dtype/device):\n  " + "\n  ".join(skipped))
    report("attention", rows, columns, extra={
        "flops": "fwd 4*B*H*Lq*Lk*D (varlen: summed over sequences), bwd 2.5x fwd, fwd+bwd 3.5x",
        "skipped": skipped, "quick": quick,
    })
    return rows


def _fp32_truth(shape: dict, q, k, v, device, max_queries: int = 256) -> torch.Tensor:
    """The fp32 reference; for dense shapes only on the first `max_queries` queries (the
    full (Lq, Lk) score matrix of a 32k video does not fit in memory)."""
    q, k, v = (t.detach().float() for t in (q, k, v))
    if "seq_lens" not in shape:
        return attention_reference(q[:, :max_queries], k, v)  # non-causal: rows are independent
    cu = torch.tensor([0, *torch.tensor(shape["seq_lens"]).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return attention_reference(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
