"""idgrpo's engine on your own PyTorch model: FSDP, AdamW, updates that are never non-finite, crash-safe sharded
checkpoints that reshard, metrics and the run directory (docs/embedding.md).

Usage:
    python examples/engine_fsdp_training.py --out runs/example-engine                        # one CPU process
    torchrun --nproc-per-node 2 examples/engine_fsdp_training.py --out runs/example-engine   # 2 processes (gloo/NCCL)
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 \\
        examples/engine_fsdp_training.py --out runs/example-engine                           # several nodes

The same code runs in every case: without torchrun the engine makes a one-process world. The model is a small
transformer (its attention and norms are idgrpo's kernels: Triton on CUDA tensors, the PyTorch reference elsewhere)
regressing a fixed random teacher on seeded data; each step's global batch is cut between the ranks, so N processes
train what one does. A rerun with a larger `--steps` resumes from the newest checkpoint at any number of processes.
Prints the held-out loss before and after, writes `<out>/summary.json`, `<out>/model.safetensors` (the whole weights,
loadable into a plain `Student` with `load_state_dict`), `<out>/metrics.jsonl` and `<out>/checkpoints/`, and exits 1
when the held-out loss did not fall.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from idgrpo.engine import (
    FSDP,
    Checkpointer,
    Metrics,
    NonFiniteGuard,
    build_optimizer,
    clip_grad_norm_,
    export_full_weights,
    init_distributed,
    open_run,
    step_if_finite,
)
from idgrpo.kernels.attention import attention
from idgrpo.kernels.norm import rms_norm

IN_DIM, OUT_DIM, TOKENS, GLOBAL_BATCH = 6, 4, 12, 16


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.Parameter(torch.ones(width))
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.Parameter(torch.ones(width))
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        b, l, c = x.shape
        q, k, v = self.qkv(rms_norm(x, self.norm1)).view(b, l, 3, self.heads, c // self.heads).unbind(2)
        x = x + self.proj(attention(q, k, v, causal=True).reshape(b, l, c))  # (B, L, H, D) in and out
        return x + self.fc2(F.gelu(self.fc1(rms_norm(x, self.norm2))))


class Student(nn.Module):
    """(B, L, IN_DIM) -> (B, L, OUT_DIM). FSDP shards each entry of a top-level ModuleList (`blocks`) as one unit
    and everything else (embed, head) as the root unit."""

    def __init__(self, width: int = 64, heads: int = 4, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(IN_DIM, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.to(self.embed.weight.dtype))
        for block in self.blocks:
            h = block(h)
        return self.head(h).float()


def teacher_batch(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the teacher's targets: a fixed random function of each token and of the running mean of the
    tokens before it (so attention has something to do)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TOKENS, IN_DIM, generator=gen)
    fixed = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(IN_DIM, 32, generator=fixed), torch.randn(32, OUT_DIM, generator=fixed) / math.sqrt(32)
    w3 = torch.randn(IN_DIM, OUT_DIM, generator=fixed)
    running_mean = x.cumsum(1) / torch.arange(1, TOKENS + 1).view(1, -1, 1)
    return x, torch.tanh(x @ w1) @ w2 + running_mean @ w3


def my_slice(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if t.shape[0] % world_size:
        raise ValueError(f"a batch of {t.shape[0]} does not split over {world_size} processes")
    per = t.shape[0] // world_size
    return t[rank * per:(rank + 1) * per]


@torch.no_grad()
def held_out_loss(model: nn.Module, rank: int, world_size: int, device: torch.device) -> float:
    """Mean squared error on a fixed held-out batch, each rank its slice, averaged over ranks (a collective)."""
    x, y = teacher_batch(10**6, GLOBAL_BATCH)
    x, y = my_slice(x, rank, world_size).to(device), my_slice(y, rank, world_size).to(device)
    loss = F.mse_loss(model(x), y)
    dist.all_reduce(loss)  # the engine always has a process group, of one process without torchrun
    return float(loss) / world_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory (an earlier run is resumed)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in all (a rerun continues to this)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every this many steps (and at the end)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    args = parser.parse_args(argv)

    info = init_distributed()  # torchrun's environment, or a one-process world
    rank, world_size, device = info.rank, info.world_size, info.device
    # The run directory's settings are checked on resume; these may change (more steps, logging, memory).
    run = open_run(args.out, {"lr": args.lr, "steps": args.steps, "save_every": args.save_every,
                              "log_every": args.log_every, "activation_checkpointing": args.activation_checkpointing},
                   mutable={"steps", "save_every", "log_every", "activation_checkpointing"},
                   log=lambda message: print(message) if rank == 0 else None)

    torch.manual_seed(0)  # FSDP needs the same initial weights on every rank
    student = Student()
    before = held_out_loss(student.to(device), rank, world_size, device)  # the plain module, before FSDP
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = FSDP(student, compute_dtype=compute_dtype, activation_checkpointing=args.activation_checkpointing)
    optimizer = build_optimizer(model.trainable_parameters(), lr=args.lr, weight_decay=0.01)
    checkpointer = Checkpointer(args.out / "checkpoints", keep=2, config=vars(args))
    start = 0
    loaded = checkpointer.load_latest(model, optimizer) if run.resuming else None
    if loaded is not None:
        start, _extra = loaded
        if rank == 0:
            print(f"resumed from step {start} ({checkpointer.loaded}) on {world_size} process(es)")
    metrics = Metrics(args.out, rank=rank, all_reduce=True, truncate_after=start if loaded else None)
    guard = NonFiniteGuard(20, hint="lower --lr")

    for step in range(start, args.steps):
        x, y = teacher_batch(step, GLOBAL_BATCH)
        x, y = my_slice(x, rank, world_size).to(device), my_slice(y, rank, world_size).to(device)
        loss = F.mse_loss(model(x), y)
        loss.backward()  # gradients reduce-scatter into each rank's fp32 shard as each unit finishes
        grad_norm = clip_grad_norm_(model, 1.0)
        skipped = step_if_finite(optimizer, loss, grad_norm)  # 1.0 (and no update) when anything is NaN/Inf
        optimizer.zero_grad(set_to_none=True)
        guard.update(skipped)
        for name, value in (("loss", loss), ("grad_norm", grad_norm), ("skipped_steps", skipped)):
            metrics.add(name, value)  # device tensors: no host sync inside the step
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            logged = metrics.flush(done)  # one host read per interval
            guard.check(done)  # NonFiniteError once 20 updates in a row were undone
            if rank == 0:
                print(f"step {done}: loss {logged['loss']:.4f}  grad_norm {logged['grad_norm']:.3f}")
        if done % args.save_every == 0 or done == args.steps:
            checkpointer.save(done, model, optimizer)
    metrics.close()

    after = held_out_loss(model, rank, world_size, device)
    export_full_weights(model, args.out / "model.safetensors")  # a collective; rank 0 writes
    if rank == 0:
        summary = {"held_out_loss_before": before, "held_out_loss_after": after, "steps": args.steps,
                   "resumed_from": start, "world_size": world_size}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"held-out loss {before:.4f} -> {after:.4f} after {args.steps} steps on {world_size} process(es)")
    if not (math.isfinite(after) and after < before):
        print(f"error: the held-out loss did not fall ({before:.4f} -> {after:.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
