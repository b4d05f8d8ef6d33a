"""Sequence-parallel (Ulysses) communication: the cost model beside FSDP's, and the all-to-all measured on
several ranks.

Usage:
    python -m bench sp_comm                          # the cost model; one process measures nothing
    torchrun --nproc-per-node 8 -m bench sp_comm     # also times one all-to-all at every sp size dividing 8
    python -m bench sp_comm --quick                  # tiny measured shapes (gloo on CPU under 2+ processes)

Cost model (docs/sequence-parallel.md), per transformer block (main and VACE blocks alike), per sample, bytes
one rank sends; a sequence of L tokens of width C is padded to a multiple of sp and each rank holds L_pad / sp:
- one all-to-all moves an activation of (L_pad / sp) x C elements and keeps 1/sp of it: it sends
  (L_pad / sp) x C x bytes x (sp - 1) / sp;
- self-attention runs 4 all-to-alls in the forward (q, k, v in, the output back) and 4 in the backward; with
  activation checkpointing the forward runs twice, so a training step costs 12 per block, a rollout step 4;
- the output all-gather once per forward ((sp - 1) / sp of L x prod(patch) x out_dim fp32) is left out: it is
  one head-sized tensor per model, not per block.
FSDP over a world of W ranks (bench/engine.py's layout), per block and training step: the bf16 weights
gathered twice (forward, backward) and, in full fine-tuning, the fp32 gradients reduce-scattered:
P x (2 + 2 + 4) x (W - 1) / W bytes per rank; with LoRA on a frozen base only the two gathers remain.
"""

from __future__ import annotations

import math

import torch

from bench.common import format_table, report, time_fn
from idgrpo.engine import init_distributed
from idgrpo.engine.sequence_parallel import parallel_layout
from idgrpo.models.wan_dit import WanConfig, WanDiT

MIB = 2**20
# (preset, label, latent (C, F, H, W)): 16 x ((T - 1) / 4 + 1) x H / 8 x W / 8, as bench/dit.py
CASES = [
    ("vace-1.3b", "240x416x33+2ref", (16, 11, 30, 52)),  # Identity-GRPO's rollout and training shape
    ("t2v-1.3b", "480x832x81", (16, 21, 60, 104)),
    ("t2v-14b", "480x832x81", (16, 21, 60, 104)),
    ("t2v-14b", "720x1280x81", (16, 21, 90, 160)),
]
SP_SIZES = (2, 4, 8)
FSDP_WORLD = 8
ACTIVATION_BYTES = 2  # bf16 activations
ALL_TO_ALLS = {"rollout": 4, "train_no_ckpt": 8, "train": 12}


def all_to_all_bytes(tokens: int, width: int, sp: int, element_bytes: int = ACTIVATION_BYTES) -> float:
    """Bytes one rank sends in one all-to-all of a (tokens, width) activation split over sp ranks."""
    local_tokens = math.ceil(tokens / sp)
    return local_tokens * width * element_bytes * (sp - 1) / sp


def fsdp_block_bytes(block_params: int, world: int, full_finetune: bool) -> float:
    """Bytes one rank moves for one block in one FSDP training step (module docstring)."""
    per_param = 2 + 2 + (4 if full_finetune else 0)
    return block_params * per_param * (world - 1) / world


def cost_model(cases=CASES, sp_sizes=SP_SIZES, world: int = FSDP_WORLD) -> list[dict]:
    rows = []
    for preset, label, latent in cases:
        config = WanConfig.from_name(preset)
        with torch.device("meta"):
            model = WanDiT(config)
        block_params = sum(p.numel() for p in model.blocks[0].parameters())
        num_blocks = len(model.units)
        _, frames, height, width = latent
        pt, ph, pw = config.patch_size
        tokens = (frames // pt) * (height // ph) * (width // pw)
        for sp in sp_sizes:
            if config.num_heads % sp:  # Ulysses gives each rank num_heads / sp heads
                continue
            a2a = all_to_all_bytes(tokens, config.dim, sp)
            fsdp_full = fsdp_block_bytes(block_params, world, True)
            rows.append({
                "preset": preset, "video": label, "tokens": tokens, "heads": config.num_heads, "sp": sp,
                "a2a_mib": a2a / MIB,
                "rollout_block_mib": ALL_TO_ALLS["rollout"] * a2a / MIB,
                "train_block_mib": ALL_TO_ALLS["train"] * a2a / MIB,
                "fsdp_block_full_mib": fsdp_full / MIB,
                "fsdp_block_lora_mib": fsdp_block_bytes(block_params, world, False) / MIB,
                "train_vs_fsdp_full": ALL_TO_ALLS["train"] * a2a / fsdp_full,
                "train_step_gib": ALL_TO_ALLS["train"] * a2a * num_blocks / 2**30,
                "block_input_mib": math.ceil(tokens / sp) * config.dim * ACTIVATION_BYTES / MIB,
            })
    return rows


def measure(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device, warmup: int, iters: int) -> list[dict]:
    """Time `sequence_to_heads` of one (1, tokens / sp, heads, head_dim) tensor at every sp dividing the world."""
    world = torch.distributed.get_world_size()
    rows = []
    for sp_size in (s for s in SP_SIZES if world % s == 0 and heads % s == 0):
        sp = parallel_layout(sp_size).sp
        g = torch.Generator(device="cpu").manual_seed(sp_size)
        local = torch.randn(1, math.ceil(tokens / sp_size), heads, head_dim, generator=g).to(device, dtype)
        timing = time_fn(lambda sp=sp, local=local: sp.sequence_to_heads(local), warmup=warmup, iters=iters,
                         device=device)
        sent = all_to_all_bytes(tokens, heads * head_dim, sp_size, local.element_size())
        rows.append({"world_size": world, "sp": sp_size, "tokens": tokens, "width": heads * head_dim,
                     "dtype": str(dtype).removeprefix("torch."), "mib_sent": sent / MIB,
                     "ms": timing["ms_median"], "GB/s": sent / (timing["ms_median"] * 1e-3) / 1e9})
    return rows


def main(quick: bool = False) -> list[dict]:
    info = init_distributed()
    cuda = info.device.type == "cuda"
    rows = cost_model()
    measured = []
    if info.world_size > 1:
        if quick or not cuda:
            measured = measure(96, 8, 16, torch.float32, info.device, warmup=1, iters=3)
        else:  # Wan-14B's self-attention at 480x832x81
            measured = measure(32_760, 40, 128, torch.bfloat16, info.device, warmup=3, iters=20)
    if info.rank == 0:
        print(f"\nmeasured: one all-to-all (sequence_to_heads) on {info.world_size} rank(s)")
        print(format_table(measured) if measured else "(one process: run under torchrun with 2+ ranks to measure)")
        report("sp_comm", rows, extra={"measured": measured, "fsdp_world": FSDP_WORLD,
                                       "all_to_alls_per_block": ALL_TO_ALLS})
    return rows + measured


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
