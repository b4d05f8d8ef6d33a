"""`idgrpo train-reward` (pairwise preference training of the compact identity reward model, or with
`--model vlm` of the Qwen2.5-VL identity reward `VLMReward`) and `idgrpo score` (batch scoring of videos
into a CSV).

Usage:
    idgrpo synth-pairs --out runs/pairs                                  # make a synthetic pair set
    idgrpo train-reward --data runs/pairs/pairs.jsonl --out runs/reward   # one CPU process
    torchrun --nproc_per_node=8 -m idgrpo train-reward --data pairs.jsonl --out runs/reward --preset base \
        --precision bf16                                                 # one node, 8 GPUs
    idgrpo score --model runs/reward/final --csv videos.csv --out scores.csv
    torchrun --nproc_per_node=8 -m idgrpo train-reward --model vlm --vlm-base Qwen2.5-VL-3B-Instruct \
        --data pairs.jsonl --out runs/vlm_reward --precision bf16 --batch-size 8 --lr 2e-5  # the VLM reward

With `--model vlm` the published recipe trains: LoRA (rank 64, alpha 128) on every Linear of the language
model, the score head `rm_head`, the resized embeddings and (`--train-vision`) the vision tower; the final
model is written in the published checkpoint layout (`VLMReward.save`) under <out>/final, loadable with
`VLMReward.from_pretrained(<vlm-base>, <out>/final)`.

The loop itself is `fit` (which also trains the reward model of `idgrpo demo`), the held-out metrics
`evaluate`; each `--model` has its builder in `ARCHITECTURES`. Each epoch ends with an evaluation on the held-out
split (pairwise accuracy on non-tie pairs, three-way accuracy with ties under the Rao-Kupper model, loss, expected
calibration error, accuracy per distortion kind) and a checkpoint; a rerun with the same --out resumes from the
latest checkpoint, with the settings recorded in <out>/run.json (only those in `RESUMABLE_SETTINGS` may change;
docs/reliability.md). A run whose updates keep being undone for NaN/Inf stops after --max-undone-steps of them in
a row.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
import tyro

from idgrpo.engine import (
    FSDP,
    Checkpointer,
    Metrics,
    NonFiniteGuard,
    build_optimizer,
    clip_grad_norm_,
    init_distributed,
    open_run,
    progress,
    step_if_finite,
    truncate_jsonl,
    warmup_cosine,
    world,
    write_atomic,
)
from idgrpo.engine.metrics import strict_json
from idgrpo.errors import UsageError, above, at_least, device_name, flag, one_of, within
from idgrpo.reward.data import PairTensors, load_pairs, read_pairs, split_pairs
from idgrpo.reward.losses import INVALID, PREFER_A, PREFER_B, TIE, bt_loss, btt_loss, btt_probabilities
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig


@dataclass
class TrainRewardConfig:
    data: Path = Path("runs/synth_pairs/pairs.jsonl")
    """Pair file (.csv or .jsonl, format in idgrpo.reward.data)."""
    out: Path = Path("runs/reward")
    """Run folder: checkpoints/, metrics.jsonl, final/ (the trained model), summary.json."""
    val_data: Path | None = None
    """Held-out pair file; when omitted, `held_out_fraction` of the groups of --data are held out."""
    held_out_fraction: float = 0.15
    """Fraction of pair groups (source videos) held out for evaluation."""
    architecture: Annotated[Literal["compact", "vlm"], tyro.conf.arg(name="model")] = "compact"
    """Which reward model trains (`--model compact|vlm`): the compact identity reward (configured by
    --preset / --model.*) or the Qwen2.5-VL reward (configured by the --vlm-* options)."""
    preset: str = ""
    """Model preset (tiny: CPU, small, base); when given it replaces the --model.* values."""
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Model config (defaults to the tiny preset)."""
    vlm_base: Path | None = None
    """--model vlm: base model directory (HF layout + tokenizer.json, e.g. Qwen2.5-VL-3B-Instruct); None: a
    randomly initialised --vlm-preset (tests, smoke runs) with --vlm-tokenizer."""
    vlm_preset: str = "3b"
    """--model vlm without --vlm-base: the Qwen2.5-VL preset to initialise at random (tiny or 3b)."""
    vlm_tokenizer: Path | None = None
    """--model vlm: tokenizer.json (or its directory); defaults to the one in --vlm-base."""
    train_vision: bool = True
    """--model vlm: train the vision tower and merger too (the recipe); otherwise they stay frozen."""
    vlm_lora_rank: int = 64
    """--model vlm: LoRA rank on the language model's Linears."""
    vlm_lora_alpha: float = 128.0
    """--model vlm: LoRA alpha."""
    vlm_image_size: int = 448
    """--model vlm: side to which frames and references are resized when the pairs are loaded (the
    processor then fits them to its patch grid within --vlm-max-pixels)."""
    vlm_max_pixels: int = 399_360
    """--model vlm: pixel budget of reference images and video frames in the processor."""
    vlm_video_min_pixels: int = 128 * 28 * 28
    """--model vlm: smallest frame size in pixels (smaller frames are upscaled, as qwen_vl_utils does)."""
    loss: Literal["btt", "bt"] = "btt"
    """Bradley-Terry with ties (Rao-Kupper) or plain Bradley-Terry (ties masked)."""
    ties_k: float = 5.0
    """Rao-Kupper k (> 1) of the BTT loss."""
    num_frames: int = 5
    """Frames sampled uniformly from each video."""
    epochs: int = 12
    """Passes over the training split."""
    batch_size: int = 32
    """Pairs per step (global, split across ranks)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 5% after a 3% warmup)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    init_from: Path | None = None
    """Start from a trained reward model directory (an <out>/final) instead of random weights."""
    lora_rank: int = 0
    """0: train every weight; > 0: LoRA adapters of this rank on the attention and MLP Linears (base frozen;
    the score head stays trainable); the final model is written merged, the adapters also in PEFT format."""
    lora_alpha: float = 0.0
    """LoRA alpha (0: 2 * rank)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype of the FSDP-gathered weights (master weights and optimizer state stay fp32)."""
    flip_augment: bool = True
    """Mirror frames and references of a pair together at random (identity-preserving)."""
    skip_bad_rows: bool = False
    """Skip (and count) bad rows instead of stopping at the first one."""
    max_minutes: float = 0.0
    """Stop after this many minutes (0 = no limit); the last finished epoch is kept."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    resume: bool = True
    """Resume the run in --out (from its latest checkpoint, with the settings it recorded) when there is one;
    --no-resume refuses a used --out unless --overwrite is given."""
    overwrite: bool = False
    """Start a new run even when --out holds one: its contents are first moved aside to <out>.replaced-<time>."""
    max_undone_steps: int = 20
    """Stop with an error once this many updates in a row were undone because the loss, the gradient or the
    updated weights were not finite (checked after each epoch; 0 = never stop)."""
    threads: int = 0
    """torch CPU threads (0 = leave as is)."""
    collective_timeout: float | None = None
    """Seconds a collective may wait for a stopped or slow peer before the run fails (None:
    $IDGRPO_COLLECTIVE_TIMEOUT, else 600; docs/reliability.md)."""

    def __post_init__(self):
        one_of(self, "architecture", ("compact", "vlm"))
        one_of(self, "loss", ("btt", "bt"))
        one_of(self, "precision", ("fp32", "bf16"))
        within(self, "held_out_fraction", 0.0, 1.0, open_low=True, open_high=True)
        above(self, 1.0, "ties_k")
        at_least(self, 1, "num_frames", "epochs", "batch_size", "vlm_lora_rank", "vlm_video_min_pixels")
        above(self, 0.0, "lr", "grad_clip", "vlm_lora_alpha")
        at_least(self, 0, "weight_decay", "lora_rank", "lora_alpha", "max_minutes", "threads", "max_undone_steps")
        at_least(self, 28, "vlm_image_size")
        at_least(self, 28 * 28, "vlm_max_pixels")
        within(self, "seed", 0, 2**32 - 1)
        if self.collective_timeout is not None:
            above(self, 0.0, "collective_timeout")
        device_name(self)
        if self.preset:
            try:
                RewardModelConfig.from_name(self.preset)
            except ValueError as e:
                raise UsageError(f"--preset: {e}") from None
        if self.architecture == "vlm":
            if self.init_from is not None or self.lora_rank:
                raise UsageError("--init-from and --lora-rank are compact-model options; with --model vlm use "
                                 "--vlm-base and --vlm-lora-rank")
            if self.vlm_base is None and self.vlm_tokenizer is None:
                raise UsageError("--model vlm needs --vlm-base, or --vlm-tokenizer for a random --vlm-preset")
            if self.vlm_base is None:
                from idgrpo.models.qwen2_5_vl import Qwen2_5_VLConfig

                try:
                    Qwen2_5_VLConfig.from_name(self.vlm_preset)
                except ValueError as e:
                    raise UsageError(f"--vlm-preset: {e}") from None
        elif self.init_from is None and self.num_frames > self.model_config().max_frames:
            raise UsageError(f"--num-frames {self.num_frames} is more than the model's max_frames "
                             f"{self.model_config().max_frames} (--model.max-frames)")
        if self.overwrite:
            out = Path(self.out).resolve()
            for name in ("data", "val_data", "init_from", "vlm_base", "vlm_tokenizer"):
                value = getattr(self, name)
                if value is not None and Path(value).resolve().is_relative_to(out):
                    raise UsageError(f"--overwrite would move {flag(name)} {value} away with the old run in --out "
                                     f"{self.out}; move it out of --out first")

    def run_settings(self) -> dict:
        """What run.json records: every setting but the ones about this invocation (where, whether to resume)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "resume", "overwrite")}

    def model_config(self) -> RewardModelConfig:
        return RewardModelConfig.from_name(self.preset) if self.preset else self.model

    def fit_config(self) -> FitConfig:
        """The settings of `fit` and `evaluate`: 3% of the steps warm up, each epoch reseeded (resumable)."""
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, grad_clip=self.grad_clip,
                         warmup_fraction=0.03, loss=self.loss, ties_k=self.ties_k, flip_augment=self.flip_augment,
                         seed=self.seed, reseed_each_epoch=True)


RESUMABLE_SETTINGS = frozenset({"epochs", "max_minutes", "threads", "device", "collective_timeout",
                                "max_undone_steps"})
"""The settings a resumed run may change (`run_settings` keys); any other change is refused (docs/reliability.md).
More --epochs stretch the learning-rate schedule over the new length from the resumed step on."""


def _settings_flag(key: str) -> str:
    return "--model" if key == "architecture" else flag(key)


# ----------------------------------------------------------------------------------------
# fit(): the pairwise training loop (train-reward and the demo)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """What `fit` and `evaluate` need: the objective, the batches, the schedule."""

    epochs: int
    """Passes over the training pairs."""
    batch_size: int
    """Pairs per optimizer step (global: an FSDP model's ranks split it)."""
    lr: float
    """Peak learning rate (`warmup_cosine` down to 5% of it)."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    warmup_fraction: float = 0.03
    """Linear warm-up over this fraction of all steps (at least one step)."""
    loss: Literal["btt", "bt"] = "btt"
    """Bradley-Terry with ties (Rao-Kupper) or plain Bradley-Terry (ties masked)."""
    ties_k: float = 5.0
    """Rao-Kupper k (> 1) of the BTT loss and of the three-way probabilities `evaluate` scores."""
    flip_augment: bool = True
    """Mirror frames and references of a pair together at random (identity-preserving)."""
    seed: int = 0
    """Seed of the shuffles and the mirrors."""
    reseed_each_epoch: bool = True
    """True: epoch e's order and mirrors come from a generator seeded with (seed, e), so a resumed run draws the
    same ones; False: one generator seeded with `seed` draws every epoch's in turn (the demo's stream; such a run
    cannot resume mid-way)."""

    def __post_init__(self):
        if self.loss not in ("btt", "bt"):
            raise ValueError(f"FitConfig.loss must be 'btt' or 'bt', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"FitConfig: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.ties_k > 1 and 0 <= self.warmup_fraction <= 1):
            raise ValueError(f"FitConfig: lr > 0, grad_clip > 0, ties_k > 1 and 0 <= warmup_fraction <= 1 are "
                             f"required, got {self.lr}, {self.grad_clip}, {self.ties_k}, {self.warmup_fraction}")


def pairwise_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, labels: torch.Tensor,
                  config: FitConfig) -> torch.Tensor:
    """The mean BTT or BT loss of (N,) rewards of the A and B sides of N pairs."""
    if config.loss == "btt":
        return btt_loss(reward_a, reward_b, labels, k=config.ties_k)
    return bt_loss(reward_a, reward_b, labels)


@dataclass
class PairBatch:
    """N pairs as the reward models take them: A rows, then B rows."""

    frames: torch.Tensor  # (2N, T, S, S, 3) uint8, on the device
    refs: torch.Tensor  # (2N, P, S, S, 3) uint8, on the device
    ref_mask: torch.Tensor  # (2N, P) bool, on the device (False: padding)
    labels: torch.Tensor  # (N,) int64, on the device
    ref_counts: list[int]  # (2N) references per video, read on the host (no device sync)
    prompts: list[str]  # (2N)


def pair_batch(tensors: PairTensors, index: torch.Tensor, flip: torch.Tensor | None, device) -> PairBatch:
    """The pairs `index` of `tensors` on `device`; where `flip` (N,) is true, both videos of the pair and their
    references mirrored left-right."""
    frames = torch.cat([tensors.frames_a[index], tensors.frames_b[index]]).to(device)
    refs = torch.cat([tensors.refs_a[index], tensors.refs_b[index]]).to(device)
    ref_mask = torch.cat([tensors.ref_mask[index], tensors.ref_mask[index]]).to(device)
    if flip is not None:  # the same mirror for both sides of a pair and their references
        both = torch.cat([flip, flip]).to(device).view(-1, 1, 1, 1, 1)
        frames = torch.where(both, frames.flip(-2), frames)
        refs = torch.where(both, refs.flip(-2), refs)
    return PairBatch(frames, refs, ref_mask, tensors.labels[index].to(device),
                     ref_counts=tensors.ref_mask[index].sum(-1).tolist() * 2,
                     prompts=[tensors.prompts[i] for i in index.tolist()] * 2)


PairRewardFn = Callable[[nn.Module, PairBatch], torch.Tensor]
"""`rewards(model, batch) -> (2N,)` fp32 rewards of a `PairBatch` (A rows, then B rows): how `fit` and `evaluate`
call a reward model (`compact_rewards`, `vlm_rewards`)."""


def compact_rewards(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """`PairRewardFn` of `IdentityRewardModel` (also wrapped in FSDP)."""
    return model(batch.frames, batch.refs, batch.ref_mask)["reward"].float()


def vlm_rewards(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """`PairRewardFn` of `VLMReward` (also wrapped in FSDP): each video's unpadded references as a list, and its
    pair's prompt."""
    references = [list(batch.refs[i, :count]) for i, count in enumerate(batch.ref_counts)]
    return model.rewards(batch.frames, references, batch.prompts)


@dataclass
class FitStep:
    """What `fit` hands `on_step` after each optimizer step (device tensors: reading them syncs)."""

    epoch: int
    """0-based epoch of the step."""
    step: int
    """Optimizer steps done, this one included."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    """Before clipping."""
    skipped: torch.Tensor
    """1.0 when `step_if_finite` undid the update (NaN/Inf), else 0.0."""


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_set: PairTensors, config: FitConfig, *,
        rewards: PairRewardFn = compact_rewards, device: str | torch.device = "cpu", start_epoch: int = 0,
        step: int = 0, progress_desc: str = "epoch", on_step: Callable[[FitStep], None] | None = None,
        on_epoch_end: Callable[[int, int], bool | None] | None = None) -> int:
    """Pairwise preference training of a reward model on `train_set`, from epoch `start_epoch` (0-based) and
    optimizer step `step` (a resumed run's) to `config.epochs`; returns the optimizer steps done.

        config = FitConfig(epochs=3, batch_size=32, lr=1e-3)
        model = IdentityRewardModel(RewardModelConfig.from_name("tiny"))
        fit(model, build_optimizer(model.parameters(), lr=config.lr, weight_decay=0.01), pairs, config)
        print(evaluate(model, held_out, config, "cpu")["val_acc_non_tie"])   # pairs, held_out: PairTensors

    Each step: a batch of the epoch's order (mirrored at random with `flip_augment`), the learning rate of
    `warmup_cosine`, the loss of `rewards(model, batch)`, gradient clipping, `step_if_finite`, then
    `on_step(FitStep)`. After each epoch `on_epoch_end(epochs_done, step)`; a true return stops the run there.
    A progress bar per epoch (`<progress_desc> e/E`) on rank 0.

    Note [replicated modules]: an FSDP model trains data-parallel: each rank takes its share of the global batch
    and the engine reduces the gradients and their norm. A plain module is replicated: every rank trains on the
    whole batch and computes the same update (the demo's stages), so nothing is split and the gradient norm is the
    local one (torch's `clip_grad_norm_`; the engine's would sum it over the ranks)."""
    sharded = isinstance(model, FSDP)
    rank, world_size = world() if sharded else (0, 1)
    if not config.reseed_each_epoch and start_epoch:
        raise ValueError("fit: a run with reseed_each_epoch=False draws one stream from its start and cannot "
                         f"resume at epoch {start_epoch}")
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_fraction * total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(start_epoch, config.epochs):
        if config.reseed_each_epoch:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_set), generator=generator)
        flips = (torch.rand(len(train_set), generator=generator) < 0.5) if config.flip_augment else None
        for i in progress(range(steps_per_epoch), rank=world()[0], desc=f"{progress_desc} {epoch + 1}/{config.epochs}"):
            batch = order[i * config.batch_size:(i + 1) * config.batch_size]
            index = batch[rank::world_size]  # this rank's share of the global batch
            if len(index) == 0:  # a last batch smaller than the world: repeat a pair (keeps collectives in step)
                index = batch[:1]
            pairs = pair_batch(train_set, index, None if flips is None else flips[index], device)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, total_steps, warmup=warmup)
            reward = rewards(model, pairs)
            loss = pairwise_loss(reward[:len(index)], reward[len(index):], pairs.labels, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if sharded:
                grad_norm = clip_grad_norm_(model, config.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            skipped = step_if_finite(optimizer, loss, grad_norm)
            step += 1
            if on_step is not None:
                on_step(FitStep(epoch, step, loss, grad_norm, skipped))
        if on_epoch_end is not None and on_epoch_end(epoch + 1, step):
            break
    return step


@torch.no_grad()
def evaluate(model: nn.Module, tensors: PairTensors, config: FitConfig, device, *,
             rewards: PairRewardFn = compact_rewards, batch_size: int = 64) -> dict:
    """Held-out metrics: loss, accuracy on non-tie pairs, 3-way accuracy with ties (argmax of the
    Rao-Kupper probabilities), tie accuracy, expected calibration error (10 bins over the predicted
    class's probability), accuracy per pair kind. Hands the model back in train mode."""
    model.eval()
    rewards_a, rewards_b = [], []
    for start in range(0, len(tensors), batch_size):
        index = torch.arange(start, min(start + batch_size, len(tensors)))
        reward = rewards(model, pair_batch(tensors, index, None, device))
        rewards_a.append(reward[:len(index)])
        rewards_b.append(reward[len(index):])
    model.train()
    ra, rb = torch.cat(rewards_a).cpu(), torch.cat(rewards_b).cpu()
    labels = tensors.labels
    loss = float(pairwise_loss(ra, rb, labels, config))
    non_tie = (labels == PREFER_A) | (labels == PREFER_B)
    predicted_sign = torch.where(ra > rb, PREFER_A, PREFER_B)
    correct_non_tie = (predicted_sign == labels) & non_tie
    probs = btt_probabilities(ra, rb, k=config.ties_k)  # (N, 3): A, tie, B
    outcome = torch.tensor([PREFER_A, TIE, PREFER_B])[probs.argmax(-1)]
    valid = labels != INVALID
    correct3 = (outcome == labels) & valid
    confidence = probs.max(-1).values
    ece = 0.0 if valid.any() else None
    for low in torch.linspace(0, 1, 11)[:-1]:
        in_bin = valid & (confidence > low) & (confidence <= low + 0.1)
        if in_bin.any():
            ece += float(in_bin.sum()) / float(valid.sum()) * abs(
                float(correct3[in_bin].float().mean()) - float(confidence[in_bin].mean()))
    ties = labels == TIE
    # An accuracy over zero pairs is absent (None, `null` in the logs), never a 0.
    metrics = {
        "val_loss": loss,
        "val_acc_non_tie": _accuracy(correct_non_tie, non_tie),
        "val_acc_with_ties": _accuracy(correct3, valid),
        "val_tie_acc": _accuracy(correct3, ties),
        "val_ece": ece,
        "val_pairs": len(tensors),
        "val_non_tie_pairs": int(non_tie.sum()),
    }
    for kind in sorted(set(tensors.kinds) - {""}):
        rows = torch.tensor([k == kind for k in tensors.kinds])
        if (rows & non_tie).any():
            metrics[f"val_acc/{kind}"] = float(correct_non_tie[rows & non_tie].float().mean())
        elif rows.any():
            metrics[f"val_acc/{kind}"] = float(correct3[rows].float().mean())
    return metrics


def _accuracy(correct: torch.Tensor, counted: torch.Tensor) -> float | None:
    """Share of the `counted` pairs that are `correct` (both (N,) bool); None when no pair counts."""
    return float((correct & counted).sum()) / int(counted.sum()) if counted.any() else None


def format_metric(value: float | None) -> str:
    """A printed accuracy or calibration error: three decimals, or `n/a` when it is absent."""
    return "n/a" if value is None else f"{value:.3f}"


LORA_TARGETS = ("q", "kv", "out", "mlp.0", "mlp.2")


def _apply_lora(module: IdentityRewardModel, config: TrainRewardConfig) -> None:
    """LoRA on every attention/MLP Linear; only the adapters and the score head train."""
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable

    apply_lora(module, config.lora_rank, config.lora_alpha or 2.0 * config.lora_rank, targets=LORA_TARGETS)
    mark_only_lora_trainable(module)
    module.score_head.requires_grad_(True)


def _vlm_config(config: TrainRewardConfig):
    from idgrpo.reward.vlm import VLMRewardConfig

    return VLMRewardConfig(num_frames=config.num_frames, max_pixels=config.vlm_max_pixels,
                           video_min_pixels=config.vlm_video_min_pixels, lora_rank=config.vlm_lora_rank,
                           lora_alpha=config.vlm_lora_alpha)


def _build_vlm(config: TrainRewardConfig, device):
    """The VLM reward ready for training (LoRA + trainable head/embeddings/vision, the rest frozen), fp32."""
    from idgrpo.reward.vlm import build_vlm_reward_for_training

    return build_vlm_reward_for_training(config.vlm_base, _vlm_config(config), preset=config.vlm_preset,
                                         tokenizer=config.vlm_tokenizer, train_vision=config.train_vision,
                                         dtype=torch.float32, device=device, seed=config.seed)


class CompactTraining:
    """`--model compact`: the compact identity reward model, from --preset / --model.* or --init-from, every weight
    trained or (--lora-rank) LoRA adapters and the score head."""

    rewards = staticmethod(compact_rewards)

    def __init__(self, config: TrainRewardConfig):
        self.config = config
        # Loaded before the data: its config decides the image size.
        self.initial = IdentityRewardModel.load(config.init_from).train() if config.init_from is not None else None
        self.model_config = self.initial.config if self.initial is not None else config.model_config()
        self.image_size = self.model_config.image_size

    def build(self) -> tuple[nn.Module, list[nn.Module] | None]:
        """The module to train (fp32, on the host) and its FSDP units (None: the default search)."""
        module = self.initial if self.initial is not None else IdentityRewardModel(self.model_config)
        if self.config.lora_rank:
            _apply_lora(module, self.config)
        return module, None

    def export(self, model: FSDP, out: Path) -> None:
        """<out>/final (and with LoRA <out>/final_lora in PEFT format) on rank 0. A collective: every rank."""
        state = model.full_state_dict()
        if world()[0] != 0:
            return
        final = IdentityRewardModel(self.model_config)
        if self.config.lora_rank:
            from idgrpo.models.lora import merge_lora, save_peft

            _apply_lora(final, self.config)
            final.load_state_dict(state)
            save_peft(final, out / "final_lora")
            merge_lora(final)
            merged = {k: v for k, v in final.state_dict().items() if ".lora_" not in k}
            final = IdentityRewardModel(self.model_config)
            final.load_state_dict(merged)
        else:
            final.load_state_dict(state)
        final.save(out / "final")


class VLMTraining:
    """`--model vlm`: the Qwen2.5-VL reward (`VLMReward`) with the published recipe's trainable parts."""

    rewards = staticmethod(vlm_rewards)

    def __init__(self, config: TrainRewardConfig):
        self.config = config
        self.image_size = config.vlm_image_size

    def build(self) -> tuple[nn.Module, list[nn.Module] | None]:
        """The module to train, on the host (fp32 masters; FSDP moves the shards), and one FSDP unit per vision
        block and per decoder layer (they sit below the top level, so the default unit search would miss them)."""
        module = _build_vlm(self.config, "cpu").train()
        return module, [*module.backbone.visual.blocks, *module.backbone.model.layers]

    def export(self, model: FSDP, out: Path) -> None:
        """<out>/final in the published checkpoint layout on rank 0. A collective: every rank."""
        # With a base directory only the trained tensors are needed (the rest is the base); a random preset needs
        # everything.
        state = model.full_state_dict(trainable_only=self.config.vlm_base is not None)
        if world()[0] != 0:
            return
        final = _build_vlm(self.config, "cpu")
        missing = {n for n, _ in final.named_parameters()} - set(state)
        if self.config.vlm_base is None and missing:
            raise RuntimeError(f"train-reward: parameters missing from the trained state: {sorted(missing)[:5]}")
        final.load_state_dict(state, strict=False)
        base = str(self.config.vlm_base) if self.config.vlm_base else None
        final.save(out / "final", base_model_name_or_path=base)


ARCHITECTURES = {"compact": CompactTraining, "vlm": VLMTraining}
"""--model -> its builder: `image_size` (the side pairs are loaded at), `build()`, `rewards` (a `PairRewardFn`),
`export(model, out)`."""


def _device(name: str, info_device: torch.device) -> torch.device:
    return info_device if name == "auto" else torch.device(name)


def train_reward(config: Annotated[TrainRewardConfig, tyro.conf.arg(name="")]) -> int:
    """Train an identity reward model (the compact one, or `--model vlm`: the Qwen2.5-VL reward with LoRA)
    on preference pairs (BTT or BT loss), on the engine:
    one process, or `torchrun` (gloo on CPU, NCCL on GPU) with the model wrapped in FSDP."""
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.collective_timeout)
    device = _device(config.device, info.device)
    main = info.rank == 0
    out = Path(config.out)
    pairs, report = read_pairs(config.data, skip_bad_rows=config.skip_bad_rows)  # before --out is created
    if config.val_data is not None:
        train_pairs = pairs
        val_pairs, val_report = read_pairs(config.val_data, skip_bad_rows=config.skip_bad_rows)
        report.skipped += val_report.skipped
        report.reasons += val_report.reasons
    else:
        train_pairs, val_pairs = split_pairs(pairs, config.held_out_fraction, config.seed)
    say = lambda message: print(f"train-reward: {message}") if main else None
    run = open_run(out, config.run_settings(), mutable=RESUMABLE_SETTINGS, resume=config.resume,
                   overwrite=config.overwrite, label=_settings_flag, log=say)
    architecture = ARCHITECTURES[config.architecture](config)
    load = dict(num_frames=config.num_frames, image_size=architecture.image_size, skip_bad_rows=config.skip_bad_rows,
                report=report)
    train_set, val_set = load_pairs(train_pairs, **load), load_pairs(val_pairs, **load)
    if main:
        if report.skipped:
            print(f"train-reward: skipped {report.skipped} bad rows (--skip-bad-rows):")
            for reason in report.reasons[:20]:
                print("  " + reason)
        print(f"train-reward: {len(train_set)} training pairs, {len(val_set)} held-out pairs, "
              f"{info.world_size} process(es), device {device}")

    torch.manual_seed(config.seed)
    module, units = architecture.build()
    compute_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    model = FSDP(module, units=units, compute_dtype=compute_dtype, device=device)
    optimizer = build_optimizer(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fit_config = config.fit_config()
    checkpointer = Checkpointer(out / "checkpoints", keep=2, config=asdict(config), log=say)
    step, epoch_done, history = 0, 0, []
    resumed = checkpointer.load_latest(model, optimizer) if run.resuming else None
    if resumed is not None:
        step, extra = resumed
        epoch_done, history = extra["epoch"], extra["history"]
        if main:
            print(f"train-reward: resumed after epoch {epoch_done} (step {step})")
    if main and run.resuming:  # each epoch logged once, also after a stop past the checkpoint (docs/reliability.md)
        truncate_jsonl(out / "eval.jsonl", step)
    metrics = Metrics(out, rank=info.rank, all_reduce=True, truncate_after=step if run.resuming else None)
    guard = NonFiniteGuard(config.max_undone_steps, hint="lower --lr, or raise --max-undone-steps")
    started = time.monotonic()

    def log_step(done: FitStep) -> None:
        guard.update(done.skipped)
        metrics.add("skipped_steps", done.skipped)
        metrics.add("train_loss", done.loss)
        metrics.add("grad_norm", done.grad_norm)

    def end_epoch(epoch: int, step: int) -> bool:
        """Log, evaluate and checkpoint the finished epoch; true once --max-minutes have passed."""
        train_stats = metrics.flush(step)
        guard.check(step)
        record = {"epoch": epoch, "step": step, **train_stats, "minutes": (time.monotonic() - started) / 60,
                  **evaluate(model, val_set, fit_config, device, rewards=architecture.rewards)}
        history.append(record)
        if main:
            with (out / "eval.jsonl").open("a") as f:
                f.write(strict_json(record) + "\n")
            print(f"epoch {epoch}: train_loss {record['train_loss']:.4f} val_loss {record['val_loss']:.4f} "
                  f"acc(non-tie) {format_metric(record['val_acc_non_tie'])} "
                  f"acc(ties) {format_metric(record['val_acc_with_ties'])} ece {format_metric(record['val_ece'])}")
        checkpointer.save(step, model, optimizer, extra={"epoch": epoch, "history": history})
        out_of_time = bool(config.max_minutes) and (time.monotonic() - started) / 60 > config.max_minutes
        if out_of_time and main:
            print(f"train-reward: time limit of {config.max_minutes} minutes reached after epoch {epoch}")
        return out_of_time

    fit(model, optimizer, train_set, fit_config, rewards=architecture.rewards, device=device,
        start_epoch=epoch_done, step=step, on_step=log_step, on_epoch_end=end_epoch)
    metrics.close()
    architecture.export(model, out)
    if main:
        _write_summary(out, config, report, history)
    return 0


def _write_summary(out: Path, config: TrainRewardConfig, report, history: list[dict]) -> None:
    summary = {"config": json.loads(json.dumps(asdict(config), default=str)), "skipped_rows": report.skipped,
               "final": history[-1] if history else None}
    write_atomic(out / "summary.json", strict_json(summary, indent=1))
    print(f"train-reward: model written to {out / 'final'}")


# ----------------------------------------------------------------------------------------
# idgrpo score
# ----------------------------------------------------------------------------------------


@dataclass
class ScoreConfig:
    model: Path = Path("runs/reward/final")
    """Reward model directory (train-reward's <out>/final)."""
    videos: tuple[Path, ...] = ()
    """Videos to score (all with --refs and --prompt)."""
    refs: tuple[Path, ...] = ()
    """Reference images of the people, shared by --videos."""
    prompt: str = ""
    """Prompt shared by --videos."""
    csv: Path | None = None
    """CSV/JSONL with columns video, refs (`;`-separated), prompt (instead of --videos)."""
    out: Path = Path("scores.csv")
    """Output CSV: video, refs, prompt, reward."""
    batch_size: int = 16
    """Videos per forward."""
    num_frames: int = 5
    """Frames sampled uniformly per video."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self):
        if self.csv is None and not self.videos:
            raise UsageError("give --videos (with --refs) or --csv")
        if self.videos and not self.refs:
            raise UsageError("--videos needs --refs (the reference images of the people)")
        at_least(self, 1, "batch_size", "num_frames")
        device_name(self)


def _score_rows(config: ScoreConfig) -> list[tuple[Path, list[Path], str, str]]:
    """(video, refs, prompt, where) rows, paths checked."""
    from idgrpo.reward.data import PairDataError, _rows, _split_refs

    rows = []
    if config.csv is not None:
        path = Path(config.csv)
        if not path.exists():
            raise PairDataError(f"{path}: file does not exist")
        for number, row in _rows(path):  # the pair files' reader: bad JSON is an error naming the line
            if isinstance(row, PairDataError):
                raise row
            where = f"{path}:{number}"
            if not row.get("video") or not row.get("refs"):
                raise PairDataError(f"{where}: needs columns 'video' and 'refs'")
            resolve = lambda p: p if Path(p).is_absolute() else path.parent / p
            rows.append((resolve(row["video"]), [resolve(r) for r in _split_refs(row["refs"], where)],
                         str(row.get("prompt") or ""), where))
    for video in config.videos:
        rows.append((Path(video), [Path(r) for r in config.refs], config.prompt, "--videos"))
    for video, refs, _, where in rows:
        for p in [video, *refs]:
            if not Path(p).exists():
                raise PairDataError(f"{where}: {p} does not exist")
    return rows


def score(config: Annotated[ScoreConfig, tyro.conf.arg(name="")]) -> int:
    """Score videos with a trained reward model and write a CSV (video, refs, prompt, reward)."""
    from idgrpo import media

    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.device == "auto" else config.device))
    rows = _score_rows(config)  # every path checked before the model loads
    model = IdentityRewardModel.load(config.model, device)
    if config.num_frames > model.config.max_frames:
        raise UsageError(f"--num-frames {config.num_frames} is more than the model's max_frames "
                         f"{model.config.max_frames} ({config.model})")
    results = []
    for start in range(0, len(rows), config.batch_size):
        chunk = rows[start:start + config.batch_size]
        size = model.config.image_size
        from idgrpo.reward.data import resize_frames

        frames = torch.stack([resize_frames(media.read_video(v, num_frames=config.num_frames), size)
                              for v, _, _, _ in chunk]).to(device)
        references = [[media.read_image(r).to(device) for r in refs] for _, refs, _, _ in chunk]
        rewards = model.score(frames, references, [p for _, _, p, _ in chunk], num_frames=config.num_frames)
        results += [(str(v), ";".join(map(str, refs)), p, float(r))
                    for (v, refs, p, _), r in zip(chunk, rewards.cpu())]
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "refs", "prompt", "reward"])
        writer.writerows(results)
    print(f"score: {len(results)} videos -> {out}")
    return 0
