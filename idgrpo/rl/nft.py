"""The update phase of a DiffusionNFT epoch (`GRPOConfig.objective = "nft"`, docs/objectives.md#training-with-nft):
the "old" policy that samples, the noise levels and noises each sample is trained at, and the forward/backward of
one micro-batch at one noise level. The advantages, the micro-batch plan (`plan_update`) and the optimizer step are
GRPO's (`idgrpo.rl.update`).

    old = OldPolicy(trainer.params)                 # starts equal to the trained weights
    with old.swapped():                             # rollouts (and v_old) come from the old policy
        ...
    old.update(optimizer_steps)                     # after the epoch's update: old <- d·old + (1 - d)·trained

Note [NFT as the official script runs it] (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py, facts only):
- rollouts: the "old" LoRA adapter, CFG-free (guidance 1), a deterministic ODE solver, `num_steps` steps;
- training: per sample, a random permutation of the sampling timesteps, of which the first
  ⌊num_steps·timestep_fraction⌋ are used (9 of 10); at each, fresh Gaussian noise and x_t = (1 − σ)·x0 + σ·noise with
  x0 the rollout's clean latent; three forwards on x_t: the old adapter (no gradient), the trained one, and with
  the adapters disabled the reference (only for the KL term); the loss of `nft_loss`; gradients accumulate over
  every (micro-batch, timestep) of an optimizer step;
- after each epoch, old ← decay·old + (1 − decay)·trained with `decay = return_decay(global_step, decay_type)`
  (`old_policy_decay` here).
Here the per-sample permutation and noises come from seeded generators (a function of the sample's noise seed, the
inner epoch and the level), so that the update, like GRPO's, does not depend on the number of ranks or the
micro-batching; and the loss covers the video frames only (reference slots are dropped as for decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from idgrpo.kernels.nft_loss import nft_loss
from idgrpo.rl.config import GRPOConfig
from idgrpo.rl.ema import swapped_weights
from idgrpo.rl.sampler import Branch, Conditioning, Policy, guided_velocity

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: seeds of (sample, inner epoch, level) never collide in practice


def old_policy_decay(step: int, decay_type: int) -> float:
    """The official `return_decay(step, decay_type)`: the weight of the old policy in its update after optimizer
    step count `step`. 0: always 0; 1: min(0.001·step, 0.5); 2: 0 before step 75, then min(0.0075·(step − 75), 0.999).

        [old_policy_decay(s, 1) for s in (0, 100, 1000)]      # [0.0, 0.1, 0.5]
    """
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


class OldPolicy:
    """The NFT "old" policy: a copy of the trainable weights that follows them by `old_policy_decay`.

    Trainable weights only (LoRA adapters, or every weight in full fine-tuning; for FSDP, this rank's shards), kept in
    fp32. `swapped()` loads them into the parameters for a forward (rollouts and v_old) and restores the trained
    ones afterwards: two copies of the trainable shards per use, no second model."""

    def __init__(self, params: Sequence[torch.Tensor], decay_type: int):
        self.params = list(params)
        self.decay_type = decay_type
        self.weights = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, optimizer_steps: int) -> float:
        """old ← decay·old + (1 − decay)·trained, with the decay at `optimizer_steps` steps; returns the decay."""
        decay = old_policy_decay(optimizer_steps, self.decay_type)
        torch._foreach_lerp_(self.weights, [p.detach().float() for p in self.params], 1.0 - decay)
        return decay

    def swapped(self):
        """The old weights in the parameters for the duration (no gradient may flow through them)."""
        return swapped_weights(self.params, self.weights)

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        weights = list(state["weights"])
        if [tuple(w.shape) for w in weights] != [tuple(w.shape) for w in self.weights]:
            raise ValueError(f"old-policy state of shapes {[tuple(w.shape) for w in weights]} does not fit "
                             f"parameters of shapes {[tuple(w.shape) for w in self.weights]}")
        with torch.no_grad():
            for w, saved in zip(self.weights, weights, strict=True):
                w.copy_(saved)


def cfg_free(conditioning: Conditioning) -> Conditioning:
    """The conditional branch alone at weight 1 (guidance 1: one forward per step), with its injected frames."""
    first = conditioning.branches[0]
    return Conditioning([Branch(first.kwargs, 1.0, first.injected)], drop_front=conditioning.drop_front,
                        drop_back=conditioning.drop_back)


def training_levels(sample_seeds: Sequence[int], *, num_steps: int, levels: int, inner: int) -> torch.Tensor:
    """(n, levels) int64 on the host: per sample, the first `levels` of a random permutation of the `num_steps`
    sampling steps, drawn from a generator seeded by the sample's noise seed and the inner epoch."""
    out = torch.empty(len(sample_seeds), levels, dtype=torch.int64)
    for i, seed in enumerate(sample_seeds):
        gen = torch.Generator().manual_seed(_seed(seed, inner, -1))
        out[i] = torch.randperm(num_steps, generator=gen)[:levels]
    return out


def _seed(sample_seed: int, inner: int, level: int) -> int:
    return ((int(sample_seed) * 1_000_003 + inner * 7_919 + level + 1) * _MIX) % (2**63 - 1)


def level_noise(sample_seeds: Sequence[int], shape: Sequence[int], *, inner: int, level: int,
                device: torch.device) -> torch.Tensor:
    """(B, *shape) fp32 standard normal on `device`: sample b's noise at its `level`-th training level, a function
    of (its noise seed, inner epoch, level) alone."""
    return torch.stack([torch.randn(tuple(shape), dtype=torch.float32, device=device,
                                    generator=torch.Generator(device=device).manual_seed(_seed(s, inner, level)))
                        for s in sample_seeds])


def nft_forward_backward_step(policy: Policy, old: OldPolicy, reference: Policy | None, conditioning: Conditioning,
                              x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                              advantages: torch.Tensor, *, weight: float,
                              config: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """One micro-batch at one noise level: x_t = (1 − σ)·x0 + σ·noise; v_old (old policy, no gradient), v_new
    (trained), v_ref (reference, no gradient, only when `config.kl_beta` > 0); backward of nft_loss·weight on the
    video frames. x0, noise: (B, C, F, H, W) fp32; sigma (B,) float; timestep (B,) int64 (the model's int(σ·1000));
    advantages (B,). Returns the loss and detached diagnostics: `old_deviation` mean((v_new − v_old)²) and, with a
    reference, `velocity_kl` mean((v_new − v_ref)²)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1.0 - s) * x0 + s * noise
    with torch.no_grad(), old.swapped():
        v_old = guided_velocity(policy, x_t, timestep, conditioning)
    v_new = guided_velocity(policy, x_t, timestep, conditioning)
    v_ref = None
    if reference is not None and config.kl_beta > 0:
        with torch.no_grad():
            v_ref = guided_velocity(reference, x_t, timestep, conditioning)
    video = conditioning.video_latents
    loss = nft_loss(video(v_new), video(v_old), None if v_ref is None else video(v_ref), video(x_t), video(x0),
                    sigma, advantages, beta=config.nft_beta, adv_clip_max=config.adv_clip, kl_beta=config.kl_beta)
    (loss * weight).backward()
    with torch.no_grad():
        stats = {"old_deviation": (video(v_new) - video(v_old)).square().mean()}
        if v_ref is not None:
            stats["velocity_kl"] = (video(v_new) - video(v_ref)).square().mean()
    return loss.detach(), stats
