"""`idgrpo train-grpo <preset> [flags]`: build the policy, decoder, conditioning and reward of a `RecipeConfig` and
train.

Usage:
    idgrpo train-grpo tiny                                   # CPU, the toy flow policy + brightness reward
    idgrpo train-grpo tiny --model tiny                      # CPU, the tiny Wan DiT + LoRA (the real model path)
    torchrun --nproc-per-node 8 -m idgrpo train-grpo vace-1.3b --train-csv data/train.csv --test-csv data/test.csv \
        --weights-dir ckpt/Wan2.1-VACE-1.3B-diffusers/transformer --vae-path ckpt/Wan2.1_VAE.pth \
        --prompt-cache cache/prompts.safetensors --reward my_rewards:build --extra checkpoint ckpt/identity-rm
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m idgrpo train-grpo phantom-1.3b ...

Every field of `RecipeConfig` and of its algorithm `GRPOConfig` is a flag (`--model`, `--lr`, ...).

Models (`--model`):
- toy: `idgrpo.rl.toy.ToyFlowPolicy` on a (4, F_lat, H/8, W/8) latent; decode = channels 0..2 as RGB. The `tiny`
  preset's default.
- tiny: the tiny Wan DiT (`WanConfig.from_name("tiny")`, random init, seeded) with LoRA; prompt embeddings are
  hashed stand-ins; toy decode.
- vace-1.3b: Wan2.1-VACE-1.3B + LoRA (fresh, or `init_lora`'s); 96-channel VACE context from the references
  (first resized as diffusers' pipeline does; prepended latent slots); text from the `encode-prompts` cache; the Wan
  VAE (`vae_dtype`) decodes rollouts for the reward.
- phantom-1.3b: Phantom-Wan-1.3B + LoRA; clean reference latents appended in time and re-injected every step;
  three-pass guidance (`guidance` = text scale, `guidance_image`).
- t2v-1.3b, t2v-14b: Wan2.1 text-to-video, no references; any reward but the identity reward's (which needs them).
- vace-14b, phantom-14b: as the 1.3B ones at 14B. The 14B presets fit on 8 (LoRA) or 16 (full fine-tuning) GPUs of
  80 GB with `--sp-size` (sequence parallelism); `idgrpo plan <preset> --nproc-per-node N --sp-size S` prints the
  memory per GPU and the launch command (docs/scale-out.md).
The reward is `config.reward` = "module:function", a factory called as factory(config, device) -> `RewardFn`
(the identity reward model's factory for the 1.3B presets), so `rl` never imports `idgrpo.reward`. Evaluation runs
at `config.eval_size` with its own conditioning. docs/recipe.md relates every setting to the official script.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Annotated

import torch
import tyro

from idgrpo.engine import init_distributed, open_run
from idgrpo.errors import UsageError, flag
from idgrpo.prompts import PromptRow, read_prompts
from idgrpo.rl.config import PRESETS, RecipeConfig
from idgrpo.rl.rollout import RewardFn
from idgrpo.rl.sampler import cfg_conditioning, phantom_conditioning
from idgrpo.rl.toy import ToyFlowPolicy, prompt_context, toy_conditioning, toy_decode
from idgrpo.rl.trainer import GRPOTrainer

DEMO_PROMPTS = ("a red ball rolls", "two people shake hands", "a cat on a sofa", "waves at sunset")


def load_reward(spec: str, config: RecipeConfig, device: torch.device) -> RewardFn:
    """Resolve "module:function" and call it as factory(config, device) -> `RewardFn`. A spec that names no
    function, and a factory that returns no callable, are refused (`UsageError` naming the factory)."""
    module, sep, function = spec.partition(":")
    if not (sep and module and function):
        raise UsageError(f"--reward {spec!r}: pass --reward module:function, a factory(config, device) returning "
                         "score(frames, references, prompts) -> (B,)")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module exists; one of its own imports is missing
        raise UsageError(f"--reward {spec}: no module {module!r} (is it on PYTHONPATH?)") from None
    factory = getattr(found, function, None)
    if not callable(factory):
        raise UsageError(f"--reward {spec}: module {module!r} has no function {function!r}")
    score = factory(config, device)
    if not callable(score):
        raise UsageError(f"--reward {spec}: the factory returned {type(score).__name__}, not a callable "
                         "score(frames, references, prompts) -> (B,)")
    return score


# Note [PIL Lanczos]: diffusers' image processor resizes with PIL's LANCZOS filter, which PIL runs as two separable
# 8-bit passes (a pass only along an axis whose size changes): per output pixel the Lanczos-3 taps (widened by the
# downscale factor) are normalised to sum 1, quantised to 22-bit fixed point, and each pass accumulates integers from
# 2^21, shifts right by 22 and clamps to uint8. The taps below are computed with Python floats (the C library's sin,
# the C evaluation order), so each pass equals PIL's pixel for pixel. The horizontal pass runs first, as in Pillow
# 10.4 (the version the Identity-GRPO environment pins) through 12; Pillow 13 may run the vertical pass first, which
# moves some pixels by a few levels when both sides change.
_PIL_PRECISION_BITS = 22


def _lanczos(x: float) -> float:
    if not -3.0 <= x < 3.0:
        return 0.0

    def sinc(v: float) -> float:
        if v == 0.0:
            return 1.0
        v = v * math.pi
        return math.sin(v) / v

    return sinc(x) * sinc(x / 3)


@functools.lru_cache(maxsize=256)
def _pil_lanczos_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's taps along one axis: source indices and fixed-point weights, both int64 (out_size, taps)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    index = torch.zeros(out_size, ksize, dtype=torch.int64)
    weight = torch.zeros(out_size, ksize, dtype=torch.int64)
    for out in range(out_size):
        center = 0.0 + (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        taps = [_lanczos(((x + first) - center + 0.5) * (1.0 / filterscale)) for x in range(count)]
        total = 0.0
        for tap in taps:
            total += tap
        for x, tap in enumerate(taps):
            tap = tap / total if total != 0.0 else tap
            scaled = tap * (1 << _PIL_PRECISION_BITS)
            weight[out, x] = int(scaled - 0.5) if tap < 0 else int(scaled + 0.5)
            index[out, x] = first + x
    return index, weight


def _pil_lanczos_pass(pixels: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """One PIL pass along `axis` (0 rows, 1 columns) of uint8 (H, W, C) to `size`."""
    index, weight = _pil_lanczos_taps(pixels.shape[axis], size)
    index, weight = index.to(pixels.device), weight.to(pixels.device)
    x = pixels.long()
    shape = (size, 1, 1) if axis == 0 else (1, size, 1)
    acc = torch.full(x.shape[:axis] + (size,) + x.shape[axis + 1:], 1 << (_PIL_PRECISION_BITS - 1),
                     dtype=torch.int64, device=pixels.device)
    for t in range(index.shape[1]):  # integer sums: the order of the taps does not matter
        acc += x.index_select(axis, index[:, t]) * weight[:, t].reshape(shape)
    return (acc >> _PIL_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def pil_lanczos_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (h, w, C) -> uint8 (height, width, C), equal to Pillow 10.4's `Image.resize((width, height), LANCZOS)`
    (Note [PIL Lanczos])."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (h, w, C) image, got {image.dtype} {tuple(image.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if image.shape[1] != width:
        image = _pil_lanczos_pass(image, width, axis=1)
    if image.shape[0] != height:
        image = _pil_lanczos_pass(image, height, axis=0)
    return image


def diffusers_reference_image(image: torch.Tensor) -> torch.Tensor:
    """A reference image as diffusers' WanVACEPipeline first prepares it: resized (PIL Lanczos) to its size rounded
    down to multiples of 8 (unchanged when it already is), before it is fitted into the video frame."""
    h, w = image.shape[0] - image.shape[0] % 8, image.shape[1] - image.shape[1] % 8
    if h < 8 or w < 8:
        raise ValueError(f"reference image of {image.shape[0]}x{image.shape[1]} pixels is smaller than 8x8")
    return pil_lanczos_resize(image, h, w)


def vace_conditioning_builder(vae, text, config: RecipeConfig, n_ref: int):
    """rows -> Conditioning for Wan-VACE: the 96-channel context from the references (subject-to-video: no source
    video, all-ones mask; references first resized as diffusers does when `config.diffusers_ref_resize`, prepended
    in time, in diffusers' reversed order unless `config.diffusers_ref_order` is off), text from `text.lookup`, the
    negative prompt from `text.negative`, the same VACE context in both CFG branches; the n_ref leading latent slots
    are dropped before decoding. `text` is a `PromptCache` (or anything with `lookup(prompts)` / `negative(batch)`).
    The video size is `config.height`, `config.width`, `config.num_frames`."""
    from idgrpo.models.conditioning import vace_context

    def build(rows):
        references = [r.references for r in rows]
        if config.diffusers_ref_resize:
            references = [[diffusers_reference_image(image) for image in refs] for refs in references]
        context = vace_context(vae, references, config.num_frames, config.height, config.width,
                               diffusers_ref_order=config.diffusers_ref_order)
        prompts = text.lookup([r.prompt for r in rows])
        return cfg_conditioning({"context": prompts, "vace_context": context.float()},
                                {"context": text.negative(len(rows)), "vace_context": context.float()},
                                config.guidance, drop_front=n_ref)

    return build


def text_conditioning_builder(text, config: RecipeConfig):
    """rows -> Conditioning for text-to-video: the prompt's embedding from `text.lookup` against the negative prompt's
    (`text.negative`), classifier-free guidance at `config.guidance`; no references."""

    def build(rows):
        return cfg_conditioning({"context": text.lookup([r.prompt for r in rows])},
                                {"context": text.negative(len(rows))}, config.guidance)

    return build


def phantom_conditioning_builder(vae, text, config: RecipeConfig):
    """rows -> Conditioning for Phantom: clean reference latents appended in time and re-injected at every step,
    three-pass guidance (text scale `config.guidance`, image scale `config.guidance_image`)."""
    from idgrpo.models.conditioning import phantom_reference_latents

    def build(rows):
        ref_latents = phantom_reference_latents(vae, [r.references for r in rows], config.height, config.width)
        return phantom_conditioning({"context": text.lookup([r.prompt for r in rows])},
                                    {"context": text.negative(len(rows))}, ref_latents.float(),
                                    guidance_image=config.guidance_image, guidance_text=config.guidance)

    return build


def _rows(config: RecipeConfig, path: str | None, *, needs_references: bool) -> list[PromptRow]:
    if path is None:
        if needs_references:
            raise UsageError(f"--model {config.model} needs --train-csv (ref_paths,prompt) with reference images")
        return [PromptRow(p) for p in DEMO_PROMPTS]
    return read_prompts(path, references="load" if needs_references else "paths")


def build_trainer(config: RecipeConfig) -> GRPOTrainer:
    """The trainer of a recipe: policy + LoRA, decoder, conditioning, reward, data, and `config.grpo`."""
    from idgrpo.models.wan_dit import WanConfig

    info = init_distributed(config.collective_timeout)
    device = info.device
    torch.manual_seed(config.grpo.seed)
    wan = None if config.model == "toy" else WanConfig.from_name(config.model)
    _check_layout(config, wan, info.world_size)
    needs_refs = wan is not None and wan.reference_mode != "none"
    if config.model.startswith("t2v-") and config.reward.startswith("idgrpo.reward.factories:"):
        raise UsageError(f"--reward {config.reward}: the identity reward scores each person against the reference "
                         f"images of their prompt row, and --model {config.model} generates from text alone (no "
                         f"references); pass a text-to-video reward, --reward MODULE:FACTORY "
                         f"(docs/scale-out.md#text-to-video)")
    train_rows = _rows(config, config.train_csv, needs_references=needs_refs)
    eval_rows = _rows(config, config.test_csv, needs_references=needs_refs) if config.test_csv else (
        train_rows[:2] if not needs_refs else [])
    score = load_reward(config.reward, config, device)
    eval_config = dataclasses.replace(config, height=config.eval_size[0], width=config.eval_size[1],
                                      num_frames=config.eval_size[2])

    def latent_grid(c: RecipeConfig) -> tuple[int, int, int]:
        return (c.num_frames - 1) // 4 + 1, c.height // 8, c.width // 8

    if config.model == "toy":
        shape = (4, *latent_grid(config))
        policy = ToyFlowPolicy(shape, seed=config.grpo.seed)

        def build(rows):
            return toy_conditioning([r.prompt for r in rows], config.guidance, device=device)

        return GRPOTrainer(config.grpo, policy, score=score, decode=toy_decode, build_conditioning=build,
                           latent_shape=shape, train_rows=train_rows, eval_rows=eval_rows)

    from idgrpo.models.lora import apply_lora, load_peft, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanDiT

    def add_lora(policy) -> None:
        """LoRA adapters: the `init_lora` directory's (rank, alpha, targets and weights) or fresh gaussian ones."""
        if config.lora_rank == 0:
            return
        if config.init_lora is not None:
            load_peft(policy, config.init_lora)
        else:
            apply_lora(policy, config.lora_rank, config.lora_alpha, init="gaussian")
        mark_only_lora_trainable(policy)

    if config.model == "tiny":
        policy = WanDiT(wan).init_weights()
        shape = (wan.in_dim, *latent_grid(config))
        add_lora(policy)

        def text(prompts):
            return torch.stack([prompt_context(p, wan.text_dim) for p in prompts])[:, None].to(device)  # (B, 1, D)

        def build(rows):
            context = text([r.prompt for r in rows])
            return cfg_conditioning({"context": context}, {"context": torch.zeros_like(context)}, config.guidance)

        return GRPOTrainer(config.grpo, policy, score=score, decode=toy_decode, build_conditioning=build,
                           latent_shape=shape, train_rows=train_rows, eval_rows=eval_rows,
                           eval_latent_shape=(wan.in_dim, *latent_grid(eval_config)))

    # The real models: weights, VAE, prompt cache, references (VACE, Phantom) or none (T2V).
    from idgrpo.engine import FSDP
    from idgrpo.models.prompt_cache import PromptCache
    from idgrpo.models.wan_vae import WanVAE
    from idgrpo.models.weights import load_wan_dit

    for name in ("weights_dir", "vae_path", "prompt_cache"):
        if getattr(config, name) is None:
            raise UsageError(f"--model {config.model} needs {flag(name)}")
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, config.grpo.compute_dtype)
    # Note: the weights load on the host, and FSDP moves this rank's shards to the device unit by unit, so no GPU
    # ever holds a whole 14B model. A LoRA run's frozen base loads in the compute dtype FSDP keeps it in (the same
    # rounding as converting later), halving the host memory; full fine-tuning keeps fp32 masters.
    policy = load_wan_dit(config.weights_dir, config.model, dtype=torch.float32 if config.lora_rank == 0 else dtype,
                          device="cpu")
    add_lora(policy)
    reference = None
    if config.lora_rank == 0 and config.grpo.kl_beta > 0 and config.grpo.reference == "copy":
        # The frozen KL reference read again in the compute dtype, rather than a deep copy of the fp32 policy.
        frozen = load_wan_dit(config.weights_dir, config.model, dtype=dtype, device="cpu").requires_grad_(False)
        reference = FSDP(frozen, compute_dtype=dtype)
    vae_dtype = torch.float32 if device.type == "cpu" else getattr(torch, config.vae_dtype)
    vae = WanVAE.from_pretrained(config.vae_path, dtype=vae_dtype, device=device).requires_grad_(False).eval()
    cache = PromptCache(config.prompt_cache, device=device, dtype=dtype)
    n_refs = {len(r.references) for r in train_rows + list(eval_rows)}
    if len(n_refs) != 1:
        raise ValueError(f"every row needs the same number of reference images (it sets the latent length), "
                         f"found counts {sorted(n_refs)}")
    n_ref = n_refs.pop()

    def shape_of(c: RecipeConfig) -> tuple[int, int, int, int]:
        frames, h, w = latent_grid(c)
        return 16, frames + n_ref, h, w

    def decode(latents):
        return vae.decode_frames(latents.to(vae.dtype))

    def builder(c: RecipeConfig):
        if wan.reference_mode == "vace":
            return vace_conditioning_builder(vae, cache, c, n_ref)
        if wan.reference_mode == "phantom":
            return phantom_conditioning_builder(vae, cache, c)
        return text_conditioning_builder(cache, c)

    return GRPOTrainer(config.grpo, policy, score=score, decode=decode, build_conditioning=builder(config),
                       latent_shape=shape_of(config), train_rows=train_rows, eval_rows=eval_rows,
                       reference=reference, lora=config.lora_rank > 0, eval_latent_shape=shape_of(eval_config),
                       build_eval_conditioning=builder(eval_config))


def _check_layout(config: RecipeConfig, wan, world_size: int) -> None:
    """--sp-size against the world and the policy, before anything is loaded (docs/scale-out.md)."""
    sp = config.grpo.sp_size
    if sp == 1:
        return
    if wan is None:
        raise UsageError(f"--sp-size {sp}: sequence parallelism splits a transformer's tokens; the toy policy has "
                         f"none (--model tiny or a Wan preset)")
    if world_size % sp:
        raise UsageError(f"--sp-size {sp} must divide the world size {world_size} (torchrun's --nnodes x "
                         f"--nproc-per-node)")
    if wan.num_heads % sp:
        raise UsageError(f"--sp-size {sp} must divide the {wan.num_heads} attention heads of --model {config.model} "
                         f"(each rank attends with heads / sp of them)")


PresetConfig = tyro.extras.subcommand_type_from_defaults(
    {name: dataclasses.replace(cfg) for name, cfg in PRESETS.items()},
    {"tiny": "A CPU run in seconds: the toy flow policy (--model toy, the default) or, with --model tiny, the tiny "
             "Wan DiT + LoRA; brightness reward",
     "vace-1.3b": "The Identity-GRPO reference recipe: Wan2.1-VACE-1.3B + LoRA",
     "phantom-1.3b": "Phantom-Wan-1.3B + LoRA with the same GRPO settings",
     "t2v-1.3b": "Flow-GRPO's Wan2.1 text-to-video recipe: Wan2.1-T2V-1.3B + LoRA, any text-to-video reward",
     "t2v-14b": "Wan2.1-T2V-14B full fine-tuning at 480x832x81 (launch with --sp-size; idgrpo plan t2v-14b)",
     "vace-14b": "Identity-GRPO on Wan2.1-VACE-14B + LoRA at 480x832x81 (launch with --sp-size; idgrpo plan)",
     "phantom-14b": "Identity-GRPO on Phantom-Wan-14B + LoRA at 480x832x81 (launch with --sp-size; idgrpo plan)"},
    prefix_names=False,
)


RESUMABLE_SETTINGS = frozenset(f"grpo.{name}" for name in (
    "epochs", "eval_every", "eval_videos", "save_every", "max_undone_steps", "max_reward_failures", "overlap_reward",
    "rollout_batch_size", "train_batch_size", "grad_accumulation", "activation_checkpointing", "sp_size",
)) | {"collective_timeout"}
"""The `run_settings` keys a resumed run may change: how long it runs, what it logs and saves, how long a collective
waits, and how an epoch is batched and where its memory goes, never what it computes; any other change is refused
(docs/reliability.md)."""


def _settings_flag(key: str) -> str:
    """A `run_settings` key as the flag that sets it: `grpo.lr` -> `--lr`, `extra.reward_checkpoint` ->
    `--extra reward_checkpoint`."""
    if key.startswith("extra."):
        return f"--extra {key.removeprefix('extra.')}"
    return flag(key.removeprefix("grpo."))


def train_grpo(config: Annotated[PresetConfig, tyro.conf.arg(name="")]) -> int:
    """Identity-GRPO training of a Wan2.1 video model (see `idgrpo.rl.recipe`)."""
    trainer = build_trainer(config)  # reads and checks every input; writes nothing
    open_run(config.grpo.run_dir, config.run_settings(), mutable=RESUMABLE_SETTINGS, resume=config.grpo.resume,
             overwrite=config.overwrite, label=_settings_flag, log=trainer.log)
    history = trainer.train()
    if history and trainer.rank == 0:
        last = history[-1]
        print(f"train-grpo: {len(history)} epochs, last reward {last['reward_mean']:.4f}; run dir {trainer.run_dir}")
    return 0
