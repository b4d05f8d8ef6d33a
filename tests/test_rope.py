"""RoPE: Wan's 3-D table against an independent complex-number formulation, Qwen's M-RoPE
against transformers' Qwen2.5-VL rotary code, and the Triton kernel (interpreter, fp32) against
the float64 reference for both pairings, forward and backward, with padding tokens."""

import math

import pytest
import torch

from idgrpo.kernels import rope
from idgrpo.testing import poison, randn


@pytest.fixture
def poisoned_allocations(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))


def _wan_complex_rotation(grid, head_dim, theta=10000.0):
    """exp(i * angle) per (token, complex pair), float64 complex, written from docs/models.md#wan-rope:
    axis dims d_t = d - 4*floor(d/6), d_h = d_w = 2*floor(d/6); omega_{a,k} = theta^(-2k/d_a)."""
    d_hw = 2 * (head_dim // 6)
    dims = [head_dim - 2 * d_hw, d_hw, d_hw]
    factors = []
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                row = []
                for pos, d_a in zip((f, h, w), dims):
                    row += [complex(math.cos(pos * theta ** (-2 * k / d_a)), math.sin(pos * theta ** (-2 * k / d_a)))
                            for k in range(d_a // 2)]
                factors.append(row)
    return torch.tensor(factors, dtype=torch.complex128)  # (L, D/2)


def test_wan_axis_split():
    assert rope.wan_axis_dims(128) == (44, 42, 42)  # 22/21/21 complex pairs
    for d in (64, 80, 96, 128, 256):
        d_t, d_h, d_w = rope.wan_axis_dims(d)
        assert d_h == d_w == 2 * (d // 6) and d_t == d - 4 * (d // 6) and d_t + d_h + d_w == d


@pytest.mark.parametrize("head_dim", [128, 80, 64])
def test_wan_table_and_rotation_match_complex_multiply(head_dim):
    grid = (3, 4, 5)
    n = 3 * 4 * 5
    rotation = _wan_complex_rotation(grid, head_dim)
    cos, sin = rope.wan_rope_table(grid, head_dim)
    assert cos.dtype == torch.float32 and cos.shape == (n, head_dim // 2)
    torch.testing.assert_close(cos.double(), rotation.real, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin.double(), rotation.imag, rtol=0, atol=1e-7)

    x = randn(2, n + 7, 3, head_dim, seed=1, dtype=torch.float64)  # 7 padding tokens past the grid
    pairs = torch.view_as_complex(x[:, :n].reshape(2, n, 3, head_dim // 2, 2).contiguous())
    expected = torch.view_as_real(pairs * rotation[None, :, None, :]).reshape(2, n, 3, head_dim)
    for backend in ("reference", "triton"):
        xin = x if backend == "reference" else x.float()
        out = rope.apply_rope(xin, cos, sin, interleaved=True, backend=backend)
        torch.testing.assert_close(out[:, :n].double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, n:], xin[:, n:]), "padding tokens must pass through unchanged"


def test_wan_table_pair_layout_at_128():
    """Pair 0-21 rotate with f, 22-42 with h, 43-63 with w: move one axis at a time."""
    cos, sin = rope.wan_rope_table((2, 2, 2), 128)
    angle = torch.atan2(sin, cos)  # (8, 64); token index = (f*2 + h)*2 + w
    moved_by = {4: slice(0, 22), 2: slice(22, 43), 1: slice(43, 64)}  # token (1,0,0), (0,1,0), (0,0,1)
    for token, pairs in moved_by.items():
        nonzero = angle[token].abs() > 0
        assert nonzero[pairs].all() and nonzero.sum() == pairs.stop - pairs.start


def _hf_mrope(position_ids, head_dim, sections, theta):
    """Qwen2.5-VL's own sectioning and rotate-half application, fed float64 frequencies."""
    mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = position_ids[..., None].double() * inv_freq  # (3, B, L, D/2)
    recompose = getattr(mod.Qwen2_5_VLRotaryEmbedding, "recomposition_frequencies", None)
    if recompose is not None:  # transformers >= 5
        holder = type("Holder", (), {"mrope_section": list(sections)})()
        cos, sin = recompose(holder, freqs.cos()), recompose(holder, freqs.sin())
    else:  # transformers 4.x: the sectioning lives in apply_multimodal_rotary_pos_emb
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        split = list(sections) * 2
        cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(split, dim=-1))], dim=-1)
        sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(split, dim=-1))], dim=-1)
    return cos, sin, mod  # (B, L, D)


def test_mrope_matches_transformers_qwen2_5_vl():
    head_dim, sections, theta = 128, (16, 24, 24), 1_000_000.0
    g = torch.Generator().manual_seed(2)
    position_ids = torch.randint(0, 3000, (3, 2, 13), generator=g)
    hf_cos, hf_sin, mod = _hf_mrope(position_ids, head_dim, sections, theta)
    cos, sin = rope.mrope_table(position_ids, head_dim, sections, theta)
    assert cos.shape == (2, 13, head_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(torch.cat((cos, cos), -1).double(), hf_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.cat((sin, sin), -1).double(), hf_sin, rtol=0, atol=1e-7)

    x = randn(2, 13, 4, head_dim, seed=3, dtype=torch.float64)  # (B, L, H, D)
    expected, _ = mod.apply_rotary_pos_emb(x, x, hf_cos, hf_sin, unsqueeze_dim=2)
    for backend in ("reference", "triton"):
        out = rope.apply_rope(x.float(), cos, sin, interleaved=False, backend=backend)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_mrope_text_positions_equal_plain_rope():
    """With t = h = w (text tokens) M-RoPE is ordinary rotate-half RoPE."""
    pos = torch.arange(9).expand(3, 1, 9)
    cos, _ = rope.mrope_table(pos, 64, sections=(8, 12, 12), theta=10000.0)
    inv_freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(cos[0].double(), (torch.arange(9.0, dtype=torch.float64)[:, None] * inv_freq).cos(),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("head_dim,heads,per_sample_table", [(128, 3, False), (80, 5, True), (64, 2, False)])
def test_triton_forward_backward(interleaved, head_dim, heads, per_sample_table, poisoned_allocations):
    B, L, n = 2, 11, 9  # the last 2 tokens are padding past the table
    x = randn(B, L, heads, head_dim, seed=4, dtype=torch.float64)
    angle = randn(*((B,) if per_sample_table else ()), n, head_dim // 2, seed=5, dtype=torch.float64, scale=5.0)
    cos, sin = angle.cos(), angle.sin()
    grad_out = randn(B, L, heads, head_dim, seed=6, dtype=torch.float64)

    x64 = x.clone().requires_grad_()
    ref = rope.apply_rope(x64, cos, sin, interleaved=interleaved, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out)
    x32 = x.float().requires_grad_()
    out = rope.apply_rope(x32, cos.float(), sin.float(), interleaved=interleaved, backend="triton")
    (grad,) = torch.autograd.grad(out, x32, grad_out.float())

    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, n:], x32[:, n:].detach())
    assert torch.equal(grad[:, n:], grad_out[:, n:].float())


def test_strided_input_from_fused_qkv():
    """q as a view of a fused (B, L, 3, H, D) projection: strided tokens and heads."""
    qkv = randn(2, 7, 3, 4, 64, seed=7)
    q = qkv[:, :, 0]  # (B, L, H, D), token stride 3*H*D
    cos, sin = rope.wan_rope_table((1, 7, 1), 64)
    for interleaved in (True, False):
        torch.testing.assert_close(rope.apply_rope(q, cos, sin, interleaved=interleaved, backend="triton"),
                                   rope.apply_rope_reference(q, cos, sin, interleaved=interleaved),
                                   rtol=1e-6, atol=1e-6)


def test_rotation_preserves_pair_norms():
    """A rotation: |(x_2i, x_2i+1)| and |(x_i, x_i+D/2)| are unchanged by the matching pairing."""
    x = randn(1, 6, 2, 128, seed=8, dtype=torch.float64)
    cos, sin = rope.wan_rope_table((1, 2, 3), 128)
    out = rope.apply_rope_reference(x, cos.double(), sin.double(), interleaved=True)
    torch.testing.assert_close(out.reshape(1, 6, 2, 64, 2).norm(dim=-1), x.reshape(1, 6, 2, 64, 2).norm(dim=-1))
    out = rope.apply_rope_reference(x, cos.double(), sin.double(), interleaved=False)
    torch.testing.assert_close(torch.hypot(out[..., :64], out[..., 64:]), torch.hypot(x[..., :64], x[..., 64:]))


def test_table_batch_must_match():
    x = randn(2, 4, 1, 64, seed=9)
    angle = randn(3, 4, 32, seed=10)
    with pytest.raises(ValueError):
        rope.apply_rope(x, angle.cos(), angle.sin(), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are only checked on a GPU")
@pytest.mark.parametrize("interleaved", [True, False])
def test_bf16_on_gpu(interleaved):
    x = randn(1, 300, 12, 128, seed=11, dtype=torch.float64, device="cuda")
    cos, sin = rope.wan_rope_table((3, 10, 9), 128, device="cuda")
    truth = rope.apply_rope_reference(x, cos.double(), sin.double(), interleaved=interleaved)
    ours = rope.apply_rope(x.bfloat16(), cos, sin, interleaved=interleaved, backend="triton")
    eager = rope.apply_rope_reference(x.bfloat16(), cos, sin, interleaved=interleaved)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - truth).abs().max() <= 2 * (eager.double() - truth).abs().max() + 1e-3
