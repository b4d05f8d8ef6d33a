"""`idgrpo train-grpo <preset> [flags]`: build the policy, decoder, conditioning and reward of a preset and train.

Usage:
    idgrpo train-grpo tiny                                   # CPU, the toy flow policy + brightness reward
    idgrpo train-grpo tiny --model tiny                      # CPU, the tiny Wan DiT + LoRA (the real model path)
    torchrun --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b --train-csv data/train.csv --test-csv data/test.csv \
        --weights-dir ckpt/Wan2.1-VACE-1.3B-diffusers/transformer --vae-path ckpt/Wan2.1_VAE.pth \
        --prompt-cache cache/prompts.safetensors --reward my_rewards:build --extra checkpoint=ckpt/identity-rm
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m idgrpo train-grpo phantom-1.3b ...

Models:
- toy: `idgrpo.rl.toy.ToyFlowPolicy` on a (4, F_lat, H/8, W/8) latent; decode = channels 0..2 as RGB.
- tiny: the tiny Wan DiT (random init, seeded) with LoRA; prompt embeddings are hashed stand-ins; toy decode.
- vace-1.3b: Wan2.1-VACE-1.3B + LoRA; 96-channel VACE context from the references (prepended latent slots);
  text from the `encode-prompts` cache; the Wan VAE decodes rollouts for the reward.
- phantom-1.3b: Phantom-Wan-1.3B + LoRA; clean reference latents appended in time and re-injected every step;
  three-pass guidance (`guidance` = text scale, `guidance_image`).
The reward is `config.reward` = "module:function", a factory called as factory(config, device) -> score callable
(the identity reward model's factory for the 1.3B presets), so `rl` never imports `idgrpo.reward`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Annotated

import torch
import tyro

from idgrpo.engine import init_distributed
from idgrpo.rl.config import PRESETS, GRPOConfig
from idgrpo.rl.sampler import cfg_conditioning, phantom_conditioning
from idgrpo.rl.toy import ToyFlowPolicy, prompt_context, toy_conditioning, toy_decode
from idgrpo.rl.trainer import GRPOTrainer, PromptRow, read_rows

DEMO_PROMPTS = ("a red ball rolls", "two people shake hands", "a cat on a sofa", "waves at sunset")


def load_reward(spec: str, config: GRPOConfig, device: torch.device):
    """Resolve "module:function" and call it as factory(config, device) -> score callable."""
    if ":" not in spec:
        raise ValueError(f"reward={spec!r}: pass --reward module:function, a factory(config, device) returning "
                         "score(frames, references, prompts) -> (B,)")
    module, function = spec.split(":", 1)
    factory = getattr(importlib.import_module(module), function)
    return factory(config, device)


def vace_conditioning_builder(vae, text, config: GRPOConfig, n_ref: int):
    """rows -> Conditioning for Wan-VACE: the 96-channel context from the references (subject-to-video: no source
    video, all-ones mask; references prepended in time, in diffusers' reversed order unless
    `config.diffusers_ref_order` is off), text from `text.lookup`, the negative prompt
    from `text.negative`, the same VACE context in both CFG branches; the n_ref leading latent slots are dropped
    before decoding. `text` is a `PromptCache` (or anything with `lookup(prompts)` / `negative(batch)`)."""
    from idgrpo.models.conditioning import vace_context

    def build(rows):
        context = vace_context(vae, [r.references for r in rows], config.num_frames, config.height, config.width,
                               diffusers_ref_order=config.diffusers_ref_order)
        prompts = text.lookup([r.prompt for r in rows])
        return cfg_conditioning({"context": prompts, "vace_context": context.float()},
                                {"context": text.negative(len(rows)), "vace_context": context.float()},
                                config.guidance, drop_front=n_ref)

    return build


def phantom_conditioning_builder(vae, text, config: GRPOConfig):
    """rows -> Conditioning for Phantom: clean reference latents appended in time and re-injected at every step,
    three-pass guidance (text scale `config.guidance`, image scale `config.guidance_image`)."""
    from idgrpo.models.conditioning import phantom_reference_latents

    def build(rows):
        ref_latents = phantom_reference_latents(vae, [r.references for r in rows], config.height, config.width)
        return phantom_conditioning({"context": text.lookup([r.prompt for r in rows])},
                                    {"context": text.negative(len(rows))}, ref_latents.float(),
                                    guidance_image=config.guidance_image, guidance_text=config.guidance)

    return build


def _rows(config: GRPOConfig, path: str | None, *, needs_references: bool) -> list[PromptRow]:
    if path is None:
        if needs_references:
            raise ValueError(f"model {config.model!r} needs --train-csv (ref_paths,prompt) with reference images")
        return [PromptRow(p) for p in DEMO_PROMPTS]
    return read_rows(path, load_images=needs_references)


def build_trainer(config: GRPOConfig) -> GRPOTrainer:
    """The trainer of a config: policy + LoRA, decoder, conditioning, reward, data."""
    info = init_distributed()
    device = info.device
    torch.manual_seed(config.seed)
    needs_refs = config.model in ("vace-1.3b", "phantom-1.3b")
    train_rows = _rows(config, config.train_csv, needs_references=needs_refs)
    eval_rows = _rows(config, config.test_csv, needs_references=needs_refs) if config.test_csv else (
        train_rows[:2] if not needs_refs else [])
    score = load_reward(config.reward, config, device)
    lat_frames = (config.num_frames - 1) // 4 + 1
    h, w = config.height // 8, config.width // 8

    if config.model == "toy":
        shape = (4, lat_frames, h, w)
        policy = ToyFlowPolicy(shape, seed=config.seed)

        def build(rows):
            return toy_conditioning([r.prompt for r in rows], config.guidance, device=device)

        return GRPOTrainer(config, policy, score=score, decode=toy_decode, build_conditioning=build,
                           latent_shape=shape, train_rows=train_rows, eval_rows=eval_rows)

    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanConfig, WanDiT

    if config.model == "tiny":
        wan = WanConfig.from_name("tiny")
        policy = WanDiT(wan).init_weights()
        shape = (wan.in_dim, lat_frames, h, w)
        if config.lora_rank > 0:
            apply_lora(policy, config.lora_rank, config.lora_alpha)
            mark_only_lora_trainable(policy)

        def text(prompts):
            return torch.stack([prompt_context(p, wan.text_dim) for p in prompts])[:, None].to(device)  # (B, 1, D)

        def build(rows):
            context = text([r.prompt for r in rows])
            return cfg_conditioning({"context": context}, {"context": torch.zeros_like(context)}, config.guidance)

        return GRPOTrainer(config, policy, score=score, decode=toy_decode, build_conditioning=build,
                           latent_shape=shape, train_rows=train_rows, eval_rows=eval_rows)

    # The 1.3B models: weights, VAE, prompt cache, references.
    from idgrpo.models.prompt_cache import PromptCache
    from idgrpo.models.wan_vae import WanVAE
    from idgrpo.models.weights import load_wan_dit

    for name in ("weights_dir", "vae_path", "prompt_cache"):
        if getattr(config, name) is None:
            raise ValueError(f"model {config.model!r} needs --{name.replace('_', '-')}")
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, config.compute_dtype)
    policy = load_wan_dit(config.weights_dir, config.model, dtype=torch.float32, device=device)
    if config.lora_rank > 0:
        apply_lora(policy, config.lora_rank, config.lora_alpha, init="gaussian")
        mark_only_lora_trainable(policy)
    vae = WanVAE.from_pretrained(config.vae_path, dtype=dtype, device=device).requires_grad_(False).eval()
    cache = PromptCache(config.prompt_cache, device=device, dtype=dtype)
    n_refs = {len(r.references) for r in train_rows + list(eval_rows)}
    if len(n_refs) != 1:
        raise ValueError(f"every row needs the same number of reference images (it sets the latent length), "
                         f"found counts {sorted(n_refs)}")
    n_ref = n_refs.pop()
    shape = (16, lat_frames + n_ref, h, w)

    def decode(latents):
        return vae.decode_frames(latents.to(vae.dtype))

    if config.model == "vace-1.3b":
        build = vace_conditioning_builder(vae, cache, config, n_ref)
    else:
        build = phantom_conditioning_builder(vae, cache, config)

    return GRPOTrainer(config, policy, score=score, decode=decode, build_conditioning=build, latent_shape=shape,
                       train_rows=train_rows, eval_rows=eval_rows, lora=config.lora_rank > 0, compute_dtype=dtype)


PresetConfig = tyro.extras.subcommand_type_from_defaults(
    {name: dataclasses.replace(cfg) for name, cfg in PRESETS.items()},
    {"tiny": "CPU demo (toy flow policy or --model tiny)", "vace-1.3b": "the Identity-GRPO reference recipe",
     "phantom-1.3b": "Phantom-Wan-1.3B with the same GRPO settings"},
    prefix_names=False,
)


def train_grpo(config: Annotated[PresetConfig, tyro.conf.arg(name="")]) -> int:
    """Identity-GRPO training of a Wan2.1 video model (see `idgrpo.rl.recipe`)."""
    trainer = build_trainer(config)
    history = trainer.train()
    if history and trainer.rank == 0:
        last = history[-1]
        print(f"train-grpo: {len(history)} epochs, last reward {last['reward_mean']:.4f}; run dir {trainer.run_dir}")
    return 0
