"""`idgrpo demo`: the whole Identity-GRPO pipeline on a tiny synthetic multi-person world, on a CPU.

Usage:
    idgrpo demo                                    # one CPU process, 7-10 minutes on 2 cores
    idgrpo demo --quick                            # a minute or two: the CI smoke run
    torchrun --nproc_per_node=2 -m idgrpo demo     # two gloo processes: the result of `--threads 1` for the seed
    idgrpo demo --help                             # every knob

Stages (`stage_*` functions, each returning a small dataclass; tqdm progress per stage on rank 0), all written
to --run-dir:
1. world data (`idgrpo.synth`): seeded people walking across small frames, exact boxes, reference images;
   identity preference pairs from synthetic distortions (`idgrpo.reward.distortions.make_pairs`).
2. a tiny Wan2.1-architecture policy (`idgrpo.models.wan_dit`, VACE branch) pretrained by flow matching on world
   videos, most of them imperfect (people recoloured by a random strength), so that there is room to improve.
3. the compact identity reward model (`idgrpo.reward.model`) trained by `idgrpo.reward.train.fit` (the loop of
   `idgrpo train-reward`) with the BTT loss on the distortion pairs and on annotated pairs of the pretrained
   policy's own samples (Note [annotated pairs]); held-out pairwise accuracy on non-tie pairs of both kinds (source
   scenes never seen in training).
4. GRPO (`idgrpo.rl.GRPOTrainer.train`: SDE rollouts, group advantages, clipped loss, KL to the LoRA-free policy)
   on LoRA adapters, with the trained reward model as the reward; by default on a fixed SDE window of the first 3 of
   6 steps, which reached the full-trajectory arm's gain in about a fifth of its time (docs/objective-study.md);
   `--sde-window-*` choose other windows, `--objective nft` trains with DiffusionNFT. Every `curve_every` epochs
   the held-out scenes are scored.
5. before/after on held-out scenes: learned reward and oracle identity consistency (`idgrpo.synth.oracle`, pixels
   vs. references inside the known boxes); reward_curve.png (training reward, held-out reward and oracle, KL and
   clipped fraction per epoch),
   before/after GIFs, before_after.png (references, then every frame before and after, per held-out scene),
   summary.json, a printed table.

Note [trivial latent]: at 32x32 pixels no VAE is needed. The "latent" is the video in [-1, 1] folded by a
pixel-unshuffle of `pixel_stride` (32x32x3 -> 8x8x48 at stride 4), one latent frame per video frame (no temporal
compression); decoding is the exact inverse. The policy is the real Wan DiT code with its patch embedding over
this latent; nothing else changes.

Note [VACE-style conditioning]: as in Wan2.1-VACE, the noise latent has one extra frame per reference in front
(dropped before decoding) and the VACE context stream carries, per latent frame, [reference latent | guide video |
layout]. In the reference slots: the reference image's latent and, in person p's layout channels, the layout of its
own sprite (the tag binding reference p to person p, with the same in-box coordinates). In the video slots: the
guide video and, per person p (p-th reference), a layout map of its box (inside-box indicator and the pixel's
normalised (x, y) inside the box), folded like the latent. The guide (`--guide`) is, by default, a rough
cut-and-paste composite: the background with every box blanked (VACE's inpainting input `video * (1 - mask)`)
and each reference sprite pasted into its person's boxes, back to front. The policy still has to learn to render
the scene from it (the background left blank inside the boxes, a clean video out of noise), and because most of
its pretraining targets break an identity (Note [imperfect targets]), it learns to break identities too: the
failure GRPO has to remove. With `--guide blank` the boxes stay empty and the policy must fetch every pixel of a
person from the reference frames through attention: the real VACE reference task, which a tiny DiT does not learn
within a 10-minute CPU pretraining (its samples stay noise inside the boxes, oracle about 0.1). The world puts
people on the latent's pixel grid (`WorldConfig.grid = pixel_stride`), so a sprite covers the same latent cells in
every frame and in its reference. The layout is the control signal (like VACE's pose/layout controls); it also
gives the oracle its exact boxes. The text branch sees one constant context row: the world's prompts say nothing
that references and layout do not.

Note [shared initial noise]: the pretrained policy's failure is nearly fixed per scene: across its samples of one
scene the oracle's standard deviation is only 0.02 to 0.03, more than half of its variance from the initial latent
and the rest from the SDE steps. GRPO can only credit the SDE steps it trains, so the part from the initial latent
is noise in the advantages. The demo therefore starts each group from one latent
(`GRPOConfig.shared_initial_noise`). On the same pretrained policies, reward models and seed, the oracle gain after
16 epochs was +24.0% with it and +15.0% without (recolour_probability 0.9), and +7.1% against +1.7% (0.6).

Note [distributed]: stages 1-3 are small and run replicated on every rank (identical inputs and seeds, so identical
weights; the reward model's updates only agree across ranks on skipping a non-finite one, the same decision
everywhere); stage 4 is the trainer's distributed GRPO (rollouts split across ranks, advantages from all-gathered
rewards, FSDP gradient reduction), whose results do not depend on the world size; stage 5 evaluates on rank 0's copy
(every rank holds the full policy after the final all-gather).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from idgrpo.engine.metrics import progress
from idgrpo.errors import UsageError, above, at_least, one_of, within

if TYPE_CHECKING:
    from idgrpo.reward.data import PairTensors
    from idgrpo.reward.train import FitConfig
    from idgrpo.synth.world import Scene

GUIDES = ("composite", "blank")
"""The guide video of the VACE context (see `vace_context_of`)."""

QUICK = dict(
    reward_videos=24, pairs_per_video=6, reward_epochs=2, policy_videos=24, pretrain_steps=12, grpo_epochs=2,
    grpo_prompts=6, prompts_per_epoch=2, group_size=4, num_steps=4, sde_window_size=2, eval_prompts=4,
    policy_dim=48, reward_dim=32,
)
"""The --quick sizes: every stage runs, none learns much (the CI smoke test of the pipeline)."""


@dataclass
class DemoConfig:
    """The `idgrpo demo` knobs. The defaults are the full demo; --quick swaps in the sizes of `QUICK`."""

    run_dir: Path = Path("runs/demo")
    """Output folder: summary.json, reward_curve.png, before_after.png, before/after GIFs, reward model, GRPO
    run (grpo/)."""
    quick: bool = False
    """Tiny sizes for a smoke run (CI): every stage and output, no meaningful learning. The sizes of `QUICK` replace
    only those left at their default: a size flag given with --quick wins."""
    seed: int = 0
    """Seed of the world, of every initialisation, shuffle and sampling noise."""
    threads: int = 0
    """torch CPU threads per process (0: the machine's cores divided by the number of processes). Floats, and so the
    results, depend on it (the order of CPU reductions): N processes give the result of one process with the same
    threads per process."""
    collective_timeout: float | None = None
    """Seconds a collective may wait for a stopped or slow peer before the run fails (None:
    $IDGRPO_COLLECTIVE_TIMEOUT, else 3600; docs/reliability.md)."""

    # --- the world -------------------------------------------------------------------------------------------------
    frame_size: int = 32
    """Frame side in pixels (a multiple of 16 and of 2 * pixel_stride)."""
    num_frames: int = 5
    """Frames per video (4k + 1, as the Wan sampler expects; 5 keeps the CPU demo within its 10 minutes: with one
    latent frame per video frame the DiT's sequence grows by 64 tokens per frame)."""
    num_people: int = 2
    """People per video (2 or 3)."""
    population: int = 48
    """Distinct identities of the world."""

    # --- stages 1 and 3: preference pairs and the reward model --------------------------------------------------------
    reward_videos: int = 160
    """World videos distorted into preference pairs (15% of them, with all their pairs, are held out)."""
    pairs_per_video: int = 10
    """Pairs per source video (identity-breaking, box-free and label-preserving distortions)."""
    reward_frames: int = 5
    """Frames the reward model samples per video."""
    reward_patch: int = 4
    """Reward-model ViT patch side (4: 64 tokens per 32x32 frame)."""
    reward_dim: int = 32
    """Reward-model token width."""
    reward_depth: int = 2
    """Reward-model image-encoder blocks."""
    reward_epochs: int = 7
    """Passes over the training pairs."""
    reward_batch: int = 32
    """Pairs per optimizer step."""
    reward_lr: float = 2e-3
    """Peak AdamW learning rate of the reward model (cosine decay)."""
    ties_k: float = 5.0
    """Rao-Kupper k of the BTT loss."""
    annotated_seeds: int = 4
    """Videos the pretrained policy samples per reward scene; every pair of one scene's videos becomes an annotated
    preference pair, labelled by the oracle (the stand-in for the paper's human annotators; 0: distortion pairs
    only). See Note [annotated pairs] in idgrpo/demo.py."""
    annotation_tie: float = 0.02
    """Oracle difference below which an annotated pair is labelled a tie (`same`)."""

    # --- stage 2: policy pretraining --------------------------------------------------------------------------------
    policy_videos: int = 256
    """World videos the policy is pretrained on."""
    imperfect_fraction: float = 0.8
    """Share of a scene's pretraining targets that are imperfect draws (Note [imperfect targets] in idgrpo/demo.py)."""
    recolour_probability: float = 0.9
    """In an imperfect draw, the chance that each person is recoloured (with imperfect_fraction 0.8: 72% of the
    people in the pretraining targets; this sets how far from clean the pretrained policy starts, see Note
    [imperfect targets])."""
    recolour_min: float = 0.3
    """A recoloured person's strength is uniform in [recolour_min, 1] (1: colours fully rotated R->G->B)."""
    pixel_stride: int = 4
    """Pixel-unshuffle factor of the trivial latent (channels 3 * stride^2). The world's people and references sit
    on this pixel grid (`WorldConfig.grid`), so a person covers the same latent cells in every frame."""
    guide: Literal["composite", "blank"] = "composite"
    """The VACE guide video: `composite` pastes each reference into its person's boxes (a rough cut-and-paste the
    policy must turn into the scene), `blank` leaves the boxes empty (the policy must fetch every pixel of a person
    from the reference frames by attention: far harder; a 10-minute CPU pretraining does not learn it)."""
    policy_patch: int = 1
    """Spatial patch of the DiT's patch embedding over the latent. Note: a token must be at least as wide as the
    latent values it covers (3 * stride^2 * patch^2), or the velocity (which carries the noise) cannot pass."""
    policy_dim: int = 64
    """Width of the tiny Wan DiT (2 heads)."""
    policy_layers: int = 4
    """Main blocks of the tiny Wan DiT; VACE blocks after layers 0, 1, 3 (the `tiny-vace` preset's layout)."""
    pretrain_steps: int = 800
    """Flow-matching optimizer steps."""
    pretrain_batch: int = 8
    """Videos per pretraining step."""
    pretrain_lr: float = 2e-3
    """Peak AdamW learning rate of pretraining (cosine decay)."""
    shift: float = 2.0
    """Flow shift of the sampling grid and of the pretraining σ distribution."""

    # --- stage 4: GRPO ----------------------------------------------------------------------------------------------
    objective: Literal["grpo", "nft"] = "grpo"
    """Stage 4's training objective (docs/objectives.md): "grpo" (the clipped-ratio loss on the SDE window) or "nft"
    (DiffusionNFT on forward-noised clean samples of CFG-free Euler rollouts of the old policy)."""
    grpo_prompts: int = 64
    """Training prompt rows (world scenes: references + layout) for GRPO."""
    grpo_epochs: int = 12
    """GRPO epochs (rollout + update rounds)."""
    prompts_per_epoch: int = 6
    """Prompt rows per epoch (global). 6 rows for 12 epochs rather than 4 for 16 (about the same rollouts): less
    noisy group advantages per update; seed 4's full run went from +12.7% to +17.9% (README, demo section)."""
    group_size: int = 8
    """Videos per prompt row (one advantage group)."""
    num_steps: int = 6
    """Sampling steps of rollouts and evaluation."""
    sde_window_size: int = 3
    """GRPO: stochastic (and trained) steps of a rollout, from the first step; the rest are Euler steps
    (Flow-GRPO-Fast style). --num-steps trains the full trajectory, as the Identity-GRPO paper; 2 with
    --sde-window-slide-every 2 is MixGRPO's sliding window (docs/objective-study.md compares them)."""
    sde_window_slide_every: int = 0
    """GRPO: advance the window by one step every this many epochs, wrapping around (MixGRPO's sliding window; 0: a
    fixed window at the start)."""
    timestep_fraction: float = 1.0
    """GRPO: train the SDE steps among the first ⌊num_steps·fraction⌋ steps. NFT: each sample is trained at
    ⌊num_steps·fraction⌋ (at least 1) noise levels of the sampling grid."""
    nft_beta: float = 1.0
    """NFT: the step β between the old and the trained policy (`GRPOConfig.nft_beta`)."""
    nft_old_decay: int = 1
    """NFT: the old policy's decay schedule, 0, 1 or 2 (`GRPOConfig.nft_old_decay`)."""
    lora_rank: int = 16
    """LoRA rank on the attention projections."""
    updates_per_epoch: int = 4
    """Optimizer steps per GRPO epoch (each on its own share of the epoch's samples, the same share at any world
    size)."""
    grpo_lr: float = 3e-3
    """AdamW learning rate of the LoRA adapters."""
    clip_range: float = 0.2
    """PPO ratio clip (large: few, big steps on a tiny model)."""
    kl_beta: float = 0.01
    """KL weight to the LoRA-free (pretrained) policy."""
    shared_initial_noise: bool = True
    """GRPO: a group's videos start from one initial latent and differ only in their SDE noise (Note [shared initial
    noise] in idgrpo/demo.py). Not with NFT, whose Euler rollouts have no noise after the first: a group would be one
    video G times."""

    # --- stage 5: evaluation ----------------------------------------------------------------------------------------
    eval_prompts: int = 16
    """Held-out scenes (new people combinations, paths, backgrounds) evaluated before and after GRPO."""
    curve_every: int = 4
    """Evaluate the held-out scenes (learned reward and oracle) every this many GRPO epochs for the training curves
    (0: before and after only). Deterministic and outside the training's random streams, so the trained policy does
    not depend on it; its time is not counted in `train_wall_s`."""
    stage_cache: Path | None = None
    """Folder of cached stage 1-3 results (the pretrained policy and the reward model, under a key of every setting
    they depend on): reused when present, written when missing. The arms of the objective study share it."""
    gif_videos: int = 4
    """Held-out videos written as before/after GIFs."""

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        if self.quick:
            # Only the sizes left at their full-demo default shrink: a flag the user gave wins (one given with
            # exactly the full default's value cannot be told apart from none, and shrinks too).
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, value in QUICK.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        one_of(self, "guide", GUIDES)
        one_of(self, "num_people", (2, 3))
        within(self, "seed", 0, 2**31 - 1)  # stage 4's GRPOConfig.seed range
        at_least(self, 0, "threads", "gif_videos", "annotation_tie", "kl_beta", "curve_every", "sde_window_slide_every")
        at_least(self, 1, "pixel_stride", "reward_patch", "policy_patch", "reward_frames", "reward_depth",
                 "reward_epochs", "reward_batch", "pretrain_steps", "pretrain_batch", "grpo_epochs",
                 "prompts_per_epoch", "num_steps", "eval_prompts", "policy_videos", "grpo_prompts", "pairs_per_video",
                 "lora_rank", "updates_per_epoch")
        at_least(self, 2, "group_size", "policy_layers")  # a group's advantages are relative; VACE blocks at 0, 1, L-1
        at_least(self, self.num_people, "population")
        at_least(self, 8, "reward_videos")  # 15% of them are held out
        above(self, 0.0, "reward_lr", "pretrain_lr", "grpo_lr", "shift", "clip_range")
        above(self, 1.0, "ties_k")
        within(self, "imperfect_fraction", 0.0, 1.0, open_high=True)
        within(self, "recolour_probability", 0.0, 1.0)
        within(self, "recolour_min", 0.0, 1.0)
        within(self, "sde_window_size", 1, self.num_steps)
        if self.collective_timeout is not None:
            above(self, 0.0, "collective_timeout")
        if self.frame_size % 16 or self.frame_size % (2 * self.pixel_stride) or self.frame_size < 32:
            raise UsageError(f"--frame-size {self.frame_size} must be >= 32 and a multiple of 16 and of 2 * "
                             f"--pixel-stride ({2 * self.pixel_stride})")
        if self.pixel_stride > self.frame_size // 4:
            raise UsageError(f"--pixel-stride {self.pixel_stride} must be at most --frame-size / 4 "
                             f"({self.frame_size // 4})")
        if (self.num_frames - 1) % 4 or not 5 <= self.num_frames <= 61:
            raise UsageError(f"--num-frames must be 4k + 1 in [5, 61], got {self.num_frames}")
        if self.policy_dim % 2 or self.policy_dim // 2 < 6:
            raise UsageError(f"--policy-dim must be even and >= 12 (2 heads of head_dim >= 6), got {self.policy_dim}")
        if self.policy_dim < 3 * (self.pixel_stride * self.policy_patch) ** 2:
            raise UsageError(f"--policy-dim {self.policy_dim} < the latent values per token "
                             f"{3 * (self.pixel_stride * self.policy_patch) ** 2} (see --policy-patch)")
        if self.reward_dim % 4 or self.reward_dim < 4:
            raise UsageError(f"--reward-dim must be a positive multiple of 4 (4 heads), got {self.reward_dim}")
        if self.frame_size % self.reward_patch:
            raise UsageError(f"--frame-size {self.frame_size} must be a multiple of --reward-patch {self.reward_patch}")
        if self.annotated_seeds == 1 or self.annotated_seeds < 0:
            raise UsageError(f"--annotated-seeds must be 0 or >= 2 (pairs of one scene's videos), "
                             f"got {self.annotated_seeds}")
        grpo_config(self)  # stage 4's settings are checked now, not after three stages of work


# ----------------------------------------------------------------------------------------------------------------------
# The trivial latent and the VACE-style context
# ----------------------------------------------------------------------------------------------------------------------


def encode_frames(frames: torch.Tensor, stride: int) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> latent (B, 3 * stride^2, T, H / stride, W / stride) fp32 in [-1, 1]."""
    b, t = frames.shape[:2]
    x = frames.permute(0, 1, 4, 2, 3).float().flatten(0, 1) / 127.5 - 1.0  # (B*T, 3, H, W)
    x = F.pixel_unshuffle(x, stride)  # (B*T, C, h, w)
    return x.unflatten(0, (b, t)).transpose(1, 2).contiguous()


def decode_latents(latents: torch.Tensor, stride: int) -> torch.Tensor:
    """latent (B, C, T, h, w) -> uint8 frames (B, T, H, W, 3) (the exact inverse of `encode_frames`)."""
    b, _, t = latents.shape[:3]
    x = F.pixel_shuffle(latents.transpose(1, 2).flatten(0, 1).float(), stride)  # (B*T, 3, H, W)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.unflatten(0, (b, t)).permute(0, 1, 3, 4, 2).contiguous()


def layout_maps(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """boxes (P, T, 4) -> (T, 3P, size, size) fp32: per person, inside-box indicator and normalised x, y in [-1, 1]
    inside the box (0 outside)."""
    num_people, num_frames, _ = boxes.shape
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    maps = torch.zeros(num_frames, 3 * num_people, size, size)
    for p in range(num_people):
        x0, y0, x1, y1 = (boxes[p, :, i].float().view(-1, 1) for i in range(4))  # (T, 1)
        inside_x = (coords >= x0) & (coords < x1)  # (T, size)
        inside_y = (coords >= y0) & (coords < y1)
        u = torch.where(inside_x, 2 * (coords - x0) / (x1 - x0).clamp_min(1) - 1, 0.0)  # (T, size)
        v = torch.where(inside_y, 2 * (coords - y0) / (y1 - y0).clamp_min(1) - 1, 0.0)
        inside = inside_y[:, :, None] & inside_x[:, None, :]  # (T, size, size)
        maps[:, 3 * p] = inside.float()
        maps[:, 3 * p + 1] = torch.where(inside, u[:, None, :].expand_as(inside), 0.0)
        maps[:, 3 * p + 2] = torch.where(inside, v[:, :, None].expand_as(inside), 0.0)
    return maps


def paste_references(canvas: torch.Tensor, boxes: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
    """canvas (T, 3, H, W) in [-1, 1] with every reference sprite pasted into its person's box, back to front (the
    rough composite of the `composite` guide). Sprites are nearest-resized to the box and clipped to the frame."""
    from idgrpo.synth.oracle import place_sprite, sprite_from_reference

    out = canvas.clone()
    num_frames, _, height, width = canvas.shape
    for p, reference in enumerate(references):
        sprite, mask = sprite_from_reference(reference.cpu())
        for t in range(num_frames):
            full, placed = place_sprite(sprite, mask, boxes[p, t].tolist(), height, width)
            out[t][:, full] = placed[full].T / 127.5 - 1.0
    return out


def vace_context_of(frames: torch.Tensor, boxes: torch.Tensor, references: list[torch.Tensor], stride: int,
                    guide: str = "composite") -> torch.Tensor:
    """The VACE context of one scene: (C_vace, n_ref + T, h, w) with C_vace = 3s^2 (reference latent or guide video)
    + 3P·s^2 (layout). frames uint8 (T, H, W, 3) are only used outside every box (the background). The guide video:
    the background with every box blanked (`blank`, VACE's `video * (1 - mask)`), then with each reference sprite
    pasted into its boxes (`composite`, a rough cut-and-paste of the scene); see Note [VACE-style conditioning]."""
    from idgrpo.synth.oracle import sprite_box

    if guide not in GUIDES:
        raise ValueError(f"guide={guide!r}: expected one of {GUIDES}")
    size = frames.shape[1]
    maps = layout_maps(boxes, size)  # (T, 3P, H, W)
    in_any_box = maps[:, 0::3].amax(1, keepdim=True) > 0  # (T, 1, H, W)
    video = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    inactive = torch.where(in_any_box, 0.0, video)  # VACE's video * (1 - mask)
    if guide == "composite":
        inactive = paste_references(inactive, boxes, references)
    video_slots = torch.cat([F.pixel_unshuffle(inactive, stride), F.pixel_unshuffle(maps, stride)], 1)
    refs = encode_frames(torch.stack(references)[:, None], stride)[:, :, 0]  # (n_ref, C, h, w)
    # Reference slot p carries the layout of its own sprite in person p's channels: the tag that binds reference p
    # to the boxes of person p, and the same in-box (x, y) coordinates, so a box pixel can find its reference pixel.
    ref_layout = torch.zeros(len(references), maps.shape[1], size, size)
    for p, reference in enumerate(references):
        ref_layout[p, 3 * p:3 * p + 3] = layout_maps(sprite_box(reference.cpu())[None, None], size)[0]
    ref_slots = torch.cat([refs, F.pixel_unshuffle(ref_layout, stride)], 1)
    return torch.cat([ref_slots, video_slots]).transpose(0, 1).contiguous()  # (C_vace, n_ref + T, h, w)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: world data
# ----------------------------------------------------------------------------------------------------------------------


# Identity-breaking kinds, the reference mismatch, and label-preserving ties. The temporal-quality kinds (shuffle,
# flicker) are left out: the demo's reward is about identities only.
PAIR_KINDS = ("swap", "drift", "blend", "clone", "remove", "mismatch", "photometric", "crop")


def imperfect_version(scene, rng: random.Random, probability: float, minimum: float) -> torch.Tensor:
    """Note [imperfect targets]: an identity-broken draw of a scene's video, what a not-yet-aligned generator gets
    wrong: each person, with `probability`, recoloured (`idgrpo.reward.distortions.recolour_person`) with a strength
    uniform in [minimum, 1]. One failure family with one continuous strength per person, rather than a mix of swaps,
    drifts, blends and clones: with that mix the tiny policy learned the average of its targets, its samples of one
    scene hardly differed (oracle std 0.014 across seeds) and GRPO had nothing to select from (README, demo). Each
    scene gets several independent draws, so the strength varies for the same conditioning. How many people are hit
    sets how far the pretrained policy starts from clean, and so the room GRPO has: the same DiT pretrained on clean
    videos only scores about 0.78 on the oracle; with recolour_probability 0.6 the policy starts at 0.65, with 0.9
    (the default) at 0.51."""
    from idgrpo.reward.distortions import recolour_person

    out = scene.frames
    hit = [p for p in range(scene.boxes.shape[0]) if rng.random() < probability]
    for p in hit:
        out = recolour_person(out, scene.boxes, p, rng.uniform(minimum, 1.0))
    return out


@dataclass
class DemoRow:
    """A prompt row of the GRPO trainer (`prompt`, `references`) plus what the demo knows about its scene."""

    prompt: str
    references: list[torch.Tensor]
    boxes: torch.Tensor  # (P, T, 4)
    vace_context: torch.Tensor  # (C_vace, n_ref + T, h, w)
    frames: torch.Tensor  # (T, H, W, 3) uint8, the clean world video
    ref_paths: list[str] = dataclasses.field(default_factory=list)


def scene_row(scene, stride: int, guide: str = "composite") -> DemoRow:
    return DemoRow(scene.prompt, scene.references, scene.boxes,
                   vace_context_of(scene.frames, scene.boxes, scene.references, stride, guide), scene.frames)

# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: policy pretraining
# ----------------------------------------------------------------------------------------------------------------------


def build_policy(cfg: DemoConfig, device: torch.device | None = None):
    """The tiny Wan DiT with the VACE branch, sized for the trivial latent. Attention: our kernel on CUDA; on a CPU
    torch's SDPA (its fused CPU kernel), since our op's CPU path is the plain-PyTorch reference (the tests' oracle,
    with explicit masks and fp32 score matrices) and about 1.5x slower for the demo's whole pretraining step."""
    from idgrpo.models.wan_dit import WanConfig, WanDiT

    channels = 3 * cfg.pixel_stride**2
    wan = WanConfig.from_name("tiny-vace", dim=cfg.policy_dim, ffn_dim=2 * cfg.policy_dim, num_heads=2,
                              num_layers=cfg.policy_layers, vace_layers=tuple(sorted({0, 1, cfg.policy_layers - 1})),
                              in_dim=channels, out_dim=channels, vace_in_dim=channels * (1 + cfg.num_people),
                              text_dim=32, text_len=1, patch_size=(1, cfg.policy_patch, cfg.policy_patch),
                              attention_impl="idgrpo" if device is not None and device.type == "cuda" else "sdpa")
    torch.manual_seed(cfg.seed + 1)
    return WanDiT(wan).init_weights()


def constant_context(batch: int, text_dim: int = 32) -> torch.Tensor:
    """The text branch's input: one constant row (see the module note on conditioning)."""
    return torch.full((batch, 1, text_dim), 0.1)


def pretrain_policy(cfg: DemoConfig, policy, rows: list[DemoRow], targets: list[list[torch.Tensor]], bar) -> list:
    """Flow matching on [reference latents | video latents]: x_σ = (1-σ) x0 + σ ε, velocity target ε - x0, σ drawn
    uniformly and shifted like the sampling grid. targets[i]: candidate videos of row i (clean and imperfect)."""
    from idgrpo.engine import warmup_cosine

    stride = cfg.pixel_stride
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    rng = random.Random(cfg.seed + 3)
    refs = [encode_frames(torch.stack(r.references)[:, None], stride)[:, :, 0].transpose(0, 1) for r in rows]
    losses = []
    for step in range(cfg.pretrain_steps):
        index = [rng.randrange(len(rows)) for _ in range(cfg.pretrain_batch)]
        videos = torch.stack([rng.choice(targets[i]) for i in index])  # (B, T, H, W, 3)
        x0 = torch.cat([torch.stack([refs[i] for i in index]), encode_frames(videos, stride)], 2)  # (B, C, n+T, h, w)
        vace = torch.stack([rows[i].vace_context for i in index])
        u = torch.rand(len(index), generator=generator)
        sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)  # (B,)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for group in optimizer.param_groups:
            group["lr"] = cfg.pretrain_lr * warmup_cosine(step, cfg.pretrain_steps, warmup=20)
        velocity = policy(xt, sigma * 1000, constant_context(len(index)), vace_context=vace)
        loss = (velocity - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
        bar.update(1)
    return [float(v) for v in torch.stack(losses)] if losses else []


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: the reward model
# ----------------------------------------------------------------------------------------------------------------------


def pair_tensors(pairs, video_store, ref_store, num_frames: int):
    """In-memory `idgrpo.reward.data.PairTensors` of synthetic pairs (no files: the demo's pairs never leave RAM)."""
    from idgrpo.media import uniform_indices
    from idgrpo.reward.data import LABELS, PairTensors

    def clip(name):
        video = video_store[name]
        return video[uniform_indices(video.shape[0], num_frames)]

    return PairTensors(
        frames_a=torch.stack([clip(p.video_a) for p in pairs]),
        frames_b=torch.stack([clip(p.video_b) for p in pairs]),
        refs_a=torch.stack([torch.stack([ref_store[r] for r in p.refs_a]) for p in pairs]),
        refs_b=torch.stack([torch.stack([ref_store[r] for r in p.refs_b]) for p in pairs]),
        ref_mask=torch.ones(len(pairs), len(pairs[0].refs_a), dtype=torch.bool),
        labels=torch.tensor([LABELS[p.label.lower()] for p in pairs], dtype=torch.int64),
        kinds=[p.kind for p in pairs], prompts=[p.prompt for p in pairs])


def annotated_pairs(cfg: DemoConfig, policy, rows: list[DemoRow], device, seed_base: int, bar=None):
    """Note [annotated pairs]: `annotated_seeds` samples of the pretrained policy per row (scene), and every pair of
    one row's samples labelled by the oracle: the better one preferred, `same` when their oracle scores differ by
    less than `annotation_tie`. The stand-in for the paper's human-annotated pairs of generated videos: the
    distortion pairs alone teach the reward model the world's clean videos and their edits, not the policy's own
    artifacts, and it then ranks a group of the policy's samples of one scene poorly (on the recoloured-people
    policy of the README: correlation with the oracle 0.14 within scenes, 0.77 once these pairs are added).
    Returns `idgrpo.reward.data.PairTensors` (kind `annotated`)."""
    from itertools import combinations

    from idgrpo.media import uniform_indices
    from idgrpo.reward.data import LABELS, PairTensors
    from idgrpo.synth import oracle_consistency

    draws = [sample_videos(cfg, policy, rows, device, seed_base + 100_003 * k, bar) for k in range(cfg.annotated_seeds)]
    frames = uniform_indices(cfg.num_frames, cfg.reward_frames)
    fa, fb, refs, labels, prompts = [], [], [], [], []
    for i, row in enumerate(rows):
        videos = [draw[i] for draw in draws]
        scores = [oracle_consistency(v, row.boxes, row.references).video for v in videos]
        for a, b in combinations(range(len(videos)), 2):
            diff = scores[a] - scores[b]
            labels.append(LABELS["same"] if abs(diff) < cfg.annotation_tie else LABELS["a" if diff > 0 else "b"])
            fa.append(videos[a][frames])
            fb.append(videos[b][frames])
            refs.append(torch.stack(row.references))
            prompts.append(row.prompt)
    refs = torch.stack(refs)
    return PairTensors(frames_a=torch.stack(fa), frames_b=torch.stack(fb), refs_a=refs, refs_b=refs.clone(),
                       ref_mask=torch.ones(refs.shape[:2], dtype=torch.bool), labels=torch.tensor(labels),
                       kinds=["annotated"] * len(labels), prompts=prompts)


def concat_pairs(*sets):
    """One `PairTensors` of several (tensors concatenated along the pairs, lists joined)."""
    from idgrpo.reward.data import PairTensors

    return PairTensors(**{f.name: torch.cat([getattr(t, f.name) for t in sets]) if f.name not in ("kinds", "prompts")
                          else [x for t in sets for x in getattr(t, f.name)] for f in dataclasses.fields(PairTensors)})


# ----------------------------------------------------------------------------------------------------------------------
# Stage 4-5: GRPO and evaluation
# ----------------------------------------------------------------------------------------------------------------------


def conditioning_builder(cfg: DemoConfig, device):
    from idgrpo.rl.sampler import cfg_conditioning

    def build(rows):
        kwargs = {"context": constant_context(len(rows)).to(device),
                  "vace_context": torch.stack([r.vace_context for r in rows]).to(device)}
        return cfg_conditioning(kwargs, None, 1.0, drop_front=cfg.num_people)

    return build


@torch.no_grad()
def sample_videos(cfg: DemoConfig, policy, rows: list[DemoRow], device, seed_base: int, bar=None) -> list:
    """Deterministic samples (Euler ODE) of the policy, one per row, row i from the noise of seed `seed_base + i`:
    uint8 (T, H, W, 3) videos on the CPU. `bar` (optional) advances by one per row."""
    from idgrpo.rl.sampler import sample
    from idgrpo.rl.schedules import flow_schedule

    build = conditioning_builder(cfg, device)
    schedule = flow_schedule(cfg.num_steps, cfg.shift, "diffusers")
    latent_shape = latent_shape_of(cfg)
    videos = []
    for start in range(0, len(rows), 8):
        batch = rows[start:start + 8]
        cond = build(batch)
        seeds = [seed_base + start + i for i in range(len(batch))]
        roll = sample(policy, cond, schedule, seeds, latent_shape, solver="euler", device=device)
        videos += list(decode_latents(cond.video_latents(roll.final), cfg.pixel_stride).cpu())  # (T, H, W, 3) each
        if bar is not None:
            bar.update(len(batch))
    return videos


@dataclass
class PolicyEvaluation:
    """Held-out rows sampled by a policy (`evaluate_policy`): learned reward and oracle identity consistency per
    video, and the videos."""

    reward: list[float]
    oracle: list[float]
    videos: list[torch.Tensor]  # (T, H, W, 3) uint8 each

    @property
    def reward_mean(self) -> float:
        return sum(self.reward) / len(self.reward)

    @property
    def oracle_mean(self) -> float:
        return sum(self.oracle) / len(self.oracle)

    def summary(self) -> dict:
        """The JSON-able part (every field but the videos, and the means)."""
        return {"reward": self.reward, "oracle": self.oracle, "reward_mean": self.reward_mean,
                "oracle_mean": self.oracle_mean}


@torch.no_grad()
def evaluate_policy(cfg: DemoConfig, policy, rows: list[DemoRow], score, device) -> PolicyEvaluation:
    """Deterministic (Euler ODE, fixed noise per row) samples of held-out rows, scored by `score` and the oracle."""
    from idgrpo.synth import oracle_consistency

    videos = sample_videos(cfg, policy, rows, device, cfg.seed * 1_000_003 + 777_777)
    rewards = []
    for start in range(0, len(rows), 8):
        batch = rows[start:start + 8]
        frames = torch.stack(videos[start:start + 8]).to(device)
        rewards += score(frames, [r.references for r in batch], [r.prompt for r in batch]).float().cpu().tolist()
    oracle = [oracle_consistency(v, r.boxes, r.references).video for v, r in zip(videos, rows, strict=True)]
    return PolicyEvaluation(rewards, oracle, videos)


def latent_shape_of(cfg: DemoConfig) -> tuple[int, int, int, int]:
    side = cfg.frame_size // cfg.pixel_stride
    return (3 * cfg.pixel_stride**2, cfg.num_people + cfg.num_frames, side, side)


def grpo_config(cfg: DemoConfig):
    """The GRPO algorithm settings of stage 4 (the policy, video size and CFG-free conditioning are the demo's own)."""
    from idgrpo.rl.config import GRPOConfig

    return GRPOConfig(
        objective=cfg.objective, nft_beta=cfg.nft_beta, nft_old_decay=cfg.nft_old_decay, nft_solver="euler",
        sde_window_slide_every=cfg.sde_window_slide_every,
        num_steps=cfg.num_steps, shift=cfg.shift, grid="diffusers", group_size=cfg.group_size,
        # One rollout forward for a rank's whole epoch and micro-batches of a group: on a CPU, bigger matmuls use the
        # cores better (9.6 -> 7.0 s per epoch in the full demo on 2 cores, against batches of 8 and 4); the samples
        # do not depend on the batching.
        prompts_per_epoch=cfg.prompts_per_epoch, rollout_batch_size=cfg.prompts_per_epoch * cfg.group_size,
        sde_window_size=cfg.sde_window_size, timestep_fraction=cfg.timestep_fraction, lr=cfg.grpo_lr,
        clip_range=cfg.clip_range,
        adv_clip=5.0, kl_beta=cfg.kl_beta, ema_decay=0.0,
        updates_per_epoch=cfg.updates_per_epoch, train_batch_size=cfg.group_size,
        shared_initial_noise=cfg.shared_initial_noise and cfg.objective == "grpo",
        epochs=cfg.grpo_epochs, eval_every=0, eval_steps=cfg.num_steps, eval_solver="euler",
        save_every=cfg.grpo_epochs, resume=False, compute_dtype="float32", seed=cfg.seed,
        run_dir=str(cfg.run_dir / "grpo"))


# ----------------------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------------------


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


@dataclass
class WorldData:
    """Stage 1: the world's scenes split by use, and the distortion preference pairs."""

    pair_scenes: list[Scene]
    """Scenes distorted into preference pairs; the last `held_out` of them (with all their pairs) are held out."""
    held_out: int
    train_pairs: PairTensors
    held_pairs: PairTensors
    policy_rows: list[DemoRow]
    policy_targets: list[list[torch.Tensor]]
    """Per policy row, its pretraining candidates: the clean video and imperfect draws (Note [imperfect targets])."""
    grpo_rows: list[DemoRow]
    eval_rows: list[DemoRow]


def stage_world_data(cfg: DemoConfig, rank: int) -> WorldData:
    """1. Scenes of the seeded world; preference pairs from synthetic distortions of the first ones."""
    from idgrpo.reward.distortions import SourceVideo, make_pairs
    from idgrpo.synth import World, WorldConfig

    world = World(WorldConfig(frame_size=cfg.frame_size, num_frames=cfg.num_frames, num_people=cfg.num_people,
                              population=cfg.population, seed=cfg.seed, grid=cfg.pixel_stride))
    n_pair, n_policy, n_grpo, n_eval = cfg.reward_videos, cfg.policy_videos, cfg.grpo_prompts, cfg.eval_prompts
    total = n_pair + n_policy + n_grpo + n_eval
    bar = progress(total=total + n_policy, desc="1/5 world data", rank=rank, leave=True)
    scenes = []
    for i in range(total):
        scenes.append(world.scene(i))
        bar.update(1)
    pair_scenes = scenes[:n_pair]
    policy_scenes = scenes[n_pair:n_pair + n_policy]
    grpo_scenes = scenes[n_pair + n_policy:n_pair + n_policy + n_grpo]
    eval_scenes = scenes[n_pair + n_policy + n_grpo:]
    rng = random.Random(cfg.seed)
    policy_targets = []
    for s in policy_scenes:
        # 10 candidate targets per scene: the clean video and imperfect_fraction of them independent imperfect draws.
        weight = round(cfg.imperfect_fraction * 10)
        policy_targets.append([s.frames] * (10 - weight) + [
            imperfect_version(s, rng, cfg.recolour_probability, cfg.recolour_min) for _ in range(weight)])
        bar.update(1)
    bar.close()
    sources = [SourceVideo(f"s{i:05d}", s.frames, s.references, s.prompt, s.boxes) for i, s in enumerate(pair_scenes)]
    n_held = max(2, round(0.15 * n_pair))
    train_pairs, store_train, refs_train = make_pairs(sources[:-n_held], kinds=PAIR_KINDS,
                                                      pairs_per_video=cfg.pairs_per_video, seed=cfg.seed)
    held_pairs, store_held, refs_held = make_pairs(sources[-n_held:], kinds=PAIR_KINDS,
                                                   pairs_per_video=cfg.pairs_per_video, seed=cfg.seed + 1)
    data = WorldData(
        pair_scenes=pair_scenes, held_out=n_held,
        train_pairs=pair_tensors(train_pairs, store_train, refs_train, cfg.reward_frames),
        held_pairs=pair_tensors(held_pairs, store_held, refs_held, cfg.reward_frames),
        policy_rows=[scene_row(s, cfg.pixel_stride, cfg.guide) for s in policy_scenes], policy_targets=policy_targets,
        grpo_rows=[scene_row(s, cfg.pixel_stride, cfg.guide) for s in grpo_scenes],
        eval_rows=[scene_row(s, cfg.pixel_stride, cfg.guide) for s in eval_scenes])
    _say(rank, f"demo: {len(data.train_pairs)} training / {len(data.held_pairs)} held-out preference pairs, "
               f"{n_policy} pretraining videos ({cfg.imperfect_fraction:.0%} imperfect), {n_grpo} GRPO rows, "
               f"{n_eval} held-out eval rows")
    return data


@dataclass
class Pretraining:
    """Stage 2: the pretrained policy (frozen) and its flow-matching loss per step."""

    policy: nn.Module
    losses: list[float]


def stage_pretraining(cfg: DemoConfig, data: WorldData, device, rank: int) -> Pretraining:
    """2. The tiny Wan DiT pretrained by flow matching on the world's (mostly imperfect) videos."""
    policy = build_policy(cfg, device)
    bar = progress(total=cfg.pretrain_steps, desc="2/5 policy pretraining (flow matching)", rank=rank, leave=True)
    losses = pretrain_policy(cfg, policy, data.policy_rows, data.policy_targets, bar)
    bar.close()
    return Pretraining(policy.requires_grad_(False), losses)


@dataclass
class AnnotatedPairs:
    """Stage 3, first half: pairs of the pretrained policy's samples labelled by the oracle (Note [annotated pairs]),
    of the training and the held-out pair scenes; None with `annotated_seeds` 0."""

    train: PairTensors | None
    held: PairTensors | None


def stage_annotation(cfg: DemoConfig, data: WorldData, policy, device, rank: int) -> AnnotatedPairs:
    """3a. Annotated pairs of the pretrained policy's own samples of the pair scenes."""
    if not cfg.annotated_seeds:
        return AnnotatedPairs(None, None)
    pair_rows = [scene_row(s, cfg.pixel_stride, cfg.guide) for s in data.pair_scenes]
    bar = progress(total=cfg.annotated_seeds * len(pair_rows), desc="3/5 annotated pairs (policy samples)",
                   rank=rank, leave=True)
    base = cfg.seed * 1_000_003 + 333_333
    train = annotated_pairs(cfg, policy, pair_rows[:-data.held_out], device, base, bar)
    held = annotated_pairs(cfg, policy, pair_rows[-data.held_out:], device, base + 50_000, bar)
    bar.close()
    return AnnotatedPairs(train, held)


@dataclass
class RewardStage:
    """Stage 3: the trained reward model (frozen, eval mode) and its held-out metrics (`evaluate`'s on the
    distortion pairs, and under "annotated" the accuracy on the held-out annotated pairs)."""

    model: nn.Module
    train_pairs: int
    metrics: dict
    num_frames: int

    def score(self, frames: torch.Tensor, references: list, prompts: list[str]) -> torch.Tensor:
        """The GRPO reward (`idgrpo.rl.RewardFn`): the model on `num_frames` frames of each video."""
        return self.model.score(frames, references, prompts, num_frames=self.num_frames)


def reward_fit_config(cfg: DemoConfig) -> FitConfig:
    """`idgrpo.reward.train.fit`'s settings of stage 3: BTT, mirrored pairs, 5% warm-up, one seeded stream."""
    from idgrpo.reward.train import FitConfig

    return FitConfig(epochs=cfg.reward_epochs, batch_size=cfg.reward_batch, lr=cfg.reward_lr, grad_clip=1.0,
                     warmup_fraction=0.05, loss="btt", ties_k=cfg.ties_k, flip_augment=True, seed=cfg.seed,
                     reseed_each_epoch=False)


def stage_reward_model(cfg: DemoConfig, data: WorldData, annotated: AnnotatedPairs, rank: int) -> RewardStage:
    """3b. The compact identity reward model trained with `idgrpo.reward.train.fit` on the distortion pairs and the
    annotated ones (a replicated module: every rank trains the same model, Note [replicated modules] there)."""
    from idgrpo.engine import build_optimizer
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
    from idgrpo.reward.train import evaluate, fit, format_metric

    train = data.train_pairs if annotated.train is None else concat_pairs(data.train_pairs, annotated.train)
    settings = reward_fit_config(cfg)
    torch.manual_seed(cfg.seed)
    model = IdentityRewardModel(RewardModelConfig(image_size=cfg.frame_size, patch_size=cfg.reward_patch,
                                                  dim=cfg.reward_dim, depth=cfg.reward_depth, heads=4,
                                                  max_frames=max(32, cfg.reward_frames)))
    optimizer = build_optimizer(model.parameters(), lr=cfg.reward_lr, weight_decay=0.01)
    fit(model, optimizer, train, settings, progress_desc="3/5 reward model (BTT), epoch")
    metrics = evaluate(model, data.held_pairs, settings, "cpu")
    if annotated.held is not None:
        held = evaluate(model, annotated.held, settings, "cpu")
        metrics["annotated"] = {"train_pairs": len(annotated.train), "val_pairs": len(annotated.held),
                                "val_non_tie_pairs": held["val_non_tie_pairs"],
                                "val_acc_non_tie": held["val_acc_non_tie"]}
    _say(rank, f"demo: reward model held-out accuracy {format_metric(metrics['val_acc_non_tie'])} on "
               f"{metrics['val_non_tie_pairs']} non-tie distortion pairs "
               f"(3-way with ties {format_metric(metrics['val_acc_with_ties'])})"
               + (f", {format_metric(metrics['annotated']['val_acc_non_tie'])} on "
                  f"{metrics['annotated']['val_non_tie_pairs']} non-tie annotated pairs"
                  if "annotated" in metrics else ""))
    return RewardStage(model.eval().requires_grad_(False), len(train), metrics, cfg.reward_frames)


@dataclass
class GRPOStage:
    """Stage 4: the pretrained policy evaluated on the held-out rows before GRPO, the trained policy (LoRA), and
    the trainer's epoch records."""

    before: PolicyEvaluation
    policy: nn.Module
    history: list[dict]
    """The trainer's epoch records, plus on every `curve_every`-th epoch `eval_reward` and `eval_oracle` (held-out
    learned reward and oracle), and on every epoch `train_wall_s` (seconds of training so far, curve evaluations
    excluded) and `policy_forwards` (videos through the policy's forward so far: rollouts and updates)."""


class ForwardCounter:
    """Videos through a module's forward (the batch size of every call), via a forward hook."""

    def __init__(self, module: nn.Module):
        self.videos = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.videos += int(args[0].shape[0])


def stage_grpo(cfg: DemoConfig, data: WorldData, policy, score, device, rank: int) -> GRPOStage:
    """4. GRPO (or NFT, `--objective`) on LoRA adapters of the pretrained policy with the trained reward; writes
    <run_dir>/grpo/ (metrics, checkpoint, the LoRA in PEFT format, the trainer's plot)."""
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.rl.trainer import GRPOTrainer

    before = evaluate_policy(cfg, policy, data.eval_rows, score, device)
    # Stage 4 draws from its own seed: the same adapters and run whether stages 1-3 ran now or came from the cache.
    torch.manual_seed(cfg.seed * 1_000_003 + 4)
    apply_lora(policy, cfg.lora_rank, float(cfg.lora_rank))
    mark_only_lora_trainable(policy)
    trainer = GRPOTrainer(grpo_config(cfg), policy, score=score, decode=lambda z: decode_latents(z, cfg.pixel_stride),
                          build_conditioning=conditioning_builder(cfg, device), latent_shape=latent_shape_of(cfg),
                          train_rows=data.grpo_rows, lora=True, log=lambda msg: None)
    desc = "4/5 GRPO" if cfg.objective == "grpo" else "4/5 NFT"
    bar = progress(total=cfg.grpo_epochs, desc=desc, rank=rank, leave=True)
    counter = ForwardCounter(policy)
    started, excluded = time.monotonic(), 0.0

    def advance(trainer, record):
        nonlocal excluded
        record["train_wall_s"] = time.monotonic() - started - excluded
        record["policy_forwards"] = counter.videos
        epoch = int(record["epoch"])
        if cfg.curve_every and ((epoch + 1) % cfg.curve_every == 0 or epoch + 1 == cfg.grpo_epochs):
            start, videos = time.monotonic(), counter.videos
            point = evaluate_policy(cfg, trainer.policy, data.eval_rows, score, device)
            record["eval_reward"], record["eval_oracle"] = point.reward_mean, point.oracle_mean
            counter.videos, excluded = videos, excluded + time.monotonic() - start
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        bar.update(1)

    history = trainer.train(on_epoch_end=advance)
    counter.handle.remove()
    bar.close()
    return GRPOStage(before, trainer.policy, history)


def stage_evaluation(cfg: DemoConfig, data: WorldData, grpo: GRPOStage, score, device, rank: int) -> PolicyEvaluation:
    """5. The trained policy on the held-out rows (the same noise as `GRPOStage.before`)."""
    bar = progress(total=1, desc="5/5 evaluation", rank=rank, leave=True)
    after = evaluate_policy(cfg, grpo.policy, data.eval_rows, score, device)
    bar.update(1)
    bar.close()
    return after


# ----------------------------------------------------------------------------------------------------------------------
# The stage cache (stages 2-3: the pretrained policy and the reward model)
# ----------------------------------------------------------------------------------------------------------------------

STAGE_4_SETTINGS = frozenset({
    "run_dir", "quick", "collective_timeout", "stage_cache", "curve_every", "gif_videos", "objective",
    "grpo_epochs", "prompts_per_epoch", "group_size", "sde_window_size", "sde_window_slide_every",
    "timestep_fraction", "nft_beta", "nft_old_decay", "lora_rank", "updates_per_epoch", "grpo_lr", "clip_range",
    "kl_beta", "shared_initial_noise",
})
"""DemoConfig fields that stages 1-3 never read: the cache key leaves them out. (`num_steps` stays in: stage 3
samples the pretrained policy with it.)"""


def stage_cache_dir(cfg: DemoConfig, threads: int) -> Path:
    """`<stage_cache>/<key>`: the key hashes every setting stages 1-3 read, and the threads per process (CPU floats
    depend on it)."""
    import hashlib

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in STAGE_4_SETTINGS}
    settings["threads_per_process"] = threads
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.stage_cache) / key


def save_stages(folder: Path, pretrained: Pretraining, reward: RewardStage) -> None:
    """Write stages 2-3's results into `folder` (rank 0), through a temporary folder renamed at the end, so a
    folder that exists is complete."""
    import shutil

    from idgrpo.engine.checkpoint import save_safetensors_atomic

    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_atomic({k: v.contiguous() for k, v in pretrained.policy.state_dict().items()},
                            tmp / "policy.safetensors")
    reward.model.save(tmp / "reward_model")
    (tmp / "stages.json").write_text(json.dumps({"pretrain_losses": pretrained.losses,
                                                 "reward_train_pairs": reward.train_pairs,
                                                 "reward_metrics": reward.metrics}))
    try:
        tmp.rename(folder)
    except OSError:  # another run wrote it first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def load_stages(cfg: DemoConfig, folder: Path, device) -> tuple[Pretraining, RewardStage]:
    """Stages 2-3's results from `folder` (`save_stages`); weights checked finite."""
    from safetensors.torch import load_file

    from idgrpo.models.weights import refuse_nonfinite
    from idgrpo.reward.model import IdentityRewardModel

    file = folder / "policy.safetensors"
    state = {key: refuse_nonfinite(file, key, tensor) for key, tensor in load_file(file).items()}
    policy = build_policy(cfg, device)
    policy.load_state_dict(state)
    facts = json.loads((folder / "stages.json").read_text())
    model = IdentityRewardModel.load(folder / "reward_model").eval().requires_grad_(False)
    return (Pretraining(policy.to(device).requires_grad_(False), facts["pretrain_losses"]),
            RewardStage(model, facts["reward_train_pairs"], facts["reward_metrics"], cfg.reward_frames))


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def _gif_strip(before: torch.Tensor, after: torch.Tensor, reference_row: torch.Tensor) -> torch.Tensor:
    """Side by side: references | before | after, each (T, H, W, 3), upscaled 4x for viewing."""
    refs = reference_row[None].expand(before.shape[0], -1, -1, -1)
    strip = torch.cat([refs, before, after], 2)  # (T, H, W_total, 3)
    return strip.repeat_interleave(4, 1).repeat_interleave(4, 2)


def contact_sheet(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: int = 3) -> torch.Tensor:
    """One uint8 (H, W, 3) picture of several samples: per row the references (S, P*S, 3), then every frame before
    and every frame after GRPO (each (T, S, S, 3)), separated by white gaps; upscaled `scale` times."""
    gap = 4
    lines = []
    for refs, before, after in rows:
        size = before.shape[1]
        white = torch.full((size, gap, 3), 255, dtype=torch.uint8)
        parts = [refs, white, white]
        for frames in (before, after):
            for frame in frames:
                parts += [frame, white[:, :1]]
            parts += [white, white]
        line = torch.cat(parts[:-2], 1)
        lines += [line, torch.full((gap, line.shape[1], 3), 255, dtype=torch.uint8)]
    sheet = torch.cat(lines[:-1], 0)
    return sheet.repeat_interleave(scale, 0).repeat_interleave(scale, 1).contiguous()


def demo(config: Annotated[DemoConfig, tyro.conf.arg(name="")]) -> int:
    """The whole Identity-GRPO pipeline on a tiny synthetic world (see `idgrpo.demo`): the five stages in order,
    then summary.json, the plots, the GIFs and the printed table."""
    from idgrpo.engine import init_distributed

    cfg = config
    started = time.monotonic()
    # Stages 1-2 and the annotation are minutes of replicated work without a collective: on a shared machine one rank
    # may reach the first collective (the reward model's first update) long before another, hence a longer default
    # than the engine's.
    info = init_distributed(cfg.collective_timeout, default_timeout_s=3600.0)
    rank, world_size, device = info.rank, info.world_size, info.device
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    def timed(key: str, stage, *args):
        start = time.monotonic()
        result = stage(*args)
        timings[key] = time.monotonic() - start
        return result

    data = timed("data_s", stage_world_data, cfg, rank)
    cache = stage_cache_dir(cfg, threads) if cfg.stage_cache is not None else None
    if cache is not None and (cache / "stages.json").is_file():
        pretrained, reward = timed("cache_load_s", load_stages, cfg, cache, device)
        _say(rank, f"demo: stages 2-3 (pretrained policy, reward model) read from {cache}")
    else:
        pretrained = timed("pretrain_s", stage_pretraining, cfg, data, device, rank)
        annotated = timed("annotate_s", stage_annotation, cfg, data, pretrained.policy, device, rank)
        reward = timed("reward_s", stage_reward_model, cfg, data, annotated, rank)
        if cache is not None and rank == 0:
            save_stages(cache, pretrained, reward)
    if rank == 0:
        reward.model.save(run_dir / "reward_model")
    grpo = timed("grpo_s", stage_grpo, cfg, data, pretrained.policy, reward.score, device, rank)
    after = timed("eval_s", stage_evaluation, cfg, data, grpo, reward.score, device, rank)
    timings["total_s"] = time.monotonic() - started
    summary = {
        "world": {"frame_size": cfg.frame_size, "num_frames": cfg.num_frames, "num_people": cfg.num_people,
                  "population": cfg.population, "seed": cfg.seed},
        "world_size": world_size, "threads_per_process": threads, "quick": cfg.quick,
        "reward_model": {"train_pairs": reward.train_pairs, **reward.metrics},
        "pretrain": {"steps": cfg.pretrain_steps, "first_loss": pretrained.losses[0] if pretrained.losses else None,
                     "last_loss": sum(pretrained.losses[-20:]) / max(1, len(pretrained.losses[-20:]))},
        "grpo": {"epochs": cfg.grpo_epochs, "train_reward": [h["reward_mean"] for h in grpo.history],
                 "history": grpo.history},
        "before": grpo.before.summary(),
        "after": after.summary(),
        # The learned reward is a BTT logit (any offset, either sign): its change is a difference, not a ratio.
        "reward_change": after.reward_mean - grpo.before.reward_mean,
        "oracle_change_relative": _relative_change(grpo.before.oracle_mean, after.oracle_mean),
        "timings_s": timings,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    if rank == 0:
        write_outputs(cfg, summary, data.eval_rows, grpo, after)
    return 0


def _relative_change(before: float, after: float) -> float:
    return (after - before) / abs(before) if abs(before) > 1e-12 else float("nan")


def curve_history(summary: dict) -> list[dict]:
    """The epoch records to plot: the trainer's, after a record at epoch -1 holding the held-out scores of the
    pretrained policy, where the held-out curves start."""
    before = {"epoch": -1, "eval_reward": summary["before"]["reward_mean"],
              "eval_oracle": summary["before"]["oracle_mean"]}
    return [before, *summary["grpo"]["history"]]


def write_outputs(cfg: DemoConfig, summary: dict, eval_rows: list[DemoRow], grpo: GRPOStage,
                  after: PolicyEvaluation) -> None:
    """In --run-dir: summary.json, reward_curve.png, before_after.png, the before/after GIFs; then the printed
    table."""
    from idgrpo.engine.metrics import strict_json
    from idgrpo.media import write_image, write_video
    from idgrpo.rl.plots import plot_training

    run_dir = Path(cfg.run_dir)
    (run_dir / "summary.json").write_text(strict_json(summary, indent=1))
    try:
        plot_training(curve_history(summary), run_dir / "reward_curve.png",
                      title=f"idgrpo demo: {cfg.objective.upper()} on the synthetic world (epoch -1: the pretrained "
                            f"policy)")
    except Exception as e:  # noqa: BLE001 - the run's results are written; a plot is not worth failing it
        print(f"demo: could not write reward_curve.png: {type(e).__name__}: {e}", flush=True)
    before = grpo.before
    shown = range(min(cfg.gif_videos, len(eval_rows)))
    write_image(run_dir / "before_after.png", contact_sheet(
        [(torch.cat(eval_rows[i].references, 1), before.videos[i], after.videos[i]) for i in shown]))
    for i in shown:
        refs = torch.cat(eval_rows[i].references, 1)  # (S, P*S, 3)
        write_video(run_dir / f"sample{i}_before.gif", before.videos[i], fps=4)
        write_video(run_dir / f"sample{i}_after.gif", after.videos[i], fps=4)
        write_video(run_dir / f"sample{i}_refs_before_after.gif",
                    _gif_strip(before.videos[i], after.videos[i], refs), fps=4)
    print(table(summary), flush=True)


def table(summary: dict) -> str:
    """The printed result table."""
    from idgrpo.reward.train import format_metric

    rm = summary["reward_model"]
    b, a = summary["before"], summary["after"]
    lines = [
        f"idgrpo demo ({'quick' if summary['quick'] else 'full'}, {summary['world_size']} process(es), "
        f"{summary['timings_s']['total_s'] / 60:.1f} min)",
        f"reward model held-out accuracy on non-tie pairs: distortions {format_metric(rm['val_acc_non_tie'])} "
        f"({rm['val_non_tie_pairs']} pairs)"
        + (f", policy samples {format_metric(rm['annotated']['val_acc_non_tie'])} "
           f"({rm['annotated']['val_non_tie_pairs']} pairs)" if "annotated" in rm else ""),
        "",
        f"{'held-out scenes (' + str(len(b['reward'])) + ')':<34}{'before':>10}{'after':>10}{'change':>10}",
        f"{'learned identity reward (logit)':<34}{b['reward_mean']:>10.3f}{a['reward_mean']:>10.3f}"
        f"{summary['reward_change']:>+10.3f}",
        f"{'oracle identity consistency':<34}{b['oracle_mean']:>10.3f}{a['oracle_mean']:>10.3f}"
        f"{summary['oracle_change_relative']:>+10.1%}",
    ]
    return "\n".join(lines)
