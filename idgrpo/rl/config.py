"""Configuration of `idgrpo train-grpo`, with the named presets `tiny` (CPU demo), `vace-1.3b` (the Identity-GRPO
reference recipe) and `phantom-1.3b`; docs/recipe.md maps the official script's settings onto these fields.

    GRPOConfig.from_name("vace-1.3b")                                  # in Python
    idgrpo train-grpo vace-1.3b --train-csv data/train.csv ...         # on the command line (one preset per subcommand)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from idgrpo.rl.sampler import NOISE_SCHEDULES
from idgrpo.rl.schedules import GRIDS

MODELS = ("toy", "tiny", "vace-1.3b", "phantom-1.3b")
EMA_SCHEDULES = ("interval", "identity_grpo")
DTYPES = ("bfloat16", "float32")


@dataclass
class BaselineFlags:
    """Switches that make the trainer do what the straightforward implementation of the recipe does, for the
    end-to-end benchmark's baseline (`bench/e2e.py`). Every flag computes the same function as the default path
    (up to float rounding); it only changes how. All off = the engine's default (fast) path."""

    sdpa_attention: bool = False
    """Policy attention through torch SDPA (`WanDiT.set_attention_impl("sdpa")`) instead of idgrpo's kernel."""
    eager_kernels: bool = False
    """Every idgrpo kernel op (norms, RoPE, GRPO step/loss, group advantage, attention not routed to SDPA) runs its
    unfused eager PyTorch reference (`IDGRPO_KERNELS=reference` for the duration of the epoch)."""
    separate_cfg_forwards: bool = False
    """One policy forward per guidance branch (cond, then uncond) in rollout and training, instead of one forward
    over the branches batched together."""
    kl_reference_at_train_time: bool = False
    """The KL anchor (the SDE mean under the reference policy) is recomputed by a reference forward during the
    update, instead of being stored by the rollout."""
    reward_via_files: bool = False
    """Each decoded sample is written to an mp4 file and read back before scoring (lossless RGB H.264, so the
    frames, hence the rewards, are unchanged)."""
    synchronous_reward: bool = False
    """Decode + score inline after each rollout batch (no worker thread, no overlap with sampling)."""

    @classmethod
    def all_on(cls) -> BaselineFlags:
        """Every baseline switch on: the straightforward implementation."""
        return cls(**{f.name: True for f in dataclasses.fields(cls)})

    @property
    def active(self) -> bool:
        """Whether any baseline switch is on."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"baseline.{f.name} must be a bool, got {getattr(self, f.name)!r}")


@dataclass
class GRPOConfig:
    """Identity-GRPO training: sampling, grouping, optimisation, evaluation and run bookkeeping."""

    # --- model and data ---------------------------------------------------------------------------------------------
    model: str = "toy"
    """Policy: "toy" (a tiny analytic flow model, CPU seconds), "tiny" (the tiny Wan DiT + LoRA),
    "vace-1.3b" / "phantom-1.3b" (weights from `weights_dir`)."""
    weights_dir: str | None = None
    """Directory of the DiT checkpoint (original Wan or diffusers key names); required for the 1.3B models."""
    vae_path: str | None = None
    """Wan VAE weights (`Wan2.1_VAE.pth` or safetensors); decodes rollouts for the reward, encodes references."""
    vae_dtype: str = "float32"
    """Dtype of the Wan VAE on GPU ("float32", as the Identity-GRPO script keeps it, or "bfloat16": faster, a
    little less exact); it encodes the references and decodes every rollout. CPU always float32."""
    init_lora: str | None = None
    """PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, e.g. the published Identity-GRPO LoRA
    or this trainer's `lora/` export) to start training from, as the official `train.lora_path`; its rank, alpha
    and target modules replace `lora_rank` / `lora_alpha`. A checkpoint in `run_dir` (resume) takes precedence."""
    prompt_cache: str | None = None
    """Text-embedding cache written by `idgrpo encode-prompts` (umT5 outputs, padded to 512); its negative prompt
    (Wan's default Chinese one unless changed at encoding time) is the unconditional branch."""
    train_csv: str | None = None
    """Training rows in the reference format: columns `ref_paths,prompt`, reference paths separated by `;`."""
    test_csv: str | None = None
    """Evaluation rows, same format; evaluated every `eval_every` epochs with fixed noise and the ODE sampler."""
    reward: str = "idgrpo.rl.toy:brightness_reward"
    """Reward factory "module:function", called as factory(config, device) -> score(frames, references, prompts).
    Resolved at run time, so the trainer never imports a reward implementation (DESIGN.md layering). Required
    (no default) for the 1.3B presets: pass the identity reward model's factory,
    `idgrpo.reward.factories:compact` (with `--extra reward_checkpoint DIR`) or `idgrpo.reward.factories:vlm`
    (with `--extra reward_base DIR reward_checkpoint DIR [reward_template FILE]`; docs/recipe.md)."""
    run_dir: str = "runs/grpo"
    """Metrics (JSON lines), checkpoints, LoRA (PEFT) + EMA exports, reward curve PNG and sample videos."""

    # --- video and sampler ------------------------------------------------------------------------------------------
    height: int = 240
    """Video height in pixels (multiple of 16)."""
    width: int = 416
    """Video width in pixels (multiple of 16)."""
    num_frames: int = 33
    """Frames per video, 4k+1."""
    num_steps: int = 25
    """Sampling steps of a training rollout."""
    shift: float = 3.0
    """Flow shift of the σ grid (the diffusers Wan2.1 / VACE scheduler ships 3.0)."""
    grid: str = "diffusers"
    """σ grid: "diffusers" (Identity-GRPO), "wan" (original Wan / Phantom) or "wan_dpm"."""
    guidance: float = 4.5
    """Classifier-free guidance scale of rollouts and training (1.0 = CFG-free: one forward per step)."""
    guidance_image: float = 5.0
    """Phantom only: the image guidance scale of its three-pass CFG (`guidance` is the text scale)."""
    diffusers_ref_order: bool = True
    """VACE: order the reference latents as diffusers' pipeline does (reversed list order, which the Identity-GRPO
    recipe ran on) rather than the Wan/VACE original's list order (docs/models.md, "VACE context")."""
    diffusers_ref_resize: bool = True
    """VACE: first resize each reference image to its size rounded down to multiples of 8 with Lanczos (PIL's
    filter, reproduced exactly), as diffusers' WanVACEPipeline does before fitting it into the video frame, which
    the Identity-GRPO recipe ran on. Off: the image is fitted directly (the Wan/VACE original)."""
    noise_schedule: str = "identity_grpo"
    """SDE noise level s_t: "identity_grpo" (sigmas[1]·σ) or "flow_grpo" (noise_level·√(σ/(1−σ)))."""
    noise_level: float = 0.7
    """The a of the flow_grpo noise schedule."""
    sde_window_size: int = 0
    """Steps that are stochastic (and trained); 0 = every step. Elsewhere the rollout takes Euler ODE steps."""
    sde_window_start: int = 0
    """First SDE step of a fixed window."""
    sde_window_slide_every: int = 0
    """Advance the window by `sde_window_stride` steps every this many epochs (0 = fixed window)."""
    sde_window_stride: int = 1
    """Steps the sliding window advances by."""
    timestep_fraction: float = 0.99
    """Train on the SDE steps among the first ⌊num_steps·fraction⌋ steps (24 of 25 in the reference)."""

    # --- grouping and batching --------------------------------------------------------------------------------------
    group_size: int = 8
    """G: videos sampled per prompt row; the row's videos form its advantage group."""
    prompts_per_epoch: int = 4
    """Prompt rows drawn per epoch (global); an epoch samples prompts_per_epoch·G videos over all ranks."""
    shared_initial_noise: bool = False
    """The G videos of a group start from one initial latent and differ only in their SDE noise, so reward differences
    within a group come from the steps that are trained, not from a starting noise no step can change. Off (the
    default): every video draws its own initial latent."""
    rollout_batch_size: int = 1
    """Videos per rollout forward, per rank (the CFG forward runs 2x this batch)."""
    train_batch_size: int = 1
    """Videos per training micro-batch, per rank; may differ from rollout_batch_size."""
    inner_epochs: int = 1
    """Passes of the update over one epoch's samples."""
    updates_per_epoch: int = 1
    """Optimizer steps per inner epoch: the kept samples, in one seeded global order, are cut into this many shares
    (at most one per sample), and each step's gradient is the mean over its share and the trained steps. The shares do
    not depend on the number of ranks, so N ranks take the optimizer steps of 1 rank."""

    # --- optimisation -----------------------------------------------------------------------------------------------
    lr: float = 1e-4
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    clip_range: float = 1e-3
    """PPO ratio clip ε."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip."""
    adv_std: str = "group"
    """Advantage normalisation: "group" (per prompt row, the reference) or "global" (the batch's std)."""
    kl_beta: float = 0.004
    """Weight of the KL penalty to the reference policy (0 disables it and the reference forward)."""
    reference: str = "lora"
    """KL reference: "lora" (the policy with its adapters disabled), "copy" (a frozen copy, full fine-tuning)."""
    lora_rank: int = 32
    """LoRA rank on the attention projections (0 = full fine-tuning)."""
    lora_alpha: float = 32.0
    """LoRA alpha."""
    ema_decay: float = 0.9
    """EMA decay of the trainable weights (0 disables the EMA); the decay actually used at step count g is the
    warm-up min(ema_decay, (1 + g) / (10 + g))."""
    ema_every: int = 8
    """EMA update interval in optimizer steps."""
    ema_schedule: str = "interval"
    """When the EMA updates: "interval" (after optimizer steps ema_every, 2·ema_every, ...: one update, with
    g = the 0-based index of the step just taken) or "identity_grpo" (the official script: after optimizer steps
    ema_every - 1, 2·ema_every - 1, ...: `ema_repeats` updates, with g = the number of steps taken), see
    docs/recipe.md."""
    ema_repeats: int = 1
    """Updates applied at each EMA update point. The official script's EMA runs once per micro-batch with the
    optimizer step count, so each due count is applied once per micro-batch of an optimizer step: 4 in its
    configuration."""
    overlap_reward: bool = True
    """Decode + score each rollout batch on a worker thread (own CUDA stream) while the next batch is sampled.
    Turn off for a reward model that runs collectives (sharded), which must not interleave with the policy's."""
    max_reward_failures: int = 10
    """A reward call that raises gives NaN rewards for its batch (dropped, counted); this many failures abort."""

    # --- run --------------------------------------------------------------------------------------------------------
    epochs: int = 100
    """Training epochs (rollout + update rounds)."""
    seed: int = 0
    """Seed of prompt sampling and of the per-sample noise."""
    eval_every: int = 10
    """Evaluate every this many epochs (0 disables evaluation)."""
    eval_steps: int = 50
    """Sampling steps at evaluation."""
    eval_solver: str = "unipc"
    """ODE solver at evaluation: "unipc" or "euler" (the official script: Euler steps, no noise)."""
    eval_height: int | None = None
    """Video height at evaluation (multiple of 16); None: `height`."""
    eval_width: int | None = None
    """Video width at evaluation (multiple of 16); None: `width`."""
    eval_num_frames: int | None = None
    """Frames per video at evaluation (4k+1); None: `num_frames`."""
    eval_videos: int = 2
    """Sample videos written (mp4 + gif) per evaluation."""
    eval_with_ema: bool = True
    """Evaluate with the EMA weights swapped in."""
    save_every: int = 10
    """Checkpoint every this many epochs (and at the end)."""
    resume: bool = True
    """Resume from the latest checkpoint in run_dir when there is one."""
    grad_accumulation: str = "auto"
    """How gradients add up over the backwards of one optimizer step (micro-batches x trained steps): "local" (FSDP
    `no_sync`: an unsharded fp32 gradient per trainable group on every rank, one reduction per optimizer step),
    "sharded" (a reduce-scatter after every backward into the fp32 gradient shard: 1/N of the memory, one
    collective per backward) or "auto" (local when the trainable weights are replicated, as LoRA adapters are, or
    there is one rank; sharded otherwise, so full fine-tuning of a large model never holds a whole fp32 gradient)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (the engine's FSDP option)."""
    compute_dtype: str = "bfloat16"
    """Compute dtype of the policy on GPU ("bfloat16" or "float32"; CPU always float32)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form settings passed to the reward factory (e.g. its checkpoint path): `--extra KEY VALUE [...]`."""
    baseline: BaselineFlags = field(default_factory=BaselineFlags)
    """Benchmark baseline switches (all off = the fast path); each computes the same function, only slower."""

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {MODELS}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r}: expected one of {GRIDS}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule={self.noise_schedule!r}: expected one of {NOISE_SCHEDULES}")
        if self.adv_std not in ("group", "global"):
            raise ValueError(f"adv_std={self.adv_std!r}: expected 'group' or 'global'")
        if self.reference not in ("lora", "copy"):
            raise ValueError(f"reference={self.reference!r}: expected 'lora' or 'copy'")
        if self.grad_accumulation not in ("auto", "local", "sharded"):
            raise ValueError(f"grad_accumulation={self.grad_accumulation!r}: expected 'auto', 'local' or 'sharded'")
        if self.eval_solver not in ("unipc", "euler"):
            raise ValueError(f"eval_solver={self.eval_solver!r}: expected 'unipc' or 'euler'")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height/width must be multiples of 16, got {self.height}x{self.width}")
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1, got {self.num_frames}")
        for name in ("eval_height", "eval_width"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value % 16):
                raise ValueError(f"{name} must be a positive multiple of 16 (or None: the training size), got {value}")
        if self.eval_num_frames is not None and (self.eval_num_frames < 1 or (self.eval_num_frames - 1) % 4):
            raise ValueError(f"eval_num_frames must be 4k+1 (or None: num_frames), got {self.eval_num_frames}")
        if self.model == "toy" and self.eval_size != (self.height, self.width, self.num_frames):
            raise ValueError(f"the toy policy is built for one latent shape: evaluate it at the training size "
                             f"{self.height}x{self.width}x{self.num_frames}, not {self.eval_size}")
        if self.vae_dtype not in DTYPES:
            raise ValueError(f"vae_dtype={self.vae_dtype!r}: expected one of {DTYPES}")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ValueError(f"ema_schedule={self.ema_schedule!r}: expected one of {EMA_SCHEDULES}")
        if not isinstance(self.diffusers_ref_resize, bool):
            raise ValueError(f"diffusers_ref_resize must be a bool, got {self.diffusers_ref_resize!r}")
        if self.ema_repeats < 1:
            raise ValueError(f"ema_repeats must be >= 1, got {self.ema_repeats}")
        if self.init_lora is not None and (self.model == "toy" or self.lora_rank == 0):
            raise ValueError(f"init_lora={self.init_lora!r} needs a LoRA policy: model 'tiny', 'vace-1.3b' or "
                             f"'phantom-1.3b' with lora_rank > 0 (got model {self.model!r}, lora_rank "
                             f"{self.lora_rank})")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        for name in ("num_steps", "group_size", "prompts_per_epoch", "rollout_batch_size", "train_batch_size",
                     "inner_epochs", "updates_per_epoch", "epochs", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.sde_window_start and self.sde_window_start + max(self.sde_window_size, 0) <= self.num_steps):
            raise ValueError(f"SDE window [{self.sde_window_start}, +{self.sde_window_size}) is outside "
                             f"{self.num_steps} steps")
        for name in ("lr", "clip_range", "adv_clip", "max_grad_norm", "shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_beta < 0 or not 0 <= self.ema_decay < 1 or self.ema_every < 1:
            raise ValueError("kl_beta must be >= 0, ema_decay in [0, 1), ema_every >= 1")
        if self.reward and ":" not in self.reward:
            raise ValueError(f"reward={self.reward!r}: expected 'module:function'")
        if self.model in ("vace-1.3b", "phantom-1.3b") and self.lora_rank == 0 and self.reference == "lora":
            raise ValueError("full fine-tuning (lora_rank 0) needs reference='copy' for the KL anchor")

    @property
    def num_trained_steps(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    @property
    def eval_size(self) -> tuple[int, int, int]:
        """(height, width, num_frames) of the evaluation videos."""
        return (self.eval_height or self.height, self.eval_width or self.width,
                self.eval_num_frames or self.num_frames)

    @staticmethod
    def from_name(name: str, **overrides) -> GRPOConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GRPOConfig] = {
    # CPU demo: the toy flow policy, brightness reward, seconds per epoch.
    "tiny": GRPOConfig(
        model="toy", height=16, width=16, num_frames=5, num_steps=8, guidance=1.0, group_size=4,
        prompts_per_epoch=2, rollout_batch_size=4, train_batch_size=2, lr=3e-2, clip_range=0.2, kl_beta=0.0,
        lora_rank=0, reference="copy", ema_every=1, epochs=20, eval_every=5, eval_steps=8, save_every=5,
        timestep_fraction=1.0, compute_dtype="float32", run_dir="runs/grpo-tiny",
    ),
    # The Identity-GRPO reference recipe (Wan2.1-VACE-1.3B + LoRA r 32, 25 steps, CFG 4.5), with the
    # official script's dgx configuration on its 4-GPU launch: 16 prompts and 2 optimizer steps per epoch, its EMA
    # schedule, evaluation with 50 Euler steps at 480x832x81 every 5 epochs. docs/recipe.md lists what differs.
    "vace-1.3b": GRPOConfig(
        model="vace-1.3b", height=240, width=416, num_frames=33, num_steps=25, shift=3.0, grid="diffusers",
        guidance=4.5, group_size=8, prompts_per_epoch=16, updates_per_epoch=2, lora_rank=32, lora_alpha=32.0,
        lr=1e-4, clip_range=1e-3, adv_clip=5.0, kl_beta=0.004, ema_decay=0.9, ema_every=8,
        ema_schedule="identity_grpo", ema_repeats=4, timestep_fraction=0.99, eval_steps=50, eval_solver="euler",
        eval_height=480, eval_width=832, eval_num_frames=81, eval_every=5, save_every=5,
        reward="", run_dir="runs/grpo-vace-1.3b",
    ),
    # Phantom-Wan-1.3B with the same GRPO settings; its sampler grid is Wan's original, references appended in time.
    "phantom-1.3b": GRPOConfig(
        model="phantom-1.3b", height=240, width=416, num_frames=33, num_steps=25, shift=5.0, grid="wan",
        guidance=7.5, guidance_image=5.0, group_size=8, prompts_per_epoch=16, updates_per_epoch=2, lora_rank=32,
        lora_alpha=32.0, lr=1e-4, clip_range=1e-3, adv_clip=5.0, kl_beta=0.004, ema_decay=0.9, ema_every=8,
        ema_schedule="identity_grpo", ema_repeats=4, timestep_fraction=0.99, eval_steps=50, eval_solver="euler",
        eval_height=480, eval_width=832, eval_num_frames=81, eval_every=5, save_every=5,
        reward="", run_dir="runs/grpo-phantom-1.3b",
    ),
}
