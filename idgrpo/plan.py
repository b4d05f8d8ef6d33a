"""`idgrpo plan <preset> --nproc-per-node N [--nnodes M] [--sp-size S] [flags]`: what one GPU holds and how much work
one epoch is, for a `train-grpo` preset at a layout, before anyone rents GPUs (docs/scale-out.md).

Usage:
    idgrpo plan vace-14b --nproc-per-node 8 --sp-size 8
    idgrpo plan t2v-14b --nproc-per-node 8 --nnodes 2 --sp-size 8
    idgrpo plan vace-1.3b --nproc-per-node 4 --no-activation-checkpointing     # any train-grpo flag changes the plan

It prints, per GPU: the parameters (this rank's shards, and the units gathered at once), the gradients, the optimizer
state, the EMA, the activations of training (with and without activation checkpointing) and of the rollout, what the
rollout stores for the update, the VAE and the reward model; the peak of each phase and whether it fits an 80 GB and a
141 GB GPU; the FLOPs of one epoch by phase; and the torchrun command that launches the run.

The model (docs/scale-out.md#the-planners-model) mirrors the engine: FSDP's units and padding, the trainer's choices
(replicated LoRA, local or sharded gradient accumulation), AdamW's two moments, and per Wan block the tensors
autograd saves on the Triton path. tests/test_plan.py checks parameters, gradients, optimizer state and EMA to the
byte against the FSDP-wrapped tiny model, and the activations against what autograd saves on a tiny DiT forward.
The FLOPs are counted by running the real model on the meta device under torch's FLOP counter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import tyro
from torch import nn

from idgrpo.errors import UsageError, above, at_least, flag
from idgrpo.rl.config import PRESETS, RecipeConfig

GIB = 2**30
CAPACITIES_GB = (80, 141)
"""The GPUs the plan is checked against: H100/A100 80 GB and H200 141 GB (decimal gigabytes, as sold)."""
HEADROOM = 0.92
"""Fraction of a GPU's memory the plan lets the peak use: the CUDA context, NCCL's buffers and the caching
allocator's fragmentation take the rest (a rule of thumb, not measured here)."""
LORA_REPLICATE_BELOW = 1 << 24
"""`GRPOTrainer` keeps a unit's LoRA adapters replicated (all-reduced gradients) below this many elements."""
VAE_DECODE_FULLRES_MAPS = 8
"""Estimate (not measured): the Wan VAE decodes one latent frame (4 video frames) at a time; its peak is about this
many full-resolution feature maps of `base_dim` channels over those 4 frames."""
REWARD_ACTIVATION_GB = 2.0
"""Estimate (not measured) of a reward model's activations while it scores one batch."""


# ----------------------------------------------------------------------------------------------------------------------
# The layout and the policy's shape
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """world = nnodes x nproc_per_node = dp x sp."""

    nproc_per_node: int
    nnodes: int
    sp_size: int

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def dp(self) -> int:
        return self.world // self.sp_size


def wan_config(recipe: RecipeConfig):
    """The `WanConfig` of the recipe's policy (`--model` names a Wan preset); the toy policy has none."""
    from idgrpo.models.wan_dit import WanConfig

    if recipe.model == "toy":
        raise UsageError("the planner models the Wan DiT: pass --model tiny (or a Wan preset), not the toy policy")
    return WanConfig.from_name(recipe.model)


def meta_policy(recipe: RecipeConfig, config=None) -> nn.Module:
    """The recipe's policy on the meta device, with its LoRA adapters and trainable flags as `train-grpo` sets them."""
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(config or wan_config(recipe))
        if recipe.lora_rank > 0:
            apply_lora(model, recipe.lora_rank, recipe.lora_alpha)
            mark_only_lora_trainable(model)
    return model


@dataclass(frozen=True)
class FlatShape:
    """One FSDP flat group as `idgrpo.engine.FSDP` builds it (`FlatGroup`): its unit, kind and sizes in elements."""

    key: str
    trainable: bool
    numel: int
    replicated: bool
    padded: int
    shard: int


def fsdp_groups(model: nn.Module, world: int, replicate_below: int) -> list[FlatShape]:
    """The flat groups `FSDP(model)` makes on a world of `world` ranks: one unit per entry of the model's top-level
    ModuleLists plus the root unit, each split into its trainable and frozen parameters, padded to a multiple of the
    world (replicated trainable groups below `replicate_below` elements are kept whole)."""
    units = [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]
    names = {id(m): n for n, m in model.named_modules()}
    owner: dict[int, str] = {}
    for unit in units:
        for p in unit.parameters():
            owner.setdefault(id(p), names[id(unit)])
    members: dict[str, list[nn.Parameter]] = {"": []}
    for unit in units:
        members[names[id(unit)]] = []
    for _, p in model.named_parameters():
        members[owner.get(id(p), "")].append(p)
    groups = []
    for unit, params in members.items():
        for trainable in (True, False):
            numel = sum(p.numel() for p in params if p.requires_grad == trainable)
            if not any(p.requires_grad == trainable for p in params):
                continue
            replicated = trainable and numel < replicate_below
            parts = 1 if replicated else world
            padded = math.ceil(max(numel, 1) / parts) * parts
            groups.append(FlatShape(f"{unit or '<root>'}/{'trainable' if trainable else 'frozen'}", trainable,
                                    numel, replicated, padded, padded // parts))
    return groups


# ----------------------------------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state, EMA: exact (tests/test_plan.py)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateBytes:
    """Bytes one rank holds for the policy's weights and training state (`GRPOTrainer` on `world` ranks)."""

    params_sharded: int
    """Trainable fp32 master shards (whole when replicated) + frozen shards in the compute dtype."""
    params_gathered: int
    """Compute-dtype buffers of the units gathered at once: the root unit (held through the whole forward) and two
    blocks (the one running and the one prefetched)."""
    grads: int
    """fp32 gradient buffers: the shard (sharded accumulation) or the whole padded group (local accumulation under
    `no_sync`, the trainer's choice for replicated LoRA and for one rank)."""
    grads_transient: int
    """One unit's unsharded gradient during its backward: compute dtype, plus its fp32 copy for the reduction."""
    optimizer: int
    """AdamW: two fp32 moments per master element and a 4-byte step count per master tensor."""
    ema: int
    """The EMA's fp32 shadow of the trainable masters."""
    reference: int
    """The KL reference's frozen shards (`reference="copy"`, full fine-tuning); 0 for LoRA (adapters switched off)."""


def state_bytes(recipe: RecipeConfig, world: int, *, compute_bytes: int = 2, model: nn.Module | None = None
                ) -> StateBytes:
    """`StateBytes` of the recipe's policy on `world` ranks, `compute_bytes` per gathered/frozen element (bf16 on GPU;
    4 on CPU, where compute is fp32)."""
    model = model if model is not None else meta_policy(recipe)
    lora = recipe.lora_rank > 0
    groups = fsdp_groups(model, world, LORA_REPLICATE_BELOW if lora else 0)
    trainable = [g for g in groups if g.trainable]
    mode = recipe.grpo.grad_accumulation
    if mode == "auto":
        mode = "sharded" if any(not g.replicated for g in trainable) and world > 1 else "local"
    units: dict[str, int] = {}  # gathered bytes per unit
    unit_numel: dict[str, int] = {}
    for g in groups:
        unit = g.key.rsplit("/", 1)[0]
        units[unit] = units.get(unit, 0) + g.padded * compute_bytes
        unit_numel[unit] = unit_numel.get(unit, 0) + g.numel
    root = units.pop("<root>", 0)
    blocks = sorted(units.values(), reverse=True)
    reference = 0
    if recipe.grpo.kl_beta > 0 and recipe.grpo.reference == "copy":  # a frozen copy: one frozen group per unit
        reference = sum(math.ceil(max(n, 1) / world) for n in unit_numel.values()) * compute_bytes
    largest_trainable = max((g.padded for g in trainable), default=0)
    return StateBytes(
        params_sharded=sum(g.shard * (4 if g.trainable else compute_bytes) for g in groups),
        params_gathered=root + sum(blocks[:2]),
        grads=sum((g.padded if mode == "local" else g.shard) * 4 for g in trainable),
        grads_transient=largest_trainable * (compute_bytes + 4),
        optimizer=sum(g.shard * 8 + 4 for g in trainable),
        ema=sum(g.shard * 4 for g in trainable) if recipe.grpo.ema_decay > 0 else 0,
        reference=reference,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Activations: what autograd saves on the Triton path (tests/test_plan.py measures it)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    """The token counts of one forward on one rank."""

    full: int
    """Tokens of one sample (latent grid / patch), before sequence parallelism."""
    local: int
    """Tokens this rank holds: full padded to a multiple of sp, divided by sp."""
    text: int
    """Text rows every cross-attention attends to (`text_len`)."""


def tokens(config, latent_shape: tuple[int, int, int, int], sp_size: int) -> Tokens:
    _, frames, height, width = latent_shape
    pt, ph, pw = config.patch_size
    full = (frames // pt) * (height // ph) * (width // pw)
    return Tokens(full, math.ceil(full / sp_size), config.text_len)


def saved_activation_bytes(config, toks: Tokens, *, batch: int, compute_bytes: int, lora_rank: int,
                           full_finetune: bool, sp_size: int, checkpointing: bool, latent_shape: tuple[int, ...],
                           vace: bool) -> dict[str, int]:
    """Bytes autograd keeps after one policy forward of `batch` samples (guidance branches included) on one rank, by
    part (docs/scale-out.md#activations). `full_finetune`: every weight is trainable (else only the LoRA adapters
    are, and nothing before the first adapter is recorded). With `checkpointing`, each unit keeps only its inputs."""
    C, F, H, D = config.dim, config.ffn_dim, config.num_heads, config.head_dim
    L, T, b, r = toks.local, toks.text, compute_bytes, lora_rank
    full, sp = full_finetune, sp_size > 1
    stats = 8  # a norm's fp32 mean and rstd per row

    def block(first: bool, last: bool, vace_block: bool) -> int:
        """One block's saves per sample without checkpointing. `first`: under LoRA its input has no graph, so the
        first norm saves nothing."""
        ungraphed = first and not full
        per_token = (2 if ungraphed else 3) * (4 * C + stats)  # fp32 inputs of the adaLN / LayerNorms, with stats
        per_token += 3 * stats + 2 * 4 * H  # rms of q, k (self) and q (cross); both attentions' log-sum-exp
        # Compute-dtype C-wide tensors: the adaLN output h; q and k before their norm; q, k, v and the output of the
        # attention kernel; the output projection (the gated residual's y); h2; the cross q before and after its
        # norm; the cross output; the FFN output. Full fine-tuning adds the FFN's input, sequence parallelism the
        # attention output back in sequence layout.
        per_token += (13 + int(full) + int(sp)) * b * C
        per_token += (1 + int(full)) * b * F  # GELU's input (+ its output, the last Linear's input)
        per_token += 6 * b * r  # LoRA A outputs of q, k, v, out (self) and q, out (cross)
        per_text_row = 3 * b * C + stats + 2 * b * r  # cross k before and after its norm, v; LoRA of k and v
        rows = (3 if ungraphed else 4) * 4 * C  # per-sample modulation rows copied by the norm and residual kernels
        projections = 0
        if vace_block and full:  # proj_in's input (first block); proj_out's, a separate copy unless compute is fp32
            projections = (int(first) + int(b != 4 or last)) * b * C * L
        return per_token * L + per_text_row * T + rows + projections

    n_main = config.num_layers
    n_vace = len(config.vace_layers) if vace else 0
    rope_rows = L * sp_size  # the rotary tables (a padded copy under sequence parallelism)
    parts = {"shared": batch * T * C * b + 2 * rope_rows * (D // 2) * 4}  # embedded text; cos and sin
    head = 4 * C * L + stats * L + 4 * C + (4 * C * L if full else 0)  # its adaLN input (+ the projection's input)
    root = head
    if full:
        root += b * math.prod(latent_shape) + (b * 96 * math.prod(latent_shape[1:]) if vace else 0)  # patch convs
        root += T * (config.text_dim + 2 * C) * b + (config.freq_dim + 4 * C) * 4  # text and time embedders
    parts["root"] = batch * root
    if checkpointing:
        # Each unit keeps its inputs for the recomputation: x (main) or c (VACE) per unit, and the shared e0 (the
        # VACE units' x0 is the first main unit's x). Under sequence parallelism the first units' inputs are views of
        # the whole padded sequence, which they keep alive.
        firsts = (1 + int(n_vace > 0)) * 4 * C * L * (sp_size - 1)
        parts["unit inputs"] = batch * ((n_main + n_vace) * 4 * C * L + firsts + 6 * 4 * C)
    else:
        parts["blocks"] = batch * (sum(block(i == 0, i == n_main - 1, False) for i in range(n_main))
                                   + sum(block(j == 0, j == n_vace - 1, True) for j in range(n_vace)))
    return parts


def rollout_activation_bytes(config, toks: Tokens, *, batch: int, compute_bytes: int, sp_size: int,
                             vace: bool) -> int:
    """Estimate (not measured) of the peak of one no-grad policy forward of `batch` samples on one rank: the fp32
    residual stream in and out, the larger of self-attention's tensors (h, q, k, v, output; three more for the
    all-to-alls under sequence parallelism) and the FFN's (h and its hidden layer twice), the text's keys and values,
    and under VACE the hints kept for the main blocks and the context stream."""
    C, F, L, T, b = config.dim, config.ffn_dim, toks.local, toks.text, compute_bytes
    attention = (5 + 3 * int(sp_size > 1)) * b * C
    ffn = (C + 2 * F) * b
    per_sample = (8 * C + max(attention, ffn)) * L + 3 * b * C * T
    if vace:
        per_sample += len(config.vace_layers) * b * C * L + 4 * C * L
    return batch * per_sample + 2 * L * sp_size * (config.head_dim // 2) * 4


def branches(recipe: RecipeConfig, config) -> int:
    """Policy forwards per guided velocity: 1 without guidance, 2 for CFG, 3 for Phantom's (2 when its image and text
    scales are equal)."""
    if config.reference_mode == "phantom":
        return 2 if recipe.guidance_image == recipe.guidance else 3
    return 1 if recipe.guidance == 1.0 else 2


def latent_shape(recipe: RecipeConfig, config, references: int) -> tuple[int, int, int, int]:
    """(C, F, H, W) of one sample's latent, reference slots included (VACE prepends, Phantom appends one per image)."""
    frames = (recipe.num_frames - 1) // 4 + 1 + (references if config.reference_mode != "none" else 0)
    return config.in_dim, frames, recipe.height // 8, recipe.width // 8


def dit_forward_flops(config, shape: tuple[int, int, int, int]) -> int:
    """FLOPs of one policy forward of one sample, counted by torch's FLOP counter on the meta device (the attention
    is counted as its two matmuls, which is what the fused kernel computes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from idgrpo.models.wan_dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(config)
        latents = torch.empty(1, *shape)
        text = torch.empty(1, config.text_len, config.text_dim)
        kwargs = {"vace_context": torch.empty(1, config.vace_in_dim, *shape[1:])} if config.vace_layers else {}
        timestep = torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(latents, timestep, text, **kwargs)
    return counter.get_total_flops()


def vae_decode_flops(latent_frames: int, height: int, width: int) -> int:
    """FLOPs of the Wan VAE decoding one sample's video latents (meta device, FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from idgrpo.models.wan_vae import WanVAE, WanVAEConfig

    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig.from_name("wan2.1"))
        z = torch.empty(1, 16, latent_frames, height, width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(z)
    return counter.get_total_flops()


def vae_size(recipe: RecipeConfig):
    """(config, parameters) of the Wan VAE a real model's run loads; no VAE for the tiny DiT (its decode is a toy)."""
    from idgrpo.models.wan_vae import WanVAE, WanVAEConfig

    config = WanVAEConfig.from_name("wan2.1")
    if recipe.model == "tiny":
        return config, 0
    with torch.device("meta"):
        return config, sum(p.numel() for p in WanVAE(config).parameters())


def reward_model(recipe: RecipeConfig) -> tuple[str, int, int]:
    """(name, parameters, bytes per parameter) of the reward the recipe names, when it is one of idgrpo's factories
    (the VLM: Qwen2.5-VL-3B in bf16; the compact model: its `base` preset in fp32); parameters 0 when unknown."""
    spec = recipe.reward
    if spec.endswith("factories:vlm"):
        from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig

        with torch.device("meta"):
            model = Qwen2_5_VL(Qwen2_5_VLConfig.from_name("3b"))
        return "Qwen2.5-VL-3B identity reward", sum(p.numel() for p in model.parameters()), 2
    if spec.endswith("factories:compact"):
        from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

        with torch.device("meta"):
            model = IdentityRewardModel(RewardModelConfig.from_name("base"))
        return "compact identity reward (base)", sum(p.numel() for p in model.parameters()), 4
    return spec or "(none given)", 0, 0


@dataclass
class Plan:
    """Everything `idgrpo plan` prints, in bytes and FLOPs per epoch (see `make_plan`)."""

    preset: str
    recipe: RecipeConfig
    layout: Layout
    state: StateBytes
    samples_per_rank: int
    tokens: Tokens
    activations_train: dict[str, int]
    """Saved by one training micro-batch's forward, without and with activation checkpointing (`saved_*`), and
    the extra while one checkpointed block is recomputed in backward (`recompute`)."""
    activations_rollout: int
    rollout_storage: int
    vae: tuple[int, int]
    """(weights, decode peak)."""
    reward: tuple[str, int]
    """(name, weights + activations)."""
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def phases(self) -> dict[str, int]:
        """Peak bytes of the rollout phase and of the update phase."""
        s = self.state
        resident = (s.params_sharded + s.params_gathered + s.optimizer + s.ema + s.reference + self.vae[0]
                    + self.reward[1])
        act = self.activations_train
        train = act["saved_checkpointed"] + act["recompute"] if self.recipe.grpo.activation_checkpointing \
            else act["saved"]
        return {"rollout": resident + self.activations_rollout + self.rollout_storage + self.vae[1],
                "update": resident + s.grads + s.grads_transient + train + self.rollout_storage}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def fits(self, capacity_gb: float) -> bool:
        return self.peak <= HEADROOM * capacity_gb * 1e9


def make_plan(preset: str, recipe: RecipeConfig, layout: Layout, *, references: int = 2,
              reward_gb: float | None = None, reward_tokens: int = 2048, flops: bool = True) -> Plan:
    """The plan of `recipe` (preset `preset`, overrides applied) on `layout`; `flops=False` skips the FLOP count
    (seconds for a 14B model)."""
    config = wan_config(recipe)
    grpo = recipe.grpo
    if layout.sp_size < 1 or layout.world % layout.sp_size:
        raise UsageError(f"--sp-size {layout.sp_size} must divide the world size {layout.world} "
                         f"(--nnodes {layout.nnodes} x --nproc-per-node {layout.nproc_per_node})")
    if config.num_heads % layout.sp_size:
        raise UsageError(f"--sp-size {layout.sp_size} must divide the {config.num_heads} attention heads of "
                         f"{recipe.model}")
    samples = grpo.prompts_per_epoch * grpo.group_size
    if samples % layout.dp:
        raise UsageError(f"--prompts-per-epoch x --group-size = {samples} samples must divide over the {layout.dp} "
                         f"data-parallel groups")
    refs = references if config.reference_mode != "none" else 0
    shape = latent_shape(recipe, config, refs)
    toks = tokens(config, shape, layout.sp_size)
    model = meta_policy(recipe, config)
    state = state_bytes(recipe, layout.world, model=model)
    b = 2 if grpo.compute_dtype == "bfloat16" else 4
    nft = grpo.objective == "nft"
    n_branch = 1 if nft else branches(recipe, config)  # NFT rolls out and trains CFG-free
    common = dict(compute_bytes=b, lora_rank=recipe.lora_rank, full_finetune=recipe.lora_rank == 0,
                  sp_size=layout.sp_size, latent_shape=shape, vace=bool(config.vace_layers))
    train_batch = grpo.train_batch_size * n_branch
    saved = sum(saved_activation_bytes(config, toks, batch=train_batch, checkpointing=False, **common).values())
    kept = sum(saved_activation_bytes(config, toks, batch=train_batch, checkpointing=True, **common).values())
    one, two = (saved_activation_bytes(dataclasses.replace(config, num_layers=n, vace_layers=(), reference_mode="none"),
                                       toks, batch=train_batch, checkpointing=False,
                                       **{**common, "vace": False})["blocks"] for n in (1, 2))
    per_block = two - one  # a block past the first, whose input has a graph
    latent_bytes = math.prod(shape) * 4
    # GRPO: x, x_next, the guided velocity, the SDE means, their grads; NFT: x0, noise, x_t, v_old, v_ref, v_new, grad
    loss = (7 if nft else 6) * latent_bytes * grpo.train_batch_size
    activations = {"saved": saved + loss, "saved_checkpointed": kept + loss,
                   "recompute": per_block + 2 * 4 * config.dim * toks.local * train_batch}
    n_local = samples // layout.dp
    trained = int(grpo.num_steps * grpo.timestep_fraction) if grpo.sde_window_size <= 0 else min(
        grpo.sde_window_size, int(grpo.num_steps * grpo.timestep_fraction))
    if nft:  # the clean latent alone; trained at `nft_levels` noise levels
        trained = grpo.nft_levels
        per_sample = latent_bytes
    else:
        per_sample = (trained + 1 + (trained if grpo.kl_beta > 0 else 0)) * latent_bytes + trained * 4
    per_sample += n_branch * config.text_len * config.text_dim * b  # the prompt embeddings of every branch
    if config.vace_layers:
        per_sample += config.vace_in_dim * math.prod(shape[1:]) * 4  # the VACE context (fp32)
    vae_bytes = 4 if recipe.vae_dtype == "float32" else 2
    vae_config, vae_params = vae_size(recipe)
    name, params, per_param = reward_model(recipe)
    reward_bytes = params * per_param + (int(REWARD_ACTIVATION_GB * 1e9) if params else 0)
    if reward_gb is not None:
        name, reward_bytes = f"{name} (--reward-gb)", int(reward_gb * 1e9)
    plan = Plan(
        preset=preset, recipe=recipe, layout=layout, state=state, samples_per_rank=n_local, tokens=toks,
        activations_train=activations,
        activations_rollout=rollout_activation_bytes(config, toks, batch=grpo.rollout_batch_size * n_branch,
                                                     compute_bytes=b, sp_size=layout.sp_size,
                                                     vace=bool(config.vace_layers)),
        rollout_storage=n_local * per_sample,
        vae=(vae_params * vae_bytes, VAE_DECODE_FULLRES_MAPS * vae_config.base_dim * recipe.height * recipe.width * 4
             * vae_bytes if vae_params else 0),
        reward=(name, reward_bytes),
    )
    if flops:
        forward = dit_forward_flops(config, shape)
        video_frames = (recipe.num_frames - 1) // 4 + 1
        plan.flops = {
            "rollout: policy": grpo.num_steps * n_branch * forward * samples,
            "rollout: KL reference": (trained * n_branch * forward * samples) if grpo.kl_beta > 0 and not nft else 0,
            "VAE decode": vae_decode_flops(video_frames, shape[2], shape[3]) * samples if vae_params else 0,
            "reward (2 x parameters x tokens, estimate)": 2 * params * reward_tokens * samples,
            "update: forward + backward": (grpo.inner_epochs * samples * trained * n_branch * forward
                                           * (4 if grpo.activation_checkpointing else 3)),
        }
        if nft:  # per level: the old policy's and (with a KL term) the reference's forwards, no gradient
            plan.flops["update: old policy + reference forwards"] = (
                grpo.inner_epochs * samples * trained * forward * (2 if grpo.kl_beta > 0 else 1))
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# The report and the command
# ----------------------------------------------------------------------------------------------------------------------


def launch_command(plan: Plan) -> str:
    """The torchrun command of the planned run: the preset, every setting that differs from it, and placeholders for
    the inputs a real model needs."""
    preset, recipe, layout = PRESETS[plan.preset], plan.recipe, plan.layout
    args = ["train-grpo", plan.preset]
    for part, default in ((recipe, preset), (recipe.grpo, preset.grpo)):
        for f in dataclasses.fields(part):
            value, before = getattr(part, f.name), getattr(default, f.name)
            if f.name in ("grpo", "overwrite") or value == before:
                continue
            if isinstance(value, bool):
                args.append(flag(f.name) if value else flag("no_" + f.name))
            elif isinstance(value, dict):
                args += [flag(f.name)] + [f"{k}={v}" for k, v in value.items()]
            elif isinstance(value, tuple):
                args += [flag(f.name), *map(str, value)]
            else:
                args += [flag(f.name), str(value)]
    if recipe.model != "tiny":
        for name, placeholder in (("weights_dir", "DIT_DIR"), ("vae_path", "Wan2.1_VAE.pth"),
                                  ("prompt_cache", "PROMPT_CACHE"), ("train_csv", "train.csv")):
            if getattr(recipe, name) is None:
                args += [flag(name), placeholder]
        if not recipe.reward:
            args += ["--reward", "MODULE:FACTORY"]
    launcher = f"torchrun --nproc-per-node {layout.nproc_per_node}"
    if layout.nnodes > 1:
        launcher = (f"torchrun --nnodes {layout.nnodes} --node-rank $NODE_RANK --master-addr $MASTER_ADDR "
                    f"--master-port 29500 --nproc-per-node {layout.nproc_per_node}")
    return f"{launcher} -m idgrpo " + " ".join(args)


def report(plan: Plan, sustained_tflops: float = 400.0) -> str:
    """The plan as the text `idgrpo plan` prints; the epoch's hours assume `sustained_tflops` per GPU."""
    s, lay, recipe, grpo = plan.state, plan.layout, plan.recipe, plan.recipe.grpo
    act = plan.activations_train

    def gb(n: float) -> str:
        return f"{n / 1e9:9.2f}"

    ckpt = grpo.activation_checkpointing
    rows = [
        ("parameters, sharded (fp32 trainable, frozen in the compute dtype)", s.params_sharded),
        ("parameters, gathered units (root + 2 blocks)", s.params_gathered),
        ("KL reference copy, sharded", s.reference),
        ("gradients (fp32 buffers)", s.grads),
        ("gradients, one unit during its backward", s.grads_transient),
        ("optimizer state (AdamW, fp32)", s.optimizer),
        ("EMA (fp32)", s.ema),
        (f"activations, training, no checkpointing{'' if ckpt else '   <- used'}", act["saved"]),
        (f"activations, training, checkpointing (+1 block recomputed){'   <- used' if ckpt else ''}",
         act["saved_checkpointed"] + act["recompute"]),
        ("activations, rollout (one forward, estimate)", plan.activations_rollout),
        (f"rollout storage ({plan.samples_per_rank} samples: states, KL means, conditioning)", plan.rollout_storage),
        ("VAE weights", plan.vae[0]),
        ("VAE decode (estimate)", plan.vae[1]),
        (f"reward: {plan.reward[0]}", plan.reward[1]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    tuning = f"LoRA r={recipe.lora_rank}" if recipe.lora_rank else "full fine-tuning"
    video = f"{recipe.height}x{recipe.width}x{recipe.num_frames}"
    lines = [f"idgrpo plan {plan.preset}: {recipe.model}, {tuning}, {video}, {grpo.compute_dtype}",
             f"layout: {lay.nnodes} node(s) x {lay.nproc_per_node} GPUs = {lay.world} = dp {lay.dp} x sp "
             f"{lay.sp_size}; {plan.tokens.full} tokens per sample, {plan.tokens.local} per rank; "
             f"{grpo.prompts_per_epoch * grpo.group_size} samples per epoch, {plan.samples_per_rank} per rank",
             "", f"{'per GPU':<{width}}{'GB':>9}"]
    lines += [f"{name:<{width}}{gb(value)}" for name, value in rows]
    lines += [f"{'peak, ' + phase:<{width}}{gb(value)}" for phase, value in plan.phases.items()]
    verdicts = ", ".join(f"{'fits' if plan.fits(c) else 'does NOT fit'} {c} GB" for c in CAPACITIES_GB)
    lines += [f"{'peak':<{width}}{gb(plan.peak)}   {verdicts} (at {HEADROOM:.0%} of the GPU)"]
    if plan.flops:
        total = sum(plan.flops.values())
        lines += ["", f"{'one epoch':<{width}}{'PFLOP':>9}{'per GPU':>10}"]
        lines += [f"{name:<{width}}{v / 1e15:9.1f}{v / lay.world / 1e15:10.1f}" for name, v in plan.flops.items()]
        lines += [f"{'total':<{width}}{total / 1e15:9.1f}{total / lay.world / 1e15:10.1f}"]
        hours = total / lay.world / (sustained_tflops * 1e12) / 3600
        lines += [f"{'hours per epoch at ' + f'{sustained_tflops:g}' + ' TFLOP/s per GPU (assumed)':<{width}}"
                  f"{hours:9.2f}"]
    lines += ["", "launch:", "  " + launch_command(plan)]
    return "\n".join(lines)


@dataclass
class PlanArgs:
    """A `train-grpo` preset with its flags, and the layout to plan it on."""

    recipe: Annotated[RecipeConfig, tyro.conf.arg(name="")]
    """The run (every `train-grpo` flag)."""
    nproc_per_node: int = 1
    """GPUs per node (torchrun's --nproc-per-node)."""
    nnodes: int = 1
    """Nodes (torchrun's --nnodes)."""
    references: int = 2
    """Reference images per prompt row (VACE and Phantom: one latent frame each)."""
    reward_gb: float | None = None
    """Memory of the reward model in GB, for a reward the planner does not know (default: idgrpo's identity rewards
    are counted, any other reward as 0)."""
    reward_tokens: int = 2048
    """Tokens the reward model reads per video, for its FLOPs (an estimate: frames and references)."""
    flops: bool = True
    """Count the FLOPs of one epoch (runs the model on the meta device: seconds for a 14B model)."""
    sustained_tflops: float = 400.0
    """Sustained bf16 TFLOP/s per GPU assumed for the epoch's hours (H100 SXM peaks at 989 dense)."""
    preset: tyro.conf.Suppress[str] = ""

    def __post_init__(self):
        at_least(self, 1, "nproc_per_node", "nnodes", "reward_tokens")
        at_least(self, 0, "references")
        above(self, 0.0, "sustained_tflops")
        if self.reward_gb is not None:
            at_least(self, 0.0, "reward_gb")


PlanPreset = tyro.extras.subcommand_type_from_defaults(
    {name: PlanArgs(recipe=dataclasses.replace(recipe), preset=name) for name, recipe in PRESETS.items()},
    prefix_names=False,
)


def plan(args: Annotated[PlanPreset, tyro.conf.arg(name="")]) -> int:
    """Per-GPU memory and FLOPs of a train-grpo preset on a layout, and its torchrun command (see `idgrpo.plan`)."""
    layout = Layout(args.nproc_per_node, args.nnodes, args.recipe.grpo.sp_size)
    plan = make_plan(args.preset, args.recipe, layout, references=args.references, reward_gb=args.reward_gb,
                     reward_tokens=args.reward_tokens, flops=args.flops)
    print(report(plan, args.sustained_tflops))
    return 0
