"""Configuration by component: `GRPOConfig` (the algorithm: everything `GRPOTrainer` reads), `RecipeConfig` (what
`idgrpo train-grpo` needs to build a policy, its data and its reward, holding a `GRPOConfig`) and `BaselineFlags`
(the end-to-end benchmark's straightforward-implementation switches, passed to `GRPOTrainer.train_epoch`).

    GRPOConfig(lr=3e-2, group_size=4)                     # your own policy and reward: the algorithm only
    GRPOConfig.from_name("vace-1.3b")                     # the Identity-GRPO recipe's algorithm settings
    RecipeConfig.from_name("vace-1.3b", train_csv="data/train.csv", lr=5e-5)   # flat overrides, routed to each part
    idgrpo train-grpo vace-1.3b --train-csv data/train.csv --lr 5e-5           # the same on the command line

Presets (docs/recipe.md, docs/scale-out.md): `tiny` (a CPU run; its policy is the toy flow model, `--model toy`,
unless `--model tiny` picks the tiny Wan DiT with LoRA), `vace-1.3b` (the Identity-GRPO reference recipe),
`phantom-1.3b`, `t2v-1.3b` (Flow-GRPO's Wan2.1 text-to-video recipe), `t2v-14b`, `vace-14b`, `phantom-14b`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from idgrpo.errors import UsageError, above, at_least, flag, one_of, within
from idgrpo.kernels.grpo_loss import NOISE_SCHEDULES
from idgrpo.rl.ema import EMA_SCHEDULES
from idgrpo.rl.sampler import StepPlan
from idgrpo.rl.schedules import GRIDS

MODELS = ("toy", "tiny", "t2v-1.3b", "vace-1.3b", "phantom-1.3b", "t2v-14b", "vace-14b", "phantom-14b")
"""`RecipeConfig.model`: the toy flow policy, or a Wan DiT named as `WanConfig.from_name` names it."""
DTYPES = ("bfloat16", "float32")
OBJECTIVES = ("grpo", "nft")
NFT_SOLVERS = ("euler", "unipc", "sde")


@dataclass
class GRPOConfig:
    """Identity-GRPO, the algorithm: sampling, grouping, optimisation, evaluation and run bookkeeping.

        config = GRPOConfig(group_size=4, prompts_per_epoch=2, lr=3e-2, epochs=20, run_dir="runs/mine")
        config = GRPOConfig.from_name("vace-1.3b", epochs=50)     # the reference recipe's algorithm settings
        trainer = GRPOTrainer(config, my_policy, score=..., decode=..., build_conditioning=..., ...)

    Nothing here names a model: `GRPOTrainer` takes any policy and any reward with this config."""

    # --- objective --------------------------------------------------------------------------------------------------
    objective: str = "grpo"
    """"grpo": the clipped-ratio loss on SDE transitions (the Identity-GRPO paper); "nft": DiffusionNFT, the
    negative-aware loss on forward-noised clean samples (docs/objectives.md#training-with-nft): ODE rollouts of an
    "old" policy (an EMA of the trained weights), CFG-free, trained at `num_steps`·`timestep_fraction` noise levels
    per sample. The SDE window, `clip_range` and `noise_schedule` are GRPO's; `nft_*` are NFT's."""
    nft_beta: float = 1.0
    """NFT: the step β between the old and the trained policy's velocity (official: 1.0; 0.1 for its OCR and
    multi-reward runs)."""
    nft_old_decay: int = 1
    """NFT: the old policy's decay schedule, the official `decay_type`, applied after every epoch with the optimizer
    step count s: 0: decay 0 (the old policy is the trained one); 1: min(0.001·s, 0.5) (official default); 2: 0 for
    s < 75, then min(0.0075·(s − 75), 0.999) (its OCR run). old ← decay·old + (1 − decay)·trained."""
    nft_solver: str = "euler"
    """NFT: how rollouts are sampled: "euler" or "unipc" (deterministic ODE) or "sde" (the SDE of `noise_schedule`
    on every step); `num_steps` steps in each case. NFT needs no log-probability, so any sampler works."""

    # --- sampler ----------------------------------------------------------------------------------------------------
    num_steps: int = 25
    """Sampling steps of a training rollout."""
    shift: float = 3.0
    """Flow shift of the σ grid (the diffusers Wan2.1 / VACE scheduler ships 3.0)."""
    grid: str = "diffusers"
    """σ grid: "diffusers" (Identity-GRPO), "wan" (original Wan / Phantom) or "wan_dpm"."""
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
    max_undone_steps: int = 20
    """Stop with an error once this many optimizer steps in a row were undone because the gradient norm or the
    updated weights were not finite (checked after each epoch; 0 = never stop)."""

    # --- reward -----------------------------------------------------------------------------------------------------
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
    eval_videos: int = 2
    """Sample videos written (mp4 + gif) per evaluation."""
    eval_with_ema: bool = True
    """Evaluate with the EMA weights swapped in."""
    save_every: int = 10
    """Checkpoint every this many epochs (and at the end)."""
    resume: bool = True
    """Resume from the latest checkpoint in run_dir when there is one."""
    run_dir: str = "runs/grpo"
    """Metrics (JSON lines), checkpoints, LoRA (PEFT) + EMA exports, training curves (reward_curve.png) and sample
    videos."""

    # --- parallelism ------------------------------------------------------------------------------------------------
    sp_size: int = 1
    """Sequence-parallel group size (Ulysses, docs/scale-out.md): the world is data-parallel groups of sp_size
    consecutive ranks; a group's ranks roll out and train the same samples, each holding 1/sp_size of every sample's
    tokens. 1: data parallelism only. Must divide the world size and the policy's attention heads."""

    def __post_init__(self):
        for name, choices in (("grid", GRIDS), ("noise_schedule", NOISE_SCHEDULES), ("adv_std", ("group", "global")),
                              ("reference", ("lora", "copy")), ("grad_accumulation", ("auto", "local", "sharded")),
                              ("eval_solver", ("unipc", "euler")), ("ema_schedule", EMA_SCHEDULES),
                              ("compute_dtype", DTYPES), ("objective", OBJECTIVES), ("nft_solver", NFT_SOLVERS),
                              ("nft_old_decay", (0, 1, 2))):
            one_of(self, name, choices)
        # A group of one sample has zero variance: every advantage would be 0, nothing kept, no update ever made.
        at_least(self, 2, "group_size")
        at_least(self, 1, "num_steps", "prompts_per_epoch", "rollout_batch_size", "train_batch_size", "inner_epochs",
                 "updates_per_epoch", "sde_window_stride", "ema_every", "ema_repeats", "epochs", "eval_steps",
                 "save_every")
        at_least(self, 0, "sde_window_size", "sde_window_start", "sde_window_slide_every", "max_undone_steps",
                 "max_reward_failures", "eval_every", "eval_videos")
        # The per-sample noise seeds derived from it (idgrpo.rl.data) must stay within torch's 64-bit generator seeds.
        within(self, "seed", 0, 2**31 - 1)
        at_least(self, 1, "sp_size")  # whether it divides the world and the heads is checked at launch
        above(self, 0.0, "shift", "noise_level", "lr", "adam_eps", "max_grad_norm", "clip_range", "adv_clip",
              "nft_beta")
        at_least(self, 0.0, "weight_decay", "kl_beta")
        within(self, "timestep_fraction", 0.0, 1.0, open_low=True)
        within(self, "ema_decay", 0.0, 1.0, open_high=True)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                                      and 0 <= b < 1 for b in betas):
            raise UsageError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        if self.objective == "nft" and self.nft_solver != "sde" and self.shared_initial_noise:
            raise UsageError(f"--shared-initial-noise with --objective nft and --nft-solver {self.nft_solver}: a "
                             f"deterministic sampler turns one initial latent into one video, so every group would "
                             f"have zero variance; drop --shared-initial-noise or use --nft-solver sde")
        try:  # the first epoch's plan: a window outside the steps, or one without a trained step, is refused here
            if self.sde_window_slide_every > 0 and self.sde_window_size > 0:
                StepPlan.sliding(self.num_steps, self.sde_window_size, 0, every=self.sde_window_slide_every,
                                 stride=self.sde_window_stride, timestep_fraction=self.timestep_fraction)
            else:
                StepPlan.build(self.num_steps, window_start=self.sde_window_start, window_size=self.sde_window_size,
                               timestep_fraction=self.timestep_fraction)
        except ValueError as e:
            raise UsageError(f"--num-steps {self.num_steps}, --sde-window-start {self.sde_window_start}, "
                             f"--sde-window-size {self.sde_window_size}, --timestep-fraction "
                             f"{self.timestep_fraction}: {e}") from None

    @property
    def num_trained_steps(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    @property
    def nft_levels(self) -> int:
        """NFT: noise levels each sample is trained at per inner epoch, ⌊num_steps·timestep_fraction⌋ (at least 1) of
        the sampling grid's σ, as the official script's `num_train_timesteps`."""
        return max(1, int(self.num_steps * self.timestep_fraction))

    @staticmethod
    def from_name(name: str, **overrides) -> GRPOConfig:
        """The algorithm settings of preset `name` (see `RecipeConfig.from_name` for the whole recipe)."""
        return dataclasses.replace(_preset(name).grpo, **overrides)


@dataclass(frozen=True)
class BaselineFlags:
    """The end-to-end benchmark's switches, one epoch at a time.

        trainer.train_epoch(epoch, baseline=BaselineFlags.all_on())                 # the straightforward epoch
        trainer.train_epoch(epoch, baseline=BaselineFlags(separate_cfg_forwards=True))

    Switches that make a GRPO epoch do what the straightforward implementation of the recipe does, for the
    end-to-end benchmark's baseline (`bench/e2e.py`), passed to `GRPOTrainer.train_epoch(epoch, baseline=...)`.
    Every flag computes the same function as the default path (up to float rounding); it only changes how. All off
    = the engine's default (fast) path.

    The kernels' implementation is not among them: it is process-wide (`IDGRPO_KERNELS`, idgrpo.kernels.backend),
    and the benchmark sets it around its baseline epochs itself."""

    sdpa_attention: bool = False
    """Policy attention through torch SDPA (`set_attention_impl("sdpa")` on the policy and a frozen reference copy,
    for the duration of the epoch) instead of idgrpo's kernel."""
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
class RecipeConfig:
    """`idgrpo train-grpo`: the policy, its data, its reward and the video size, plus the algorithm.

        recipe = RecipeConfig.from_name("tiny", model="tiny", lora_rank=4, epochs=2)   # --model tiny --epochs 2
        recipe.grpo.epochs                                                             # 2: the algorithm's field
        trainer = idgrpo.rl.recipe.build_trainer(recipe)                               # policy, data, reward built

    The algorithm is `grpo`, whose fields are flags of their own (`--lr`, not `--grpo.lr`)."""

    # --- policy and data --------------------------------------------------------------------------------------------
    model: str = "toy"
    """Policy: "toy" (the toy flow model of `idgrpo.rl.toy`, no LoRA, CPU seconds), "tiny" (the tiny Wan DiT with
    LoRA, random weights), or a Wan2.1 DiT with weights from `weights_dir`: "vace-1.3b" / "phantom-1.3b" /
    "vace-14b" / "phantom-14b" (references), "t2v-1.3b" / "t2v-14b" (text only)."""
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
    lora_rank: int = 32
    """LoRA rank on the attention projections (0 = full fine-tuning)."""
    lora_alpha: float = 32.0
    """LoRA alpha."""
    prompt_cache: str | None = None
    """Text-embedding cache written by `idgrpo encode-prompts` (umT5 outputs, padded to 512); its negative prompt
    (Wan's default Chinese one unless changed at encoding time) is the unconditional branch."""
    train_csv: str | None = None
    """Training rows in the reference format: columns `ref_paths,prompt`, reference paths separated by `;`."""
    test_csv: str | None = None
    """Evaluation rows, same format; evaluated every `eval_every` epochs with fixed noise and the ODE sampler."""
    reward: str = "idgrpo.rl.toy:brightness_reward"
    """Reward factory "module:function", called as factory(config, device) -> score(frames, references, prompts)
    (`idgrpo.rl.RewardFn`). Resolved at run time, so the trainer never imports a reward implementation. Required
    (no default) for the 1.3B presets: pass the identity reward model's factory,
    `idgrpo.reward.factories:compact` (with `--extra reward_checkpoint DIR`) or `idgrpo.reward.factories:vlm`
    (with `--extra reward_base DIR reward_checkpoint DIR [reward_template FILE]`; docs/recipe.md)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form settings passed to the reward factory (e.g. its checkpoint path): `--extra KEY VALUE [...]`."""

    # --- video and guidance -----------------------------------------------------------------------------------------
    height: int = 240
    """Video height in pixels (multiple of 16)."""
    width: int = 416
    """Video width in pixels (multiple of 16)."""
    num_frames: int = 33
    """Frames per video, 4k+1."""
    eval_height: int | None = None
    """Video height at evaluation (multiple of 16); None: `height`."""
    eval_width: int | None = None
    """Video width at evaluation (multiple of 16); None: `width`."""
    eval_num_frames: int | None = None
    """Frames per video at evaluation (4k+1); None: `num_frames`."""
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

    overwrite: bool = False
    """Start afresh in a `run_dir` that holds another run: its contents are first moved aside, to
    `<run_dir>.replaced-<date>-<time>` (docs/reliability.md). Without it a used run_dir is resumed, and refused with
    `--no-resume`."""

    grpo: Annotated[GRPOConfig, tyro.conf.arg(name="")] = field(default_factory=GRPOConfig)
    """The algorithm (`GRPOConfig`); its fields are flags at the top level."""
    collective_timeout: float | None = None
    """Seconds a collective may wait for a stopped or slow process before the run fails (None:
    $IDGRPO_COLLECTIVE_TIMEOUT, else 600; docs/reliability.md)."""

    def __post_init__(self):
        one_of(self, "model", MODELS)
        one_of(self, "vae_dtype", DTYPES)
        at_least(self, 0, "lora_rank")
        above(self, 0.0, "lora_alpha")
        at_least(self, 0.0, "guidance", "guidance_image")
        sizes = ["height", "width"] + [n for n in ("eval_height", "eval_width") if getattr(self, n) is not None]
        at_least(self, 16, *sizes)  # `% 16` alone would let 0 and -16 through
        for name in sizes:
            if getattr(self, name) % 16:
                raise UsageError(f"{flag(name)} must be a multiple of 16, got {getattr(self, name)}")
        lengths = ["num_frames"] + (["eval_num_frames"] if self.eval_num_frames is not None else [])
        at_least(self, 1, *lengths)
        for name in lengths:
            if (getattr(self, name) - 1) % 4:
                raise UsageError(f"{flag(name)} must be 4k+1 (1, 5, 9, ...), got {getattr(self, name)}")
        if self.collective_timeout is not None:
            above(self, 0.0, "collective_timeout")
        if self.model == "toy" and self.eval_size != (self.height, self.width, self.num_frames):
            raise UsageError(f"the toy policy is built for one latent shape: evaluate it at the training size "
                             f"{self.height}x{self.width}x{self.num_frames}, not {self.eval_size}")
        if not isinstance(self.diffusers_ref_resize, bool):
            raise UsageError(f"--diffusers-ref-resize must be a bool, got {self.diffusers_ref_resize!r}")
        if self.init_lora is not None and (self.model == "toy" or self.lora_rank == 0):
            raise UsageError(f"--init-lora {self.init_lora}: needs a LoRA policy: --model tiny, vace-1.3b or "
                             f"phantom-1.3b with --lora-rank > 0 (got --model {self.model}, --lora-rank "
                             f"{self.lora_rank})")
        if self.reward and ":" not in self.reward:
            raise UsageError(f"--reward {self.reward!r}: expected 'module:function'")
        if self.model in ("vace-1.3b", "phantom-1.3b") and self.lora_rank == 0 and self.grpo.reference == "lora":
            raise UsageError("full fine-tuning (lora_rank 0) needs reference='copy' for the KL anchor")
        if self.overwrite:
            run_dir = Path(self.grpo.run_dir).resolve()
            for name in ("weights_dir", "vae_path", "init_lora", "prompt_cache", "train_csv", "test_csv"):
                value = getattr(self, name)
                if value is not None and Path(value).resolve().is_relative_to(run_dir):
                    raise UsageError(f"--overwrite would move {name} {value} away with the old run in run_dir "
                                     f"{self.grpo.run_dir}; move it out of run_dir first")

    def run_settings(self) -> dict:
        """What the run directory records (`run.json`, docs/reliability.md): every setting but those about this
        invocation (where the run lives, whether to resume or overwrite)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "overwrite"}
        settings["grpo"] = {k: v for k, v in settings["grpo"].items() if k not in ("run_dir", "resume")}
        return settings

    @property
    def eval_size(self) -> tuple[int, int, int]:
        """(height, width, num_frames) of the evaluation videos."""
        return (self.eval_height or self.height, self.eval_width or self.width,
                self.eval_num_frames or self.num_frames)

    @staticmethod
    def from_name(name: str, **overrides: Any) -> RecipeConfig:
        """Preset `name` with `overrides` by field name, each applied to the component that has the field (the
        recipe's own fields, or its `grpo` algorithm's); `grpo=` replaces the algorithm whole."""
        preset = _preset(name)
        algorithm = {k: overrides.pop(k) for k in list(overrides) if k in _GRPO_FIELDS}
        unknown = sorted(set(overrides) - _RECIPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for preset {name!r}: not a field of RecipeConfig or "
                             f"GRPOConfig")
        grpo = overrides.pop("grpo", preset.grpo)
        return dataclasses.replace(preset, grpo=dataclasses.replace(grpo, **algorithm), **overrides)


_GRPO_FIELDS = frozenset(f.name for f in dataclasses.fields(GRPOConfig))
_RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(RecipeConfig))
assert not _GRPO_FIELDS & _RECIPE_FIELDS, "a flag name must belong to one component"


def _preset(name: str) -> RecipeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]


# The Identity-GRPO reference recipe's algorithm (Wan2.1-VACE-1.3B + LoRA r 32, 25 steps, CFG 4.5), with the
# official script's dgx configuration on its 4-GPU launch: 16 prompts and 2 optimizer steps per epoch, its EMA
# schedule, evaluation with 50 Euler steps every 5 epochs. docs/recipe.md lists what differs.
_IDENTITY_GRPO = GRPOConfig(
    num_steps=25, shift=3.0, grid="diffusers", group_size=8, prompts_per_epoch=16, updates_per_epoch=2, lr=1e-4,
    clip_range=1e-3, adv_clip=5.0, kl_beta=0.004, ema_decay=0.9, ema_every=8, ema_schedule="identity_grpo",
    ema_repeats=4, timestep_fraction=0.99, eval_steps=50, eval_solver="euler", eval_every=5, save_every=5,
)

# Flow-GRPO's Wan2.1 text-to-video GRPO (`general_ocr_wan2_1` in yifan123/flow_grpo's config/grpo.py, run by its
# scripts/train_wan2_1.py): 20 steps, groups of 4, 8 videos per GPU per batch and 2 batches per epoch (32 prompts on 8
# GPUs), 2 optimizer steps per epoch, 19 of 20 steps trained, evaluation with 50 deterministic (Euler) steps.
_FLOW_GRPO_WAN = GRPOConfig(
    num_steps=20, shift=3.0, grid="diffusers", noise_schedule="identity_grpo", group_size=4, prompts_per_epoch=32,
    rollout_batch_size=8, train_batch_size=8, updates_per_epoch=2, lr=1e-4, clip_range=1e-3, adv_clip=5.0,
    kl_beta=0.004, ema_decay=0.9, ema_every=8, ema_schedule="identity_grpo", ema_repeats=1, timestep_fraction=0.99,
    eval_steps=50, eval_solver="euler", eval_every=30, save_every=60, activation_checkpointing=True, seed=42,
)
# DiffusionNFT on the 1.3B recipes (docs/objectives.md#training-with-nft): the official script's settings
# (NVlabs/DiffusionNFT config/nft.py and base.py: CFG-free, 10 sampling steps, 9 of them trained, β 1, decay type 1,
# KL weight 1e-4, lr 3e-4, LoRA r 32 / alpha 64, an EMA after every step) with Wan's UniPC ODE solver in place of its
# DPM-Solver-2 and each recipe's groups and prompts per epoch; no shared initial latent (deterministic rollouts).
_NFT = dict(objective="nft", nft_beta=1.0, nft_old_decay=1, nft_solver="unipc", num_steps=10, timestep_fraction=0.99,
            lr=3e-4, kl_beta=1e-4, ema_decay=0.9, ema_every=1, ema_schedule="interval", ema_repeats=1,
            shared_initial_noise=False)

# What makes a 14B policy fit (docs/scale-out.md#presets): one video per forward, activation checkpointing.
_14B = dict(rollout_batch_size=1, train_batch_size=1, activation_checkpointing=True)

PRESETS: dict[str, RecipeConfig] = {
    # A CPU run in seconds: the toy flow policy (or --model tiny: the tiny Wan DiT + LoRA), brightness reward.
    "tiny": RecipeConfig(
        model="toy", height=16, width=16, num_frames=5, guidance=1.0, lora_rank=0,
        grpo=GRPOConfig(num_steps=8, group_size=4, prompts_per_epoch=2, rollout_batch_size=4, train_batch_size=2,
                        lr=3e-2, clip_range=0.2, kl_beta=0.0, reference="copy", ema_every=1, epochs=20, eval_every=5,
                        eval_steps=8, save_every=5, timestep_fraction=1.0, compute_dtype="float32",
                        run_dir="runs/grpo-tiny"),
    ),
    "vace-1.3b": RecipeConfig(
        model="vace-1.3b", height=240, width=416, num_frames=33, guidance=4.5, lora_rank=32, lora_alpha=32.0,
        eval_height=480, eval_width=832, eval_num_frames=81, reward="",
        grpo=dataclasses.replace(_IDENTITY_GRPO, run_dir="runs/grpo-vace-1.3b"),
    ),
    # Phantom-Wan-1.3B with the same GRPO settings; its sampler grid is Wan's original, references appended in time.
    "phantom-1.3b": RecipeConfig(
        model="phantom-1.3b", height=240, width=416, num_frames=33, guidance=7.5, guidance_image=5.0, lora_rank=32,
        lora_alpha=32.0, eval_height=480, eval_width=832, eval_num_frames=81, reward="",
        grpo=dataclasses.replace(_IDENTITY_GRPO, shift=5.0, grid="wan", run_dir="runs/grpo-phantom-1.3b"),
    ),
    # Flow-GRPO's Wan2.1 text-to-video recipe (docs/scale-out.md#presets): no references, so any reward but the
    # identity reward's (--reward MODULE:FACTORY).
    "t2v-1.3b": RecipeConfig(
        model="t2v-1.3b", height=240, width=416, num_frames=33, guidance=4.5, lora_rank=32, lora_alpha=64.0,
        reward="", grpo=dataclasses.replace(_FLOW_GRPO_WAN, run_dir="runs/grpo-t2v-1.3b"),
    ),
    # DiffusionNFT versions of the 1.3B recipes: CFG-free (guidance 1), the NFT settings above.
    "vace-1.3b-nft": RecipeConfig(
        model="vace-1.3b", height=240, width=416, num_frames=33, guidance=1.0, lora_rank=32, lora_alpha=64.0,
        eval_height=480, eval_width=832, eval_num_frames=81, reward="",
        grpo=dataclasses.replace(_IDENTITY_GRPO, **_NFT, run_dir="runs/nft-vace-1.3b"),
    ),
    "phantom-1.3b-nft": RecipeConfig(
        model="phantom-1.3b", height=240, width=416, num_frames=33, guidance=1.0, guidance_image=1.0, lora_rank=32,
        lora_alpha=64.0, eval_height=480, eval_width=832, eval_num_frames=81, reward="",
        grpo=dataclasses.replace(_IDENTITY_GRPO, **_NFT, shift=5.0, grid="wan", run_dir="runs/nft-phantom-1.3b"),
    ),
    "t2v-1.3b-nft": RecipeConfig(
        model="t2v-1.3b", height=240, width=416, num_frames=33, guidance=1.0, lora_rank=32, lora_alpha=64.0,
        reward="", grpo=dataclasses.replace(_FLOW_GRPO_WAN, **_NFT, run_dir="runs/nft-t2v-1.3b"),
    ),
    # The 14B presets (docs/scale-out.md#presets): 480x832x81, one video per forward, activation checkpointing, FSDP's
    # sharded frozen base, bf16 compute; launch them with --sp-size (`idgrpo plan` gives the command).
    "t2v-14b": RecipeConfig(
        model="t2v-14b", height=480, width=832, num_frames=81, guidance=4.5, lora_rank=0, reward="",
        grpo=dataclasses.replace(_FLOW_GRPO_WAN, **_14B, prompts_per_epoch=8, lr=1e-5, reference="copy",
                                 run_dir="runs/grpo-t2v-14b"),
    ),
    "vace-14b": RecipeConfig(
        model="vace-14b", height=480, width=832, num_frames=81, guidance=4.5, lora_rank=32, lora_alpha=32.0,
        reward="", grpo=dataclasses.replace(_IDENTITY_GRPO, **_14B, prompts_per_epoch=8, run_dir="runs/grpo-vace-14b"),
    ),
    "phantom-14b": RecipeConfig(
        model="phantom-14b", height=480, width=832, num_frames=81, guidance=7.5, guidance_image=5.0, lora_rank=32,
        lora_alpha=32.0, reward="",
        grpo=dataclasses.replace(_IDENTITY_GRPO, **_14B, prompts_per_epoch=8, shift=5.0, grid="wan",
                                 run_dir="runs/grpo-phantom-14b"),
    ),
}
