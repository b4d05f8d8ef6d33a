"""Norm glue: the Triton kernels (interpreter, fp32) against the float64 reference, forward and
backward, with odd sizes, strided rows, broadcast modulation vectors and poisoned allocations."""

import pytest
import torch

from idgrpo.kernels import norm
from idgrpo.testing import poison, randn

B, L, C = 2, 37, 100  # odd sizes: neither rows nor width are block multiples


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like inside the op returns NaN-filled memory, so an element a
    kernel fails to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def _inputs(seed: int, shift_shape=(B, 1, C), scale_shape=(B, C)):
    x = randn(B, L, C, seed=seed, dtype=torch.float64, scale=2.0) + 0.5  # nonzero mean exercises LN centring
    return {
        "x": x,
        "y": randn(B, L, C, seed=seed + 1, dtype=torch.float64),
        "weight": 1 + 0.3 * randn(C, seed=seed + 2, dtype=torch.float64),
        "bias": randn(C, seed=seed + 3, dtype=torch.float64),
        "shift": randn(*shift_shape, seed=seed + 4, dtype=torch.float64),
        "scale": 0.5 * randn(*scale_shape, seed=seed + 5, dtype=torch.float64),
        "gate": randn(*scale_shape, seed=seed + 6, dtype=torch.float64),
    }


# op name -> (function of (inputs dict, backend), names of the differentiable inputs)
CASES = {
    "rms_norm": (lambda t, bk: norm.rms_norm(t["x"], t["weight"], backend=bk), ["x", "weight"]),
    "rms_norm_noweight": (lambda t, bk: norm.rms_norm(t["x"], backend=bk), ["x"]),
    "layer_norm": (lambda t, bk: norm.layer_norm(t["x"], backend=bk), ["x"]),
    "layer_norm_affine": (lambda t, bk: norm.layer_norm(t["x"], t["weight"], t["bias"], backend=bk),
                          ["x", "weight", "bias"]),
    "layer_norm_modulate": (lambda t, bk: norm.layer_norm_modulate(t["x"], t["shift"], t["scale"], backend=bk),
                            ["x", "shift", "scale"]),
    "gated_residual": (lambda t, bk: norm.gated_residual(t["x"], t["y"], t["gate"], backend=bk),
                       ["x", "y", "gate"]),
}


def _run(op: str, inputs: dict, backend: str, dtype: torch.dtype, grad_out: torch.Tensor):
    fn, diff = CASES[op]
    leaves = {k: v.to(dtype).requires_grad_(k in diff) for k, v in inputs.items()}
    out = fn(leaves, backend)
    grads = torch.autograd.grad(out, [leaves[k] for k in diff], grad_out.to(dtype))
    return out, dict(zip(diff, grads))


@pytest.mark.parametrize("op", list(CASES))
def test_triton_matches_float64_reference(op, poisoned_allocations):
    inputs = _inputs(seed=10)
    grad_out = randn(B, L, C, seed=99, dtype=torch.float64)
    ref_out, ref_grads = _run(op, inputs, "reference", torch.float64, grad_out)
    out, grads = _run(op, inputs, "triton", torch.float32, grad_out)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, ref_g in ref_grads.items():
        assert grads[name].shape == ref_g.shape, name
        # weight/shift/scale/gate grads sum 37 rows per sample: allow the accumulated rounding
        torch.testing.assert_close(grads[name].double(), ref_g, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("shapes", [((B, C), (B, 1, C)), ((1, C), (C,)), ((1, 1, C), (B, C))])
def test_modulation_vectors_broadcast(shapes):
    """(B, C), (B, 1, C) and batch-broadcast (1, C)/(C,) shift/scale/gate: values and grad shapes."""
    shift_shape, scale_shape = shapes
    inputs = _inputs(seed=20, shift_shape=shift_shape, scale_shape=scale_shape)
    grad_out = randn(B, L, C, seed=98, dtype=torch.float64)
    for op in ("layer_norm_modulate", "gated_residual"):
        ref_out, ref_grads = _run(op, inputs, "reference", torch.float64, grad_out)
        out, grads = _run(op, inputs, "triton", torch.float32, grad_out)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
        for name, ref_g in ref_grads.items():
            assert grads[name].shape == ref_g.shape == inputs[name].shape, (op, name)
            torch.testing.assert_close(grads[name].double(), ref_g, rtol=1e-5, atol=5e-5, msg=f"{op} {name}")


@pytest.mark.parametrize("width", [1536, 5120])
def test_model_widths(width, poisoned_allocations):
    """Wan-1.3B and 14B widths: tiles of 2 rows x 2048 and 1 row x 8192 (masked past the width)."""
    x = randn(1, 5, width, seed=width, dtype=torch.float64)
    w = 1 + 0.2 * randn(width, seed=1, dtype=torch.float64)
    shift, scale = randn(1, width, seed=2, dtype=torch.float64), randn(1, width, seed=3, dtype=torch.float64)
    grad_out = randn(1, 5, width, seed=4, dtype=torch.float64)
    for fn, args in ((norm.rms_norm, (x, w)), (norm.layer_norm_modulate, (x, shift, scale))):
        leaves64 = [a.clone().requires_grad_() for a in args]
        ref = fn(*leaves64, backend="reference")
        ref_grads = torch.autograd.grad(ref, leaves64, grad_out)
        leaves32 = [a.float().requires_grad_() for a in args]
        out = fn(*leaves32, backend="triton")
        grads = torch.autograd.grad(out, leaves32, grad_out.float())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=2e-5)


def test_strided_rows_and_leading_dims():
    """A (B, L, H*D)-style slice with a row stride wider than the width, and 4-D input."""
    wide = randn(B, L, C + 23, seed=30)
    x = wide[..., 5:5 + C]  # row stride C + 23, unit column stride
    w = 1 + 0.1 * randn(C, seed=31)
    torch.testing.assert_close(norm.rms_norm(x, w, backend="triton"), norm.rms_norm_reference(x, w),
                               rtol=1e-5, atol=1e-5)
    x4 = randn(3, 5, 7, C, seed=32)
    torch.testing.assert_close(norm.layer_norm(x4, w, w, backend="triton"), norm.layer_norm_reference(x4, w, w),
                               rtol=1e-5, atol=1e-5)


def test_out_dtype_and_mixed_dtypes():
    """LN-modulate writes out_dtype; gated residual keeps the (fp32) residual dtype with a
    float64 y, and its math is at least fp32."""
    t = _inputs(seed=40)
    x = t["x"].float()
    out = norm.layer_norm_modulate(x, t["shift"].float(), t["scale"].float(), out_dtype=torch.float64,
                                   backend="triton")
    assert out.dtype == torch.float64
    ref = norm.layer_norm_modulate_reference(x.double(), t["shift"], t["scale"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    res = norm.gated_residual(x, t["y"], t["gate"].float(), backend="triton")
    assert res.dtype == torch.float32
    torch.testing.assert_close(res.double(), norm.gated_residual_reference(t["x"], t["y"], t["gate"]),
                               rtol=1e-5, atol=1e-5)


def test_reduction_gradients_are_deterministic():
    """Weight/shift/scale grads come from fixed-order partial sums: two runs agree bitwise."""
    inputs = _inputs(seed=50)
    grad_out = randn(B, L, C, seed=97, dtype=torch.float64)
    for op in ("layer_norm_affine", "layer_norm_modulate", "gated_residual"):
        _, first = _run(op, inputs, "triton", torch.float32, grad_out)
        _, second = _run(op, inputs, "triton", torch.float32, grad_out)
        for name in first:
            assert torch.equal(first[name], second[name]), (op, name)


def test_reference_matches_torch_layer_norm_and_wan_formula():
    """The references themselves: LN against torch's, RMSNorm against the written formula."""
    t = _inputs(seed=60)
    x, w, b = t["x"], t["weight"], t["bias"]
    torch.testing.assert_close(norm.layer_norm_reference(x, w, b), torch.nn.functional.layer_norm(x, (C,), w, b, 1e-6))
    rms = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(norm.rms_norm_reference(x, w), rms)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + t["scale"][:, None]) + t["shift"]
    torch.testing.assert_close(norm.layer_norm_modulate_reference(x, t["shift"], t["scale"]), expected)


def test_auto_dispatch_on_cpu_is_the_reference():
    t = _inputs(seed=70)
    x = t["x"].float()
    assert torch.equal(norm.rms_norm(x, backend="auto"), norm.rms_norm_reference(x))
    assert torch.equal(norm.layer_norm(x, backend="reference"), norm.layer_norm_reference(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only checked on a GPU")
@pytest.mark.parametrize("op", list(CASES))
def test_bf16_on_gpu(op):
    """bf16 I/O on the GPU: the kernel's error vs float64 is at most ~2x PyTorch's bf16 path's."""
    inputs = {k: v.cuda() for k, v in _inputs(seed=80).items()}
    grad_out = randn(B, L, C, seed=96, dtype=torch.float64, device="cuda")
    truth, _ = _run(op, inputs, "reference", torch.float64, grad_out)
    ours, _ = _run(op, inputs, "triton", torch.bfloat16, grad_out)
    eager, _ = _run(op, inputs, "reference", torch.bfloat16, grad_out)
    err_ours = (ours.double() - truth).abs().max().item()
    err_eager = (eager.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_eager + 1e-3
