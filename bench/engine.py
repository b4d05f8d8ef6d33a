"""Engine benchmark: our FSDP vs PyTorch's FSDP2 (`fully_shard`) on Wan-1.3B-shaped blocks.

Usage:
    python -m bench engine                             # one GPU (world size 1)
    torchrun --nproc-per-node 8 -m bench engine        # several GPUs (rank 0 reports)
    python -m bench engine --quick                     # CPU: tiny blocks, checks the code path only

One training step = forward + backward + AdamW over a stack of blocks (width 1536, 12 heads,
FFN 8960, with cross-attention to 512 text tokens, as in Wan2.1-1.3B), bf16 compute, fp32
master weights / gradients reductions / optimizer state, activation checkpointing per block,
at 3,510 and 32,760 tokens per sample (32,760 = 21 latent frames x 30 x 52 patches: 81 frames
at 480x832).
Both engines run in the same process on the same shapes; peak memory is CUDA's
max_memory_allocated over the timed steps. Also prints a bytes-per-parameter memory model
for Wan-14B full fine-tuning on 8 x 80 GB.
"""

from __future__ import annotations

import gc
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench.common import report, time_fn
from idgrpo.engine import FSDP, build_optimizer, init_distributed


class Block(nn.Module):
    """A Wan-shaped transformer block: self-attention, cross-attention, GELU FFN, pre-norms."""

    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)
        self.cross_q, self.cross_kv, self.cross_o = nn.Linear(width, width), nn.Linear(width, 2 * width), \
            nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.checkpoint = False  # FSDP2 arm: checkpoint inside the block (ours does it per unit)

    def _attend(self, q, k, v):  # (B, L, C) each -> (B, L, C)
        b, lq, c = q.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, lq, c)

    def _forward(self, x, context):  # x (B, L, C), context (B, Lc, C)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.o(self._attend(q, k, v))
        k, v = self.cross_kv(context).chunk(2, dim=-1)
        x = x + self.cross_o(self._attend(self.cross_q(self.norm2(x)), k, v))
        return x + self.fc2(F.gelu(self.fc1(self.norm3(x)), approximate="tanh"))

    def forward(self, x, context):
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class Stack(nn.Module):
    def __init__(self, depth: int, width: int, heads: int, ffn: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, ffn) for _ in range(depth))
        self.head = nn.Linear(width, 16)

    def forward(self, x, context):
        for block in self.blocks:
            x = block(x, context)
        return self.head(x)


def _make_step(model, optimizer, x, context):
    def step():
        loss = model(x, context).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure(name, build, x, context, device, iters, warmup):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, optimizer = build()
    step = _make_step(model, optimizer, x, context)
    timing = time_fn(step, warmup=warmup, iters=iters, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer, step
    return {"engine": name, "ms_step": timing["ms_median"], "ms_min": timing["ms_min"], "peak_gib": peak}


def memory_model(params: float = 14.0e9, blocks: int = 40, width: int = 5120, ffn: int = 13824,
                 tokens: int = 32_760, gpus: int = 8, gpu_gib: float = 80.0) -> list[dict]:
    """Bytes per GPU for full fine-tuning with this engine (bf16 compute, fp32 master/grad/Adam,
    activation checkpointing per block, batch 1 per GPU)."""
    block_params = params / blocks
    gib = 2**30
    rows = [
        {"item": "fp32 master weights (sharded)", "bytes_per_param": 4 / gpus, "gib": params * 4 / gpus / gib},
        {"item": "fp32 gradients (sharded)", "bytes_per_param": 4 / gpus, "gib": params * 4 / gpus / gib},
        {"item": "AdamW exp_avg + exp_avg_sq (sharded)", "bytes_per_param": 8 / gpus, "gib": params * 8 / gpus / gib},
        {"item": "gathered bf16 weights (2 units: current + prefetch)", "bytes_per_param": None,
         "gib": 2 * block_params * 2 / gib},
        {"item": "unit gradient: bf16 unsharded + fp32 for reduce-scatter", "bytes_per_param": None,
         "gib": block_params * (2 + 4) / gib},
        {"item": "checkpointed activations: bf16 block inputs x blocks", "bytes_per_param": None,
         "gib": tokens * width * 2 * blocks / gib},
        {"item": "recompute working set of one block (~4 x L x C + 2 x L x FFN, bf16, + grads)",
         "bytes_per_param": None, "gib": 2 * tokens * (4 * width + 2 * ffn) * 2 / gib},
    ]
    total = sum(r["gib"] for r in rows)
    rows.append({"item": f"total per GPU ({gpus} x {gpu_gib:.0f} GiB)", "bytes_per_param": 16 / gpus, "gib": total})
    rows.append({"item": "without activation checkpointing: activations alone (~L x (12 C + 3 FFN) x 2 B x blocks)",
                 "bytes_per_param": None, "gib": tokens * (12 * width + 3 * ffn) * 2 * blocks / gib})
    rows.append({"item": "GRPO extra: frozen bf16 reference policy (sharded)", "bytes_per_param": 2 / gpus,
                 "gib": params * 2 / gpus / gib})
    return rows


def main(quick: bool = False) -> list[dict]:
    info = init_distributed()
    device = info.device
    cuda = device.type == "cuda"
    if quick or not cuda:
        shape = {"depth": 2, "width": 64, "heads": 4, "ffn": 160}
        token_counts, context_len, iters, warmup = [48, 96], 16, 3, 1
    else:
        shape = {"depth": 8, "width": 1536, "heads": 12, "ffn": 8960}
        token_counts, context_len, iters, warmup = [3_510, 32_760], 512, 10, 3
    dtype = torch.bfloat16

    def ours():
        torch.manual_seed(0)
        model = FSDP(Stack(**shape), compute_dtype=dtype, activation_checkpointing=True, device=device)
        return model, build_optimizer(model.trainable_parameters(), lr=1e-5)

    def fsdp2():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        torch.manual_seed(0)
        model = Stack(**shape).to(device)
        mesh = init_device_mesh(device.type, (info.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            block.checkpoint = True
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model, build_optimizer(model.parameters(), lr=1e-5)

    # FSDP2 warns that the stack returns a view; the benchmark never modifies outputs in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    rows = []
    for tokens in token_counts:
        g = torch.Generator(device="cpu").manual_seed(tokens)
        x = torch.randn(1, tokens, shape["width"], generator=g).to(device, dtype)
        context = torch.randn(1, context_len, shape["width"], generator=g).to(device, dtype)
        for name, build in (("idgrpo FSDP", ours), ("torch FSDP2 fully_shard", fsdp2)):
            try:
                row = _measure(name, build, x, context, device, iters, warmup)
            except Exception as e:  # keep the other engine's numbers
                row = {"engine": name, "error": f"{type(e).__name__}: {e}"[:200]}
            rows.append({"tokens": tokens, "world_size": info.world_size, **shape, **row})
    base = {r["tokens"]: r for r in rows if r["engine"].startswith("torch") and "ms_step" in r}
    for r in rows:
        b = base.get(r["tokens"])
        if b and "ms_step" in r:
            r["speedup_vs_fsdp2"] = b["ms_step"] / r["ms_step"]

    model_rows = memory_model()
    if info.rank == 0:
        print("\nmemory model: Wan-14B full fine-tuning, 8 x 80 GiB, bf16 compute, activation checkpointing, "
              "32,760 tokens, batch 1 per GPU")
        from bench.common import format_table

        print(format_table(model_rows, ["item", "bytes_per_param", "gib"]))
        if not cuda or quick:
            print("caveat: CPU / --quick: tiny blocks at world size 1; timings only prove the code path runs")
        report("engine", rows, ["tokens", "world_size", "depth", "width", "engine", "ms_step", "ms_min", "peak_gib",
                                "speedup_vs_fsdp2", "error"], extra={"memory_model_wan14b": model_rows})
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
