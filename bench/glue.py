"""Memory-bound DiT glue: RMSNorm (q/k norm), LayerNorm, LN + adaLN modulation, gated residual,
and 3-D RoPE, at Wan2.1-1.3B shapes (81x480x832 -> 32,760 tokens, width 1536, 12 heads of 128).

For each op, forward and forward+backward: the Triton kernel and the eager PyTorch reference
(the same `*_reference` functions the tests trust), the ideal bytes moved (every input read
once, every output written once), the achieved GB/s, and that as a fraction of a
device-to-device copy measured in the same run. Dtypes follow the Wan block
(docs/models.md#dit-numerics-and-precision): the
residual stream is fp32, projections are bf16, LN-modulate writes bf16 for the next matmul.

Usage:
    python -m bench glue            # GPU, full sizes
    python -m bench glue --quick    # CPU: tiny sizes through the Triton interpreter (fp32)
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import report, time_fn  # noqa: E402
from idgrpo.kernels import norm, rope  # noqa: E402
from idgrpo.kernels.backend import interpreting  # noqa: E402


def _copy_bandwidth(numel: int, device, warmup: int, iters: int) -> float:
    """GB/s of dst.copy_(src) (read + write) on a buffer of `numel` fp32."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=warmup, iters=iters)
    return 2 * src.numel() * src.element_size() / (t["ms_median"] * 1e-3) / 1e9


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cases(tokens: int, width: int, heads: int, head_dim: int, grid: tuple[int, int, int], device, low: torch.dtype):
    """name -> (make(backend) -> (outputs, differentiable inputs), bytes fwd, bytes fwd+bwd)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    resid = rand(1, tokens, width)  # (B, L, C) fp32 residual stream
    proj = rand(1, tokens, width, dtype=low)  # (B, L, C) a projection's output
    weight = 1 + rand(width, scale=0.1)
    bias = rand(width, scale=0.1)
    shift, scale, gate = rand(1, width, scale=0.5), rand(1, width, scale=0.5), rand(1, width, scale=0.5)
    q = rand(1, tokens, heads, head_dim, dtype=low)  # (B, L, H, D)
    cos, sin = rope.wan_rope_table(grid, head_dim, device=device)

    def leaf(t):
        return t.detach().requires_grad_()

    cases = {
        # q/k norm: bf16 in/out, fp32 weight.
        "rms_norm": (lambda bk: (lambda x, w: (norm.rms_norm(x, w, backend=bk), (x, w)))(leaf(proj), leaf(weight)),
                     2 * _nbytes(proj), 5 * _nbytes(proj)),  # fwd: x, y; bwd adds x, dy, dx
        # cross-attention pre-norm on the fp32 stream, affine.
        "layer_norm": (lambda bk: (lambda x, w, b: (norm.layer_norm(x, w, b, backend=bk), (x, w, b)))(
            leaf(resid), leaf(weight), leaf(bias)), 2 * _nbytes(resid), 5 * _nbytes(resid)),
        # adaLN: fp32 stream in, bf16 out; bwd reads x (fp32) and dy (bf16), writes dx (fp32).
        "layer_norm_modulate": (lambda bk: (lambda x, s, c: (
            norm.layer_norm_modulate(x, s, c, out_dtype=low, backend=bk), (x, s, c)))(
            leaf(resid), leaf(shift), leaf(scale)),
            _nbytes(resid, proj), _nbytes(resid, proj) + _nbytes(resid, proj, resid)),
        # x + y * gate: fp32 stream + bf16 branch -> fp32; bwd reads dout (fp32), y; writes dy.
        "gated_residual": (lambda bk: (lambda x, y, gt: (norm.gated_residual(x, y, gt, backend=bk), (x, y, gt)))(
            leaf(resid), leaf(proj), leaf(gate)),
            _nbytes(resid, proj, resid), _nbytes(resid, proj, resid) + _nbytes(resid, proj, proj)),
        # Wan RoPE on q: bf16 in/out plus the fp32 cos/sin tables.
        "rope_wan": (lambda bk: (lambda x: (rope.apply_rope(x, cos, sin, interleaved=True, backend=bk), (x,)))(
            leaf(q)), 2 * _nbytes(q) + _nbytes(cos, sin), 4 * _nbytes(q) + 2 * _nbytes(cos, sin)),
        "rope_rotate_half": (lambda bk: (lambda x: (rope.apply_rope(x, cos, sin, interleaved=False, backend=bk),
                                                    (x,)))(leaf(q)),
                             2 * _nbytes(q) + _nbytes(cos, sin), 4 * _nbytes(q) + 2 * _nbytes(cos, sin)),
    }
    return cases


def main(quick: bool = False) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu and not interpreting():
        raise RuntimeError("no GPU and triton was imported before TRITON_INTERPRET=1 could be set: "
                           "run `TRITON_INTERPRET=1 python -m bench glue --quick`")
    if quick or not on_gpu:
        grid, heads, head_dim, width = (2, 3, 5), 2, 64, 96  # 30 tokens
        low = torch.float32  # the interpreter computes bf16 wrongly
        warmup, iters, copy_numel = 1, 3, 1 << 16
    else:
        grid, heads, head_dim, width = (21, 30, 52), 12, 128, 1536  # 32,760 tokens
        low = torch.bfloat16
        warmup, iters, copy_numel = 10, 50, 1 << 26
    tokens = grid[0] * grid[1] * grid[2]
    copy_gbs = _copy_bandwidth(copy_numel, device, warmup, max(iters, 20))
    rows = []
    for name, (make, bytes_fwd, bytes_fwd_bwd) in _cases(tokens, width, heads, head_dim, grid, device, low).items():
        out_t, _ = make("triton")
        out_r, _ = make("reference")
        max_err = (out_t.float() - out_r.float()).abs().max().item()
        grad_out = torch.ones_like(out_t)  # allocated once: not part of the timed traffic
        for kind, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_fwd_bwd)):
            timings = {}
            for backend in ("triton", "reference"):
                if kind == "fwd":
                    def step(make=make, backend=backend):
                        with torch.no_grad():
                            make(backend)
                else:
                    def step(make=make, backend=backend, grad_out=grad_out):
                        out, inputs = make(backend)
                        torch.autograd.grad(out, inputs, grad_out)
                timings[backend] = time_fn(step, warmup=warmup, iters=iters)["ms_median"]
            gbs = nbytes / (timings["triton"] * 1e-3) / 1e9
            rows.append({
                "op": name, "pass": kind, "tokens": tokens, "width": width if "rope" not in name else heads * head_dim,
                "dtype": str(low).replace("torch.", ""), "MB": nbytes / 1e6,
                "triton_ms": timings["triton"], "eager_ms": timings["reference"],
                "speedup": timings["reference"] / timings["triton"],
                "GB/s": gbs, "copy_GB/s": copy_gbs, "of_copy": gbs / copy_gbs, "max_err_fwd": max_err,
            })
    report("glue", rows, extra={"copy_GBps": copy_gbs, "quick": quick, "note": (
        "bytes are the ideal traffic (inputs read once, outputs written once); fwd+bwd timings include the "
        "forward; `of_copy` = achieved GB/s / device-to-device copy GB/s")})
    return rows


if __name__ == "__main__":
    main(quick=not torch.cuda.is_available())
