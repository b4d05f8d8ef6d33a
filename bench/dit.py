"""Wan2.1 DiT forward and forward+backward: attention through idgrpo's kernel vs torch SDPA.

Usage:
    python -m bench dit            # 1.3B and 14B, 240x416x33 and 480x832x81, bf16 (needs a GPU)
    python -m bench dit --quick    # tiny preset on CPU: checks the path runs, timings mean nothing

The same randomly initialised model (bf16 weights, built on the meta device and materialised
once on the GPU) runs with `attention_impl="idgrpo"` and then `"sdpa"`, in the same process, on
the same inputs: batch 1, one text context of 512 rows. The rest of the model (norms, RoPE,
modulation: idgrpo kernels; matmuls: cuBLAS) is identical in both rows.

forward+backward: gradients of every weight (the full-finetune step; the LoRA step of GRPO does
less), activation checkpointing per block as in training (its recompute is NOT counted in the
FLOPs), weight gradients freed as soon as they are produced so that 14B fits.

FLOP convention (model FLOPs, MFU = FLOPs / time / peak dense bf16 of the device):
- every matmul counts 2*M*N*K: q/k/v/o and FFN per token, cross-attention k/v over the 512 text
  rows of every block, patch embeddings, text embedding, head;
- attention: 4 * Lq * Lk * dim per layer (QK^T and PV), non-causal, not halved;
- VACE blocks count like main blocks plus their projections;
- forward+backward = 3 x forward; norms, RoPE, softmax and elementwise work are not counted.
"""

from __future__ import annotations

import math

import torch

from bench.common import report, time_fn
from idgrpo.models.wan_dit import WanConfig, WanDiT

# Peak dense bf16 tensor FLOP/s by device name (SXM parts; the MFU column is empty elsewhere).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}

# (preset, label, latent (C, F, H, W)) -- 16 x ((T-1)/4+1) x H/8 x W/8 (docs/models.md#dit-tensor-conventions)
FULL_CASES = [
    ("t2v-1.3b", "240x416x33", (16, 9, 30, 52)),
    ("t2v-1.3b", "480x832x81", (16, 21, 60, 104)),
    ("t2v-14b", "240x416x33", (16, 9, 30, 52)),
    ("t2v-14b", "480x832x81", (16, 21, 60, 104)),
    # Identity-GRPO's rollout: VACE-1.3B, 2 reference frames prepended (docs/models.md#vace-context).
    ("vace-1.3b", "240x416x33+2ref", (16, 11, 30, 52)),
]
QUICK_CASES = [("tiny", "64x64x9 (tiny)", (16, 3, 8, 8)), ("tiny-vace", "64x64x9 (tiny)", (16, 3, 8, 8))]


def forward_flops(config: WanConfig, latent: tuple[int, int, int, int], batch: int = 1) -> float:
    """Model FLOPs of one forward (the convention in the module docstring)."""
    _, frames, height, width = latent
    pt, ph, pw = config.patch_size
    L = (frames // pt) * (height // ph) * (width // pw)  # video tokens
    Lt, C, Fd = config.text_len, config.dim, config.ffn_dim
    patch = pt * ph * pw
    block = (8 * L * C * C  # self-attention q, k, v, o
             + 4 * L * L * C  # QK^T and PV
             + 4 * L * C * C + 4 * Lt * C * C  # cross-attention q, o (video) and k, v (text)
             + 4 * L * Lt * C  # cross-attention QK^T and PV
             + 4 * L * C * Fd)  # FFN
    n_vace = len(config.vace_layers)
    total = config.num_layers * block
    if n_vace:
        total += n_vace * (block + 2 * L * C * C) + 2 * L * C * C  # hints (proj_out) + block 0's proj_in
        total += 2 * L * C * config.vace_in_dim * patch
    total += 2 * L * C * config.in_dim * patch  # patch embedding
    total += 2 * Lt * (config.text_dim * C + C * C)  # text embedding
    total += 2 * L * C * config.out_dim * patch  # head
    return float(batch * total)


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _build(preset: str, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """Random bf16 weights, allocated once on the device (meta -> to_empty -> init in place)."""
    with torch.device("meta"):
        model = WanDiT(WanConfig.from_name(preset))
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(0)
    return model.init_weights()


def _checkpoint_blocks(model: WanDiT) -> None:
    """Per-block activation checkpointing (what the engine does in training)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.units:
        inner = block.forward
        block.forward = lambda *args, _inner=inner: checkpoint(_inner, *args, use_reentrant=False)


def _run_case(preset, label, latent, device, dtype, quick) -> list[dict]:
    model = _build(preset, device, dtype)
    config = model.config
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, *latent, generator=gen).to(device)
    t = torch.tensor([700], device=device)
    context = torch.randn(1, config.text_len, config.text_dim, generator=gen).to(device=device, dtype=dtype)
    kwargs = {}
    if config.vace_layers:
        kwargs["vace_context"] = torch.randn(1, config.vace_in_dim, *latent[1:], generator=gen).to(device)
    flops = forward_flops(config, latent)
    peak = _peak(device)
    tokens = math.prod(s // p for s, p in zip(latent[1:], config.patch_size))
    warm, iters = (1, 2) if quick else (2, 5)
    _checkpoint_blocks(model)
    # Weight gradients are computed, then dropped at once: the benchmark measures compute, not the optimizer.
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    rows = []
    for impl in ("idgrpo", "sdpa"):
        model.set_attention_impl(impl)
        row = {"model": preset, "size": label, "tokens": tokens, "attention": impl}
        try:
            with torch.no_grad():
                fwd = time_fn(lambda: model(x, t, context, **kwargs), warmup=warm, iters=iters, device=device)

            def step():
                model(x, t, context, **kwargs).float().square().mean().backward()

            fwd_bwd = time_fn(step, warmup=1, iters=max(2, iters - 2), device=device)
            row.update(fwd_ms=fwd["ms_median"], fwd_bwd_ms=fwd_bwd["ms_median"],
                       fwd_tflops=flops / fwd["ms_median"] / 1e9, fwd_bwd_tflops=3 * flops / fwd_bwd["ms_median"] / 1e9)
            if peak:
                row.update(fwd_mfu=row["fwd_tflops"] * 1e12 / peak, fwd_bwd_mfu=row["fwd_bwd_tflops"] * 1e12 / peak)
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    ours, sdpa = rows
    if ours["status"] == sdpa["status"] == "ok":
        ours["fwd_speedup_vs_sdpa"] = sdpa["fwd_ms"] / ours["fwd_ms"]
        ours["fwd_bwd_speedup_vs_sdpa"] = sdpa["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    return rows


def main(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    cases = QUICK_CASES if quick or device.type != "cuda" else FULL_CASES
    rows = []
    for preset, label, latent in cases:
        rows += _run_case(preset, label, latent, device, dtype, quick)
    columns = ["model", "size", "tokens", "attention", "status", "fwd_ms", "fwd_tflops", "fwd_mfu",
               "fwd_bwd_ms", "fwd_bwd_tflops", "fwd_bwd_mfu", "fwd_speedup_vs_sdpa", "fwd_bwd_speedup_vs_sdpa"]
    extra = {"dtype": "bfloat16", "batch": 1, "text_len": 512,
             "flop_convention": "model FLOPs: 2*M*N*K per matmul + 4*Lq*Lk*dim per attention (non-causal); "
                                "fwd+bwd = 3 x fwd; checkpoint recompute not counted",
             "backward": "gradients of all weights, activation checkpointing per block"}
    if device.type != "cuda":
        extra["caveat"] = "CPU run of the tiny preset: checks that the benchmark works, not performance"
    report("dit", rows, columns, extra)
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
