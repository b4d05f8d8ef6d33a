"""Your own flow-matching policy and your own reward, trained by idgrpo's `GRPOTrainer` (docs/embedding.md).

Usage:
    python examples/custom_policy_grpo.py --out runs/example-custom                 # one CPU process (~10 s)
    python examples/custom_policy_grpo.py --out runs/example-custom --epochs 16     # resumes the run, 4 more epochs
    torchrun --nproc-per-node 2 examples/custom_policy_grpo.py --out runs/example-2 # the same run on 2 processes

No Wan and no idgrpo reward: the policy is a small MLP flow model over 8x8 RGB clips, pretrained here by flow
matching on clips of one random colour each, so it paints any colour whatever the prompt. The reward asks for the
colour the prompt names ("red", "green" or "blue"); GRPO teaches LoRA adapters on the policy to follow the prompt. The
script prints the mean reward of fixed-noise samples before and after GRPO, writes `<out>/summary.json` beside the
trainer's run directory (metrics.jsonl, checkpoints, LoRA exports, reward_curve.png), and exits 1 when the reward did
not rise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from idgrpo.engine import init_distributed, open_run
from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
from idgrpo.rl import Conditioning, GRPOConfig, GRPOTrainer, PromptRow, cfg_conditioning, flow_schedule, sample

SHAPE = (3, 2, 8, 8)  # (C, F, H, W) of one sample's latent: here the clip itself, RGB in [-1, 1]
PROMPT_DIM = 16
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColourFlow(nn.Module):
    """The policy contract (`idgrpo.rl.Policy`): policy(latents (B, C, F, H, W) fp32, timestep (B,) int64,
    prompt (B, PROMPT_DIM)) -> velocity dx/dσ, shape of latents. `timestep` is int(σ·1000), the integer the
    scheduler hands a diffusion model, not σ; `prompt` arrives by name from the conditioning's branch kwargs.

    An MLP predicts the clean clip x0, and the velocity of x_σ = (1 − σ)·x0 + σ·ε toward it is (x_σ − x0) / σ:
    the MLP's bottleneck could not pass the noise through itself."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        numel = math.prod(SHAPE)
        self.inp = nn.Linear(numel, hidden)
        self.time = nn.Linear(32, hidden)
        self.prompt = nn.Linear(PROMPT_DIM, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, numel)
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(16) / 16), persistent=False)

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        angles = timestep.float()[:, None] * self.freqs  # (B, 16)
        h = self.inp(latents.flatten(1)) + self.time(torch.cat([angles.sin(), angles.cos()], 1)) + self.prompt(prompt)
        h = self.mid(nn.functional.silu(h))
        return self.out(nn.functional.silu(h)).view_as(latents)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        sigma = (timestep.float() / 1000.0).clamp_min(1e-3).view(-1, 1, 1, 1, 1)
        return (latents - self.denoise(latents, timestep, prompt)) / sigma


def prompt_embedding(prompt: str) -> torch.Tensor:
    """A fixed (PROMPT_DIM,) vector per prompt: the stand-in for your text encoder."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % (2**63)
    return torch.randn(PROMPT_DIM, generator=torch.Generator().manual_seed(seed))


def conditioning_on(device: torch.device) -> Callable[[list[PromptRow]], Conditioning]:
    """The `ConditioningFn` for `device`: prompt rows -> the batch's guidance branches, tensors on the training
    device. One branch, no classifier-free guidance; `cfg_conditioning(cond, uncond, g)` adds the unconditional
    branch."""

    def build(rows: list[PromptRow]) -> Conditioning:
        prompts = torch.stack([prompt_embedding(r.prompt) for r in rows]).to(device)  # (B, PROMPT_DIM)
        return cfg_conditioning({"prompt": prompts}, None, 1.0)

    return build


def decode(latents: torch.Tensor) -> torch.Tensor:
    """The `DecodeFn`: latents (B, 3, F, H, W) in [-1, 1] -> uint8 frames (B, F, H, W, 3). A video model would run
    its VAE here."""
    return ((latents.permute(0, 2, 3, 4, 1) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def colour_reward(frames: torch.Tensor, references: list, prompts: list[str]) -> torch.Tensor:
    """The `RewardFn`: 1 − the distance of each clip's mean colour to the colour its prompt names (1 is a perfect
    match). It runs on the trainer's reward thread while the next batch is sampled, so it keeps no mutable state and
    runs no collective."""
    mean = frames.float().mean(dim=(1, 2, 3)) / 255.0  # (B, 3)
    target = torch.tensor([COLOURS[p] for p in prompts], device=frames.device)
    return 1.0 - (mean - target).norm(dim=1) / math.sqrt(3)


def pretrain(policy: ColourFlow, steps: int, seed: int) -> float:
    """Flow matching on clips of one random colour each, whatever the prompt: x_σ = (1 − σ)·x0 + σ·ε, the loss on
    the predicted x0 (the velocity's error times σ). Returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    prompts = torch.stack([prompt_embedding(p) for p in COLOURS])
    for _ in range(steps):
        colour = torch.rand(64, 3, 1, 1, 1, generator=gen) * 2 - 1
        x0 = colour.expand(-1, *SHAPE).clone()  # (64, C, F, H, W)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(64, generator=gen).clamp(1e-3, 1 - 1e-3)
        s = sigma.view(-1, 1, 1, 1, 1)
        prompt = prompts[torch.randint(len(COLOURS), (64,), generator=gen)]
        loss = (policy.denoise((1 - s) * x0 + s * noise, (sigma * 1000).long(), prompt) - x0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def mean_reward(policy, rows: list[PromptRow], device: torch.device, samples_per_row: int = 8) -> float:
    """The reward of fixed-noise ODE samples (the same noise before and after training)."""
    rows = [r for r in rows for _ in range(samples_per_row)]
    roll = sample(policy, conditioning_on(device)(rows), flow_schedule(10, 3.0), seeds=list(range(len(rows))),
                  latent_shape=SHAPE, solver="euler", device=device)
    return float(colour_reward(decode(roll.final), [[] for _ in rows], [r.prompt for r in rows]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory (created; an earlier run is resumed)")
    parser.add_argument("--epochs", type=int, default=12, help="GRPO epochs")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="flow-matching steps before GRPO")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    info = init_distributed()  # one process here; torchrun's environment when launched by torchrun
    # One run per directory: a rerun resumes it (with more --epochs, say); other changed settings are refused.
    open_run(args.out, {"pretrain_steps": args.pretrain_steps, "seed": args.seed, "epochs": args.epochs},
             mutable={"epochs"})
    torch.manual_seed(args.seed)
    policy = ColourFlow()  # every rank builds the same weights, as FSDP requires
    loss = pretrain(policy, args.pretrain_steps, args.seed)  # on the CPU: seconds
    rows = [PromptRow(colour) for colour in COLOURS]
    before = mean_reward(policy.to(info.device), rows, info.device)
    if info.rank == 0:
        print(f"pretrained by flow matching (last loss {loss:.3f}); reward of fixed-noise samples {before:.3f}")

    # LoRA on the policy's own Linears; the base stays frozen and is the KL reference (adapters switched off).
    apply_lora(policy, rank=8, alpha=8.0, targets=("prompt", "mid"))
    mark_only_lora_trainable(policy)
    # Each group's videos start from one latent (`shared_initial_noise`), so their rewards differ by the SDE noise of
    # the trained steps alone; the window trains the first two steps, where the colour is decided.
    config = GRPOConfig(num_steps=8, shift=3.0, sde_window_size=2, shared_initial_noise=True, group_size=16,
                        prompts_per_epoch=len(rows), rollout_batch_size=16, train_batch_size=16, updates_per_epoch=2,
                        lr=1e-2, clip_range=0.2, kl_beta=0.001, epochs=args.epochs, eval_every=0,
                        save_every=args.epochs, seed=args.seed, run_dir=str(args.out))
    # The trainer wraps `policy` in the engine's FSDP (its parameters move into flat shards): use trainer.policy
    # from here on.
    trainer = GRPOTrainer(config, policy, score=colour_reward, decode=decode,
                          build_conditioning=conditioning_on(info.device), latent_shape=SHAPE, train_rows=rows)
    history = trainer.train()
    after = mean_reward(trainer.policy, rows, info.device)

    rewards = [record["reward_mean"] for record in history]
    if trainer.rank == 0:
        summary = {"reward_before": before, "reward_after": after, "training_reward": rewards,
                   "epochs": len(history), "pretrain_loss": loss}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"GRPO, {len(history)} epochs: reward of fixed-noise samples {before:.3f} -> {after:.3f}")
    if not all(math.isfinite(r) for r in rewards) or not after > before:
        print(f"error: the reward did not rise ({before:.3f} -> {after:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
