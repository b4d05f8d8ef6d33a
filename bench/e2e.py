"""End-to-end GRPO epoch at the Identity-GRPO reference recipe: the engine's default path against the
straightforward implementation (the trainer's baseline mode), in the same run.

Usage:
    python -m bench e2e            # VACE-1.3B recipe, one GPU (an epoch is minutes; the whole run ~8 epochs)
    python -m bench e2e --quick    # CPU: tiny presets, checks that the path runs; timings mean nothing
    IDGRPO_E2E_REWARDS=compact IDGRPO_E2E_REPS=1 python -m bench e2e   # a subset that fits a 10-minute slot

Environment: IDGRPO_E2E_REWARDS = comma list of reward models to run (compact, vlm; default both, vlm only when
`tokenizers` is importable); IDGRPO_E2E_REPS = repetitions (default 2; the spread needs at least 2).

Recipe (docs/recipe.md): Wan2.1-VACE-1.3B architecture with random weights + LoRA r 32 (Gaussian A, zero B),
240x416x33 with 2 reference images (VACE context from the Wan VAE, references prepended: 11 latent frames),
25 steps (24 trained), CFG 4.5 (negative-prompt branch), group 8, per-device batch 4 (rollout and update micro-
batch), 8 rollout batches = 4 prompts x 8 videos per epoch, KL 0.004 against the adapters-off policy, bf16 compute,
activation checkpointing per block in the update. Text: random (512, 4096) umT5-shaped embeddings per prompt (their
values do not change the cost). Decode: the Wan2.1 VAE architecture (random weights) on every rollout batch.
Reward: (a) the compact identity reward model (`base` preset, random weights); (b) when `tokenizers` is importable,
the Qwen2.5-VL-3B reward with random weights (built as `bench/reward.py` does, stand-in tokenizer).

Modes (one trainer, switched between epochs: `train_epoch(epoch, baseline=...)`):
- idgrpo: the default path: idgrpo attention and fused kernels, one batched CFG forward, KL anchor kept from the
  rollout, reward decoded + scored on a worker thread (own CUDA stream) overlapping the next rollout batch;
- baseline: `BaselineFlags.all_on()`: torch SDPA attention (policy and reward model), two CFG forwards, the KL
  reference forward at train time, every sample written to mp4 and re-read before scoring, synchronous reward; and,
  set here around the epoch since the choice is process-wide, the eager unfused reference ops (loss, norms, RoPE,
  advantages: IDGRPO_KERNELS=reference). Same function (tests/test_rl_baseline.py), slower.

Per epoch: wall time split into rollout (sampling + VACE context), reward (reward time NOT hidden behind the
rollout: all of it when synchronous), advantage, update; reward_busy_s = the reward worker's own time; samples/s =
videos per second of epoch; peak memory = CUDA max_memory_allocated over the epoch. Each mode gets one warm-up
epoch of 1 prompt x 4 videos (same shapes: Triton autotuning, cuDNN, allocator) before the measured ones; then
REPETITIONS rounds of (idgrpo epoch, baseline epoch) report the run-to-run spread; within a round both modes
train the same epoch (same prompts and noise) from the same weights and optimizer state (restored in between), and
reward_diff = |mean reward of the baseline - of idgrpo| checks that they computed the same thing.

FLOP convention of the update MFU: model FLOPs of `bench.dit.forward_flops` (2*M*N*K per matmul, 4*Lq*Lk*dim per
attention, non-causal) per CFG branch and sample at 11 latent frames, times 2 for the backward (activation
gradients only: the base weights are frozen; LoRA's own matmuls, the activation-checkpoint recompute and the
baseline's KL reference forwards are not counted), times trained samples x trained steps; MFU = that / update
time / the device's dense bf16 peak (bench.dit.PEAK_BF16).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import importlib.util
import os
import time

import torch

from bench.common import report
from bench.dit import _peak, forward_flops
from idgrpo.kernels.backend import ENV_VAR as KERNELS_ENV_VAR
from idgrpo.rl import BaselineFlags, GRPOConfig, GRPOTrainer, PhaseTimer, PromptRow, RecipeConfig

REPETITIONS = int(os.environ.get("IDGRPO_E2E_REPS", "2"))
REWARD_MODELS = ("compact", "vlm")
FULL = dict(wan="vace-1.3b", vae="wan2.1", compact="base", vlm="3b", height=240, width=416, num_frames=33,
            num_steps=25, group_size=8, prompts_per_epoch=4, batch=4, n_ref=2, reference_size=(336, 336),
            lora_rank=32, text_rows=512)
QUICK = dict(wan="tiny-vace", vae="tiny", compact="tiny", vlm="tiny", height=16, width=16, num_frames=5,
             num_steps=2, group_size=2, prompts_per_epoch=2, batch=2, n_ref=2, reference_size=(24, 24),
             lora_rank=4, text_rows=4)
PROMPTS = ["A man in a red jacket and a woman with short grey hair talk on a park bench in autumn.",
           "Two friends walk side by side along a beach at sunset, laughing.",
           "A chef in a white uniform hands a plate to a young waiter in a busy kitchen.",
           "An old man and a girl play chess by a window, rain on the glass."]
MODES = {"idgrpo": BaselineFlags(), "baseline": BaselineFlags.all_on()}
KERNELS = {"idgrpo": None, "baseline": "reference"}
"""IDGRPO_KERNELS per mode (None: left as the process has it)."""


@contextlib.contextmanager
def kernel_backend(name: str | None):
    """Every idgrpo kernel op through `name` (IDGRPO_KERNELS, idgrpo.kernels.backend) for the duration; the
    previous setting restored afterwards. None: unchanged."""
    previous = os.environ.get(KERNELS_ENV_VAR)
    if name is not None:
        os.environ[KERNELS_ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(KERNELS_ENV_VAR, None)
        else:
            os.environ[KERNELS_ENV_VAR] = previous


class RandomText:
    """Stands in for the prompt cache: a fixed random (rows, text_dim) embedding per prompt (hash-seeded)."""

    def __init__(self, rows: int, dim: int, device: torch.device, dtype: torch.dtype):
        self.rows, self.dim, self.device, self.dtype = rows, dim, device, dtype
        self._cache: dict[str, torch.Tensor] = {}

    def _embed(self, text: str) -> torch.Tensor:
        if text not in self._cache:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2 ** 63)
            gen = torch.Generator().manual_seed(seed)
            self._cache[text] = torch.randn(self.rows, self.dim, generator=gen).to(self.device, self.dtype)
        return self._cache[text]

    def lookup(self, prompts):
        return torch.stack([self._embed(p) for p in prompts])  # (B, rows, D)

    def negative(self, batch):
        return self._embed("<negative prompt>")[None].expand(batch, -1, -1)


class SwitchableReward:
    """score(frames, references, prompts) of a reward model whose attention follows the trainer's mode: SDPA when
    the baseline's `sdpa_attention` is on (the straightforward reward model), idgrpo's otherwise."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model
        self.impl = "idgrpo"

    def __call__(self, frames, references, prompts):
        self.model.set_attention_impl(self.impl)  # both reward models take the same switch
        return self.model.score(frames, references, prompts)


def compact_reward(preset: str, device, dtype) -> SwitchableReward:
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig.from_name(preset)).to(device=device, dtype=dtype).eval()
    return SwitchableReward(f"compact-{preset}", model)


def vlm_reward(preset: str, device, dtype, quick: bool) -> SwitchableReward:
    from bench.reward import build_vlm_reward

    model, _ = build_vlm_reward(preset, device, dtype, quick)
    return SwitchableReward(f"qwen2.5-vl-{preset}", model)


def build_trainer(recipe: dict, score: SwitchableReward, device: torch.device, run_dir: str) -> GRPOTrainer:
    """A GRPO trainer on the VACE policy (random weights + LoRA), the Wan VAE (random weights), random text."""
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanConfig, WanDiT
    from idgrpo.models.wan_vae import WanVAE, WanVAEConfig
    from idgrpo.rl.recipe import vace_conditioning_builder

    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    config = RecipeConfig.from_name(
        "vace-1.3b", height=recipe["height"], width=recipe["width"], num_frames=recipe["num_frames"],
        num_steps=recipe["num_steps"], group_size=recipe["group_size"],
        prompts_per_epoch=recipe["prompts_per_epoch"], rollout_batch_size=recipe["batch"],
        train_batch_size=recipe["batch"], lora_rank=recipe["lora_rank"], lora_alpha=float(recipe["lora_rank"]),
        epochs=1, eval_every=0, save_every=10 ** 6, resume=False, run_dir=run_dir,
        activation_checkpointing=True, compute_dtype="bfloat16" if cuda else "float32")
    torch.manual_seed(0)
    wan = WanConfig.from_name(recipe["wan"])
    with torch.device("meta"):
        policy = WanDiT(wan)
    policy = policy.to_empty(device=device).init_weights()  # fp32 master weights, bf16 compute in the engine
    apply_lora(policy, config.lora_rank, config.lora_alpha, init="gaussian")
    mark_only_lora_trainable(policy)
    vae = WanVAE(WanVAEConfig.from_name(recipe["vae"])).to(device=device, dtype=compute).requires_grad_(False).eval()
    text = RandomText(recipe["text_rows"], wan.text_dim, device, compute)
    gen = torch.Generator().manual_seed(1)
    rows = [PromptRow(p, [torch.randint(0, 256, (*recipe["reference_size"], 3), dtype=torch.uint8, generator=gen
                                        ).to(device) for _ in range(recipe["n_ref"])]) for p in PROMPTS]
    lat_frames = (config.num_frames - 1) // 4 + 1
    shape = (16, lat_frames + recipe["n_ref"], config.height // 8, config.width // 8)

    def decode(latents):
        return vae.decode_frames(latents.to(vae.dtype))

    return GRPOTrainer(config.grpo, policy, score=score, decode=decode, latent_shape=shape, train_rows=rows,
                       build_conditioning=vace_conditioning_builder(vae, text, config, recipe["n_ref"]),
                       lora=True, log=lambda message: None)


def run_epoch(trainer: GRPOTrainer, config: GRPOConfig, score: SwitchableReward, mode: str, epoch: int,
              **overrides) -> dict:
    """One epoch of `config` (with `overrides`: the warm-up's smaller epoch) in `mode`; returns its wall-time split,
    peak memory and diagnostics."""
    flags = MODES[mode]
    trainer.config = dataclasses.replace(config, **overrides)
    score.impl = "sdpa" if flags.sdpa_attention else "idgrpo"
    device = trainer.device
    timer = PhaseTimer(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with kernel_backend(KERNELS[mode]):
        record = trainer.train_epoch(epoch, baseline=flags, timer=timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    trainer.config = config
    out = {"epoch_s": seconds,
           **{f"{k}_s": timer.seconds.get(k, 0.0) for k in ("rollout", "reward", "advantage", "update")},
           "reward_busy_s": timer.reward_busy_s, "trained_samples": record["trained_samples"],
           "reward_mean": record["reward_mean"], "loss": record.get("loss")}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def measure(recipe: dict, score: SwitchableReward, device: torch.device, run_dir: str) -> list[dict]:
    trainer = build_trainer(recipe, score, device, run_dir)
    cfg = trainer.config
    samples = cfg.prompts_per_epoch * cfg.group_size
    wan = trainer.policy.module.config
    branches = 2  # CFG: conditional + negative prompt
    update_flops_per_sample_step = 2 * branches * forward_flops(wan, trainer.latent_shape)
    peak = _peak(device)
    # Warm-up: one small epoch per mode on the same shapes (rollout batch and micro-batch unchanged).
    warm = dict(prompts_per_epoch=1, group_size=min(cfg.group_size, cfg.rollout_batch_size))
    for mode in MODES:
        run_epoch(trainer, cfg, score, mode, 0, **warm)
    rows = []
    for rep in range(REPETITIONS):
        pair = {}
        state = copy.deepcopy(trainer.state_dict())
        for mode in MODES:
            trainer.load_state_dict(state)  # both modes train the same epoch from the same weights
            result = run_epoch(trainer, cfg, score, mode, 1 + rep)
            flops = result["trained_samples"] * cfg.num_trained_steps * update_flops_per_sample_step
            row = {"reward_model": score.name, "mode": mode, "rep": rep, "samples": samples, **result,
                   "samples_per_s": samples / result["epoch_s"],
                   "update_tflops": flops / max(result["update_s"], 1e-12) / 1e12}
            if peak:
                row["update_mfu"] = row["update_tflops"] * 1e12 / peak
            pair[mode] = row
            rows.append(row)
        pair["idgrpo"]["speedup_vs_baseline"] = pair["baseline"]["epoch_s"] / pair["idgrpo"]["epoch_s"]
        # Sanity: the baseline computes the same epoch (bf16 on GPU: rounding differs between the two paths).
        pair["baseline"]["reward_diff"] = abs(pair["baseline"]["reward_mean"] - pair["idgrpo"]["reward_mean"])
    for mode in MODES:
        times = [r["epoch_s"] for r in rows if r["mode"] == mode]
        spread = (max(times) - min(times)) / (sum(times) / len(times))
        for r in rows:
            if r["mode"] == mode:
                r["spread"] = spread
    trainer.reward_worker.close()
    return rows


def main(quick: bool = False) -> list[dict]:
    import tempfile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = quick or device.type != "cuda"
    recipe = QUICK if small else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chosen = [m.strip() for m in os.environ.get("IDGRPO_E2E_REWARDS", ",".join(REWARD_MODELS)).split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(REWARD_MODELS))
    if unknown or REPETITIONS < 1:
        raise ValueError(f"IDGRPO_E2E_REWARDS={chosen} / IDGRPO_E2E_REPS={REPETITIONS}: choose from "
                         f"{REWARD_MODELS} and at least 1 repetition")
    rewards = [lambda: compact_reward(recipe["compact"], device, dtype)] if "compact" in chosen else []
    vlm = "vlm" in chosen and importlib.util.find_spec("tokenizers") is not None
    if vlm:
        rewards.append(lambda: vlm_reward(recipe["vlm"], device, dtype, small))
    rows = []
    with tempfile.TemporaryDirectory(prefix="idgrpo-bench-e2e-") as run_dir:
        for build in rewards:
            score = build()
            rows += measure(recipe, score, device, run_dir)
            del score
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    columns = ["reward_model", "mode", "rep", "samples", "epoch_s", "rollout_s", "reward_s", "reward_busy_s",
               "advantage_s", "update_s", "samples_per_s", "update_tflops", "update_mfu", "peak_mem_gib",
               "speedup_vs_baseline", "spread", "reward_diff"]
    extra = {"recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
             "cfg": 4.5, "trained_steps": GRPOConfig.from_name("vace-1.3b", num_steps=recipe["num_steps"])
             .num_trained_steps, "kl_beta": 0.004, "repetitions": REPETITIONS,
             "modes": {m: {**dataclasses.asdict(f), "eager_kernels": KERNELS[m] == "reference"}
                       for m, f in MODES.items()},
             "vlm_reward": "qwen2.5-vl-" + recipe["vlm"] if vlm else ("skipped: not chosen" if "vlm" not in chosen
                                                                 else "skipped: `tokenizers` is not importable"),
             "flop_convention": "update: 2 x bench.dit.forward_flops per CFG branch x trained samples x trained "
                                "steps (forward + activation-gradient backward; frozen base weights; LoRA "
                                "matmuls, checkpoint recompute and KL reference forwards not counted)",
             "timing": "wall clock, main CUDA stream synchronized at phase boundaries; reward_s = reward time not "
                       "hidden behind the rollout; spread = (max - min) / mean of epoch_s over repetitions"}
    if small:
        extra["caveat"] = "CPU run of tiny presets (tiny VACE DiT, tiny VAE, tiny reward models, 2 steps, group " \
                          "2): checks that the benchmark works, not performance"
    report("e2e", rows, columns, extra)
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
