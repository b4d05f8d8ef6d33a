"""A toy flow policy, decoder and reward: the policy of `train-grpo tiny` (`--model toy`, its default) and of the
trainer's tests.

The policy is an exact flow-matching velocity toward a prompt-dependent target m(prompt):
v = (x − m) / σ, so the ODE lands on m and the SDE on m plus a little noise. m = base(context) + LoRA-style
low-rank update (zero-initialised up-projection) + a per-element offset; the adapters can be switched off,
which is the KL reference. The brightness reward scores the mean brightness of the top-left quarter.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from idgrpo.rl.sampler import Conditioning, cfg_conditioning


class ToyFlowPolicy(nn.Module):
    """policy(latents (B, C, F, H, W), timestep (B,) int64, context (B, D)) -> velocity (B, C, F, H, W) fp32.

        policy = ToyFlowPolicy((4, 2, 8, 8))
        velocity = policy(torch.randn(3, 4, 2, 8, 8), torch.full((3,), 500), torch.randn(3, 8))
    """

    def __init__(self, latent_shape: Sequence[int], context_dim: int = 8, rank: int = 4, seed: int = 0):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        numel = math.prod(self.latent_shape)
        gen = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(context_dim, numel)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(numel, context_dim, generator=gen) * 0.3 / math.sqrt(context_dim))
            self.base.bias.copy_(torch.randn(numel, generator=gen) * 0.1)
        self.base.requires_grad_(False)
        self.lora_down = nn.Parameter(torch.randn(rank, context_dim, generator=gen) / math.sqrt(context_dim))
        self.lora_up = nn.Parameter(torch.zeros(numel, rank))
        self.offset = nn.Parameter(torch.zeros(numel))
        self.adapters_enabled = True

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The frozen base policy (the KL reference), like `idgrpo.models.lora.disable_lora`."""
        previous, self.adapters_enabled = self.adapters_enabled, False
        try:
            yield self
        finally:
            self.adapters_enabled = previous

    def target(self, context: torch.Tensor) -> torch.Tensor:
        m = self.base(context)  # (B, numel)
        if self.adapters_enabled:
            m = m + (context @ self.lora_down.t()) @ self.lora_up.t() + self.offset
        return m.view(-1, *self.latent_shape)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sigma = (timestep.float() / 1000.0).clamp_min(1e-3).view(-1, *([1] * (latents.ndim - 1)))
        return ((latents.float() - self.target(context.float())) / sigma).float()


def prompt_context(prompt: str, dim: int = 8) -> torch.Tensor:
    """A deterministic (dim,) embedding of a prompt (a stand-in for the text encoder)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % (2**63)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def toy_conditioning(prompts: Sequence[str], guidance: float = 1.0, dim: int = 8, device=None) -> Conditioning:
    """Conditioning of the toy policy: the prompt embedding; the unconditional branch has a zero context."""
    context = torch.stack([prompt_context(p, dim) for p in prompts]).to(device)  # (B, D)
    return cfg_conditioning({"context": context}, {"context": torch.zeros_like(context)}, guidance)


def toy_decode(latents: torch.Tensor) -> torch.Tensor:
    """(B, C >= 3, F, H, W) latents in ~[-1, 1] -> uint8 frames (B, F, H, W, 3): channels 0..2 as RGB."""
    rgb = latents[:, :3].float().permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


def brightness_score(frames: torch.Tensor, references=None, prompts=None) -> torch.Tensor:
    """Mean brightness in [0, 1] of the top-left quarter of every frame: (B, T, H, W, 3) uint8 -> (B,) fp32."""
    h, w = frames.shape[2], frames.shape[3]
    return frames[:, :, : max(1, h // 2), : max(1, w // 2)].float().mean(dim=(1, 2, 3, 4)) / 255.0


def brightness_reward(config=None, device=None):
    """Reward factory (the `reward` setting's "module:function" form) of the brightness score."""
    return brightness_score
