"""Every kernel's Triton path against its PyTorch reference, in bf16, fp16 and fp32, at odd sizes, gradients
included, on whatever device is given: the compiled kernels' correctness check of bench/gpu_check.sh.

Ops: attention, the SDE step, the GRPO and DiffusionNFT losses, group advantages, the norms, RoPE.
For each op, dtype and output (forward outputs and the gradient of every differentiable input):
- truth: the reference on the same (rounded) inputs in float64;
- torch: PyTorch's own path in that dtype (the op's reference, or SDPA for attention);
- ours: the Triton path in that dtype.
A row passes when max|ours - truth| <= 2 * max|torch - truth| + atol * max(1, max|truth|) (atol 2e-5 for
fp32, 1e-3 for bf16/fp16): the kernel may be at most about twice as far from the truth as PyTorch's own
path in that dtype, as the kernel tests require.

Without a GPU the kernels run through the Triton interpreter at tiny sizes, in fp32 and fp16 (the
interpreter emulates bf16 by truncation, not the GPU's rounding): that proves the check is wired, not
that the compiled kernels are right.

On a GPU every op runs in bf16, fp16 and fp32, except attention: bf16 on every case, fp16 and fp32 on the
causal GQA one only (each attention shape and dtype compiles 16 kernels; fp32's take minutes in all).

Usage:
    python -m bench kernel_check            # GPU: every op x bf16/fp16/fp32
    python -m bench kernel_check --quick    # CPU: tiny sizes, fp32 and fp16, through the interpreter
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from bench.common import report  # noqa: E402
from idgrpo.kernels import norm  # noqa: E402
from idgrpo.kernels.attention import attention  # noqa: E402
from idgrpo.kernels.group_advantage import group_advantage  # noqa: E402
from idgrpo.kernels.grpo_loss import grpo_loss, grpo_step, sde_noise_std  # noqa: E402
from idgrpo.kernels.nft_loss import nft_loss  # noqa: E402
from idgrpo.kernels.rope import apply_rope  # noqa: E402
from idgrpo.testing import randn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATOL = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 2e-5}


class Check:
    """One op at one shape: `run(backend, **inputs) -> {name: tensor}`; the first output is the one
    differentiated (with a fixed random cotangent) w.r.t. the inputs named in `grads`. Inputs named
    in `cast` take the dtype under test; the others (noise levels, ids, rotary tables) keep theirs."""

    def __init__(self, name: str, run: Callable, inputs: dict, cast: set, grads: tuple = (),
                 torch_run: Callable | None = None, gpu_dtypes: tuple = tuple(DTYPES)):
        self.name, self.run, self.inputs, self.cast, self.grads = name, run, inputs, cast, grads
        self.torch_run = torch_run  # PyTorch's own low-precision path when it is not the reference
        self.gpu_dtypes = gpu_dtypes  # the dtypes checked on a GPU (all but some attention cases)

    def evaluate(self, inputs: dict, backend: str, dtype: torch.dtype, use_torch_path: bool = False) -> dict:
        """Outputs and gradients; the cotangent is rounded to `dtype` so that every run sees the same one."""
        leaves = {k: v.detach().requires_grad_(k in self.grads) if v.is_floating_point() else v
                  for k, v in inputs.items()}
        run = self.torch_run if use_torch_path and self.torch_run else self.run
        outs = run(backend, **leaves)
        result = {k: v.detach() for k, v in outs.items()}
        if self.grads:
            primary = next(iter(outs.values()))
            cotangent = randn(primary.numel(), seed=7, device=primary.device).reshape(primary.shape)
            cotangent = cotangent.to(dtype).to(primary.dtype)
            grads = torch.autograd.grad(primary, [leaves[k] for k in self.grads], cotangent)
            result |= {f"d{k}": g for k, g in zip(self.grads, grads)}
        return result


def _attention_checks(device, tiny: bool) -> list[Check]:
    def sdpa_dense(backend, q, k, v, causal=False, k_lens=None):
        mask = None
        if k_lens is not None:  # (B, 1, 1, Lk): key j of sample b is visible iff j < k_lens[b]
            mask = (torch.arange(k.shape[1], device=k.device) < k_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal,
                                             enable_gqa=q.shape[2] != k.shape[2])
        return {"out": out.transpose(1, 2)}

    def sdpa_varlen(backend, q, k, v, cu):
        starts = cu.tolist()
        outs = [sdpa_dense(backend, q[a:b][None], k[a:b][None], v[a:b][None])["out"][0]
                for a, b in zip(starts[:-1], starts[1:])]
        return {"out": torch.cat(outs)}

    length = 37 if tiny else 1000
    lens = [19, 5, 13] if tiny else [517, 64, 301]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def qkv(q_shape, kv_shape, seed):
        return dict(q=randn(*q_shape, seed=seed, device=device), k=randn(*kv_shape, seed=seed + 1, device=device),
                    v=randn(*kv_shape, seed=seed + 2, device=device))

    grads = ("q", "k", "v")
    d128 = 64 if tiny else 128  # the interpreter is slow at 128-wide tiles
    # Note: on a GPU each new attention shape compiles 16 kernels per dtype (5 autotune configs of the three
    # tuned kernels) and fp32's IEEE dots take a minute or more each to compile, so that the bounded run
    # checks bf16 on every case and fp16 / fp32 on the GQA one (the kernel tests cover fp32 widely on CUDA).
    return [
        Check(f"attention d{d128} padded keys",
              lambda backend, q, k, v, k_lens: {"out": attention(q, k, v, k_lens=k_lens, backend=backend)},
              qkv((2, length, 3, d128), (2, length, 3, d128), 1)
              | {"k_lens": torch.tensor([length, length // 2 + 3], device=device)},
              {"q", "k", "v"}, grads, torch_run=sdpa_dense, gpu_dtypes=("bf16",)),
        Check("attention d64 causal gqa",
              lambda backend, q, k, v: {"out": attention(q, k, v, causal=True, backend=backend)},
              qkv((1, length + 6, 4, 64), (1, length + 6, 2, 64), 11), {"q", "k", "v"}, grads,
              torch_run=lambda backend, q, k, v: sdpa_dense(backend, q, k, v, causal=True)),
        Check("attention d80 varlen",
              lambda backend, q, k, v, cu: {"out": attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                             backend=backend)},
              qkv((sum(lens), 2, 80), (sum(lens), 2, 80), 21) | {"cu": cu}, {"q", "k", "v"}, grads,
              torch_run=sdpa_varlen, gpu_dtypes=("bf16",)),
    ]


def _grpo_checks(device, tiny: bool) -> list[Check]:
    shape = (3, 4, 3, 5, 7) if tiny else (3, 16, 5, 30, 37)
    batch = shape[0]
    sigma = torch.tensor([0.9, 0.5, 0.2], device=device)
    sigma_next = sigma - 0.05
    std = sde_noise_std(sigma, sigma_next, 0.98632)
    schedule = dict(sigma=sigma, sigma_next=sigma_next, std=std)

    def step(backend, x, velocity, noise, sigma, sigma_next, std):
        x_next, log_prob, mean = grpo_step(x, velocity, sigma, sigma_next, std, noise, backend=backend)
        return {"x_next": x_next, "log_prob": log_prob, "mean": mean}

    def loss(backend, x, x_next, velocity, ref_mean, old_log_prob, advantages, sigma, sigma_next, std):
        value, stats = grpo_loss(x, x_next, velocity, old_log_prob, advantages, sigma, sigma_next, std,
                                 ref_mean=ref_mean, backend=backend)
        return {"loss": value, "log_prob": stats["log_prob"], "kl": stats["kl"]}

    def nft(backend, v_new, v_old, v_ref, x_t, x0, sigma, advantages):
        return {"loss": nft_loss(v_new, v_old, v_ref, x_t, x0, sigma, advantages, beta=0.1, adv_clip_max=5.0,
                                 kl_beta=1e-4, backend=backend)}

    x, velocity, noise = (randn(*shape, seed=s, device=device) for s in (31, 32, 33))
    x_next = x + 0.1 * randn(*shape, seed=34, device=device)
    advantages = randn(batch, seed=37, device=device)
    return [
        Check("grpo_step", step, dict(x=x, velocity=velocity, noise=noise, **schedule), {"x", "velocity", "noise"}),
        Check("grpo_loss + kl", loss,
              dict(x=x, x_next=x_next, velocity=velocity, ref_mean=x + 0.01 * randn(*shape, seed=35, device=device),
                   old_log_prob=randn(batch, seed=36, device=device) - 1.0, advantages=advantages, **schedule),
              {"x", "x_next", "velocity", "ref_mean"}, ("velocity",)),
        Check("nft_loss + kl", nft,
              dict(v_new=velocity + 0.01 * noise, v_old=velocity, v_ref=velocity + 0.02 * x, x_t=x_next, x0=x,
                   sigma=sigma, advantages=advantages),
              {"v_new", "v_old", "v_ref", "x_t", "x0"}, ("v_new",)),
    ]


def _group_advantage_check(device, tiny: bool) -> Check:
    count = 45 if tiny else 1001

    def run(backend, rewards, ids):
        result = group_advantage(rewards, ids, std="group", backend=backend)
        return {"advantages": result.advantages, "group_mean": result.group_mean, "group_std": result.group_std}

    ids = (torch.arange(count, device=device) * 7919 % 13) * 5 + 2  # 13 shuffled groups, sparse ids
    return Check("group_advantage", run, dict(rewards=randn(count, 3, seed=41, device=device), ids=ids),
                 {"rewards"})


def _norm_checks(device, tiny: bool) -> list[Check]:
    batch, length, width = (2, 5, 300) if tiny else (2, 37, 1500)
    x = randn(batch, length, width, seed=51, device=device)
    weight, bias = randn(width, seed=52, device=device), randn(width, seed=53, device=device)
    shift, scale = randn(batch, width, seed=54, device=device), randn(batch, width, seed=55, device=device) * 0.1
    y, gate = randn(batch, length, width, seed=56, device=device), randn(batch, width, seed=57, device=device)
    return [
        Check("rms_norm", lambda backend, x, w: {"out": norm.rms_norm(x, w, backend=backend)},
              dict(x=x, w=weight), {"x", "w"}, ("x", "w")),
        Check("layer_norm", lambda backend, x, w, b: {"out": norm.layer_norm(x, w, b, backend=backend)},
              dict(x=x, w=weight, b=bias), {"x", "w", "b"}, ("x", "w", "b")),
        Check("layer_norm_modulate",
              lambda backend, x, shift, scale: {"out": norm.layer_norm_modulate(x, shift, scale, backend=backend)},
              dict(x=x, shift=shift, scale=scale), {"x", "shift", "scale"}, ("x", "shift", "scale")),
        Check("gated_residual", lambda backend, x, y, gate: {"out": norm.gated_residual(x, y, gate, backend=backend)},
              dict(x=x, y=y, gate=gate), {"x", "y", "gate"}, ("x", "y", "gate")),
    ]


def _rope_checks(device, tiny: bool) -> list[Check]:
    batch, length, heads = (2, 11, 3) if tiny else (2, 301, 5)
    covered = length - 4  # the last tokens (padding) pass through unrotated

    def run(interleaved):
        return lambda backend, x, cos, sin: {"out": apply_rope(x, cos, sin, interleaved=interleaved,
                                                                 backend=backend)}

    checks = []
    for interleaved, head_dim, table in ((True, 128, (covered, 64)), (False, 80, (batch, covered, 40))):
        angle = randn(*table, seed=61 + head_dim, device=device) * 3
        checks.append(Check(f"rope d{head_dim} {'interleaved' if interleaved else 'rotate-half'}", run(interleaved),
                            dict(x=randn(batch, length, heads, head_dim, seed=63, device=device), cos=angle.cos(),
                                 sin=angle.sin()), {"x"}, ("x",)))
    return checks


def checks(device, tiny: bool) -> list[Check]:
    return [*_attention_checks(device, tiny), *_grpo_checks(device, tiny), _group_advantage_check(device, tiny),
            *_norm_checks(device, tiny), *_rope_checks(device, tiny)]


def compare(check: Check, dtype_name: str) -> list[dict]:
    """One row per output: the errors of ours and of PyTorch's path against the float64 truth."""
    dtype = DTYPES[dtype_name]
    low = {k: v.to(dtype) if k in check.cast else v for k, v in check.inputs.items()}
    wide = {k: v.double() if v.is_floating_point() else v for k, v in low.items()}
    truth = check.evaluate(wide, "reference", dtype)
    torch_path = check.evaluate(low, "reference", dtype, use_torch_path=True)
    ours = check.evaluate(low, "triton", dtype)
    rows = []
    for name, want in truth.items():
        err_ours = (ours[name].double() - want).abs().max().item()
        err_torch = (torch_path[name].double() - want).abs().max().item()
        tol = 2 * err_torch + ATOL[dtype_name] * max(1.0, want.abs().max().item())
        ok = err_ours <= tol and not ours[name].isnan().any()
        rows.append({"op": check.name, "dtype": dtype_name, "output": name, "shape": "x".join(map(str, want.shape)),
                     "err_ours": err_ours, "err_torch": err_torch, "tol": tol, "status": "ok" if ok else "FAIL"})
    return rows


def main(quick: bool = False) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tiny = quick or not on_gpu
    rows = [row for check in checks(device, tiny) for dtype in (check.gpu_dtypes if on_gpu else ("fp16", "fp32"))
            for row in compare(check, dtype)]
    failed = [r for r in rows if r["status"] != "ok"]
    columns = ["op", "dtype", "output", "shape", "err_ours", "err_torch", "tol", "status"]
    extra = {"criterion": "err_ours <= 2 * err_torch + atol * max(1, max|truth|); errors are max abs vs float64",
             "atol": ATOL, "tiny": tiny}
    if not on_gpu:
        extra["caveat"] = "CPU: the Triton interpreter, tiny sizes, fp32 and fp16 (no bf16); proves the check runs"
    report("kernel_check", rows, columns, extra)
    if failed:
        raise AssertionError(f"{len(failed)} kernel outputs outside tolerance: " + ", ".join(
            f"{r['op']} {r['dtype']} {r['output']}" for r in failed))
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
