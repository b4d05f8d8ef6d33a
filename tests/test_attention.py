"""Fused attention: the Triton path (interpreter on CPU) against the float64 reference.

Shapes are small and odd (not multiples of the 64-wide tiles) because the interpreter is
slow; every case checks the output and all three gradients, with every buffer the kernels
write filled with NaN beforehand.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

import idgrpo.kernels.attention as attention_module
from idgrpo.kernels.attention import attention, attention_configs, attention_reference
from idgrpo.testing import poisoned_empty, randn

TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 kernel vs float64 truth


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs, LSE, delta and gradients all start as NaN: an element a kernel skips shows up."""
    monkeypatch.setattr(attention_module, "_output_buffer",
                        lambda shape, dtype, device: poisoned_empty(*shape, dtype=dtype, device=device))


def _inputs(q_shape, kv_shape, seed, device):
    q = randn(*q_shape, seed=seed, device=device).requires_grad_()
    k = randn(*kv_shape, seed=seed + 1, device=device).requires_grad_()
    v = randn(*kv_shape, seed=seed + 2, device=device).requires_grad_()
    grad_out = randn(*q_shape, seed=seed + 3, device=device)
    return q, k, v, grad_out


def _triton_with_grads(q, k, v, grad_out, **kwargs):
    out = attention(q, k, v, backend="triton", **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), grads


def _check_against_reference(q, k, v, grad_out, **kwargs):
    out, grads = _triton_with_grads(q, k, v, grad_out, **kwargs)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.cpu().double())
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert not got.isnan().any(), f"{name} has NaN: an element was never written"
        torch.testing.assert_close(got.cpu().double(), want.detach(), **TOL, msg=lambda m, n=name: f"{n}: {m}")
    return out, grads


@pytest.mark.parametrize(
    "batch, len_q, len_k, heads, kv_heads, head_dim, causal",
    [
        (2, 130, 130, 2, 2, 64, False),  # self-attention, several key blocks (online softmax rescaling)
        (2, 37, 37, 2, 2, 80, False),  # Qwen2.5-VL vision head dim, padded to a 128-wide tile
        (1, 257, 257, 1, 1, 128, False),  # Wan head dim, a length one past a block multiple
        (2, 130, 19, 2, 2, 128, False),  # cross-attention to a short context
        (1, 130, 130, 4, 2, 64, True),  # causal + grouped-query heads (Qwen LLM)
        (1, 19, 130, 4, 1, 128, True),  # causal with Lq < Lk (bottom-right aligned), multi-query
        (2, 37, 19, 2, 2, 64, True),  # causal with Lq > Lk: the first 18 rows see no key -> 0
    ],
)
def test_dense_matches_reference(device, batch, len_q, len_k, heads, kv_heads, head_dim, causal):
    q, k, v, grad_out = _inputs((batch, len_q, heads, head_dim), (batch, len_k, kv_heads, head_dim),
                                seed=len_q * 7 + len_k + head_dim, device=device)
    out, _ = _check_against_reference(q, k, v, grad_out, causal=causal)
    if causal and len_q > len_k:
        assert out[:, : len_q - len_k - 1].abs().max() == 0


@pytest.mark.parametrize("head_dim, causal", [(80, False), (64, True)])
def test_key_lengths_mask_padding(device, head_dim, causal):
    # Sample 0 has no key at all (its output and dq must be 0); sample 2 is unmasked.
    q, k, v, grad_out = _inputs((3, 37, 2, head_dim), (3, 130, 2, head_dim), seed=11 + head_dim, device=device)
    k_lens = torch.tensor([0, 77, 130], device=device)
    out, (dq, dk, dv) = _check_against_reference(q, k, v, grad_out, causal=causal, k_lens=k_lens, scale=0.3)
    assert out[0].abs().max() == 0 and dq[0].abs().max() == 0
    assert dk[1, 77:].abs().max() == 0 and dv[1, 77:].abs().max() == 0  # padded keys get no gradient


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_packed_sequences(device, causal):
    # Three sequences of different lengths, query and key lengths differing per sequence.
    cu_q = torch.tensor([0, 5, 75, 112], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 19, 84, 150], dtype=torch.int32, device=device)
    q, k, v, grad_out = _inputs((112, 2, 80), (150, 1, 80), seed=5 + causal, device=device)  # GQA too
    _check_against_reference(q, k, v, grad_out, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=70, max_seqlen_k=66)


def test_strided_inputs_from_a_fused_projection(device):
    # q, k, v as views into one (B, L, 3, H, D) projection output, as the DiT produces them.
    qkv = randn(2, 37, 3, 2, 64, seed=3, device=device).requires_grad_()
    q, k, v = qkv.unbind(dim=2)
    grad_out = randn(2, 37, 2, 64, seed=4, device=device)
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, grad_out)


def test_batch_invariance(device):
    """Each sample's output and gradients are bitwise the same alone and inside a batch."""
    q, k, v, grad_out = _inputs((3, 70, 2, 64), (3, 70, 2, 64), seed=21, device=device)
    k_lens = torch.tensor([70, 33, 51], device=device)
    out, grads = _triton_with_grads(q, k, v, grad_out, k_lens=k_lens)
    for b in (1, 2):
        alone = [t[b:b + 1].detach().clone().requires_grad_() for t in (q, k, v)]
        out_b, grads_b = _triton_with_grads(*alone, grad_out[b:b + 1], k_lens=k_lens[b:b + 1])
        assert torch.equal(out_b, out[b:b + 1])
        for got, want in zip(grads_b, grads):
            assert torch.equal(got, want[b:b + 1])


def test_varlen_batch_invariance(device):
    """A sequence gives the same bits alone and packed with others."""
    cu = torch.tensor([0, 30, 95, 120], dtype=torch.int32, device=device)
    q, k, v, grad_out = _inputs((120, 2, 64), (120, 2, 64), seed=31, device=device)
    out, grads = _triton_with_grads(q, k, v, grad_out, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    lo, hi = 30, 95
    alone = [t[lo:hi].detach().clone().requires_grad_() for t in (q, k, v)]
    cu_alone = torch.tensor([0, hi - lo], dtype=torch.int32, device=device)
    out_s, grads_s = _triton_with_grads(*alone, grad_out[lo:hi], causal=True,
                                        cu_seqlens_q=cu_alone, cu_seqlens_k=cu_alone)
    assert torch.equal(out_s, out[lo:hi])
    for got, want in zip(grads_s, grads):
        assert torch.equal(got, want[lo:hi])


def test_run_to_run_determinism(device):
    q, k, v, grad_out = _inputs((1, 130, 4, 64), (1, 130, 2, 64), seed=41, device=device)
    first = _triton_with_grads(q, k, v, grad_out, causal=True)
    second = _triton_with_grads(q, k, v, grad_out, causal=True)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_results_do_not_depend_on_the_tuned_tiles(device, monkeypatch):
    """Another config (here: 128-wide tuned tiles instead of 64) changes no bit of the output or
    the gradients: every sum runs over fixed tiles, in the same order. Causal, grouped heads and
    padded keys, so each kernel meets every kind of edge tile, placed differently per tile size."""
    q, k, v, grad_out = _inputs((1, 150, 4, 16), (1, 150, 2, 16), seed=81, device=device)
    k_lens = torch.tensor([97], device=device)
    first = _triton_with_grads(q, k, v, grad_out, causal=True, k_lens=k_lens)
    for kernel, tile in ((attention_module._attention_fwd_kernel, "BLOCK_M"),
                         (attention_module._attention_bwd_dkdv_kernel, "BLOCK_N"),
                         (attention_module._attention_bwd_dq_kernel, "BLOCK_M")):
        monkeypatch.setattr(kernel, "configs", [triton.Config({tile: 128}, num_warps=8, num_stages=2)])
        monkeypatch.setattr(kernel, "early_config_prune", None)
    second = _triton_with_grads(q, k, v, grad_out, causal=True, k_lens=k_lens)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), f"{name} changed with the tiles"


def test_reference_matches_torch_sdpa():
    """The reference itself against an independent oracle (SDPA with an explicit mask)."""
    q = randn(2, 23, 4, 32, seed=51, dtype=torch.float64)
    k = randn(2, 29, 2, 32, seed=52, dtype=torch.float64)
    v = randn(2, 29, 2, 32, seed=53, dtype=torch.float64)
    k_lens = torch.tensor([29, 12])
    ours = attention_reference(q, k, v, causal=True, k_lens=k_lens)
    causal = torch.ones(23, 29, dtype=torch.bool).tril(29 - 23)
    padding = torch.arange(29)[None, :] < k_lens[:, None]  # (B, Lk)
    mask = causal[None, None] & padding[:, None, None, :]  # (B, 1, Lq, Lk)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_dispatch_and_validation():
    q = randn(1, 5, 2, 16, seed=61)
    k = randn(1, 7, 2, 16, seed=62)
    assert torch.equal(attention(q, k, k, backend="reference"), attention_reference(q, k, k))
    assert torch.equal(attention(q, k, k, backend="auto"), attention_reference(q, k, k))  # CPU -> reference
    with pytest.raises(ValueError, match="multiple"):
        attention(q, randn(1, 7, 3, 16, seed=63), randn(1, 7, 3, 16, seed=64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention(q[0], k[0], k[0], cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_lens"):
        attention(q, k, k, k_lens=torch.tensor([3, 4]))


KINDS = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}  # kernel kind -> the tile it tunes


@pytest.mark.parametrize("kind", list(KINDS))
def test_autotuner_tries_only_the_configs_of_the_device_target(kind, monkeypatch):
    """Each target has its own list (the configs that compile without spills there); the
    autotuner holds every target's configs and its pruning keeps the device's list."""
    tile = KINDS[kind]
    held = [triton.Config({tile: size}, num_warps=warps, num_stages=stages)
            for size, warps, stages in attention_module._candidate_options(kind)]
    prune = attention_module._pruning(kind)["early_config_prune"]
    for capability in (80, 86, 90, 100):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: divmod(c, 10))
        want = attention_configs(kind, capability)
        assert want == attention_configs(kind, 90 if capability >= 90 else 80) and want
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q = torch.empty(1, 8, 1, 64, dtype=dtype, device="meta")  # a GPU tensor as far as pruning cares
            kept = [(c.kwargs[tile], c.num_warps, c.num_stages) for c in prune(held, {"Q": q})]
            assert kept == (want[:1] if dtype == torch.float32 else want)
    cpu_q = torch.empty(1, 8, 1, 64, dtype=torch.bfloat16)
    assert prune(held, {"Q": cpu_q}) == held  # CPU: the interpreter, which keeps one config anyway
    with pytest.raises(ValueError, match="bwd"):
        attention_configs("bwd", 90)


AOT_PLAN = """
import json
from bench import aot
[case] = [c for c in aot.all_cases() if c.name == "attention d80 causal varlen"]
print(json.dumps([[job.name, job.target, dict(job.constexprs), dict(job.options)]
                  for job in aot.plan([case], ["sm_80", "sm_90"], ["bf16", "fp32"])]))
"""


def test_ahead_of_time_check_compiles_the_configs_each_target_tries():
    """bench/aot.py compiles, per target, exactly the configs the autotuner would try on that GPU
    (its spill check covers what can run). Runs without the interpreter: nothing is compiled."""
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(AOT_PLAN)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    planned = {}
    for name, target, constexprs, options in json.loads(done.stdout.strip().splitlines()[-1]):
        kind = name.removeprefix("_attention_").removesuffix("_kernel").removeprefix("bwd_")
        if kind in KINDS:
            dtype = "fp32" if constexprs["DOT_PRECISION"] == "ieee" else "bf16"
            config = (constexprs[KINDS[kind]], options["num_warps"], options["num_stages"])
            planned.setdefault((kind, target, dtype), []).append(config)
    for kind in KINDS:
        for target, capability in (("sm_80", 80), ("sm_90", 90)):
            assert planned[(kind, target, "bf16")] == attention_configs(kind, capability)
            assert planned[(kind, target, "fp32")] == attention_configs(kind, capability)[:1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (the interpreter computes bf16 wrongly)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_gpu(dtype):
    """bf16/fp16: at most 2x as far from the float64 truth as PyTorch's own SDPA in that dtype."""
    q, k, v, grad_out = (t.detach().to(dtype) for t in _inputs((2, 300, 4, 128), (2, 300, 2, 128), seed=71,
                                                                device="cuda"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, grads = _triton_with_grads(q, k, v, grad_out, causal=True)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True)  # Lq == Lk: top-left == bottom-right
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, ours, torch_low, truth in zip(("out", "dq", "dk", "dv"), (out, *grads), (sdpa, *sdpa_grads),
                                            (ref, *ref_grads)):
        ours_err = (ours.double() - truth).abs().max().item()
        torch_err = (torch_low.double() - truth).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-3, f"{name}: {ours_err:.3g} vs PyTorch {dtype} {torch_err:.3g}"
