"""VACE and Phantom GRPO runs end to end on tiny models (random tiny VAE + tiny Wan DiT + LoRA), CPU; VACE reference
preprocessing and evaluation at another video size."""

import dataclasses

import pytest
import torch

from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
from idgrpo.models.wan_dit import WanConfig, WanDiT
from idgrpo.models.wan_vae import WanVAE, WanVAEConfig
from idgrpo.rl import GRPOTrainer, PromptRow, RecipeConfig
from idgrpo.rl.recipe import load_reward, phantom_conditioning_builder, vace_conditioning_builder
from idgrpo.rl.toy import brightness_score, prompt_context


class HashedText:
    """Stands in for the prompt cache: `lookup(prompts)` / `negative(batch)` -> (B, n, text_dim) contexts."""

    def __init__(self, dim):
        self.dim = dim

    def lookup(self, prompts):
        return torch.stack([prompt_context(p, self.dim) for p in prompts])[:, None].repeat(1, 3, 1)

    def negative(self, batch):
        return prompt_context("negative", self.dim)[None, None].expand(batch, 3, -1)


def _rows(n_ref):
    gen = torch.Generator().manual_seed(0)
    return [PromptRow(f"person {i}", [torch.randint(0, 256, (12 + 4 * j, 9, 3), dtype=torch.uint8, generator=gen)
                                      for j in range(n_ref)]) for i in range(2)]


def _run(model, wan_name, n_ref, tmp_path):
    torch.manual_seed(0)
    config = RecipeConfig.from_name("tiny", model=model, height=16, width=16, num_frames=5, num_steps=3,
                                  guidance=3.0, guidance_image=2.0, prompts_per_epoch=2, group_size=2,
                                  rollout_batch_size=2, train_batch_size=1, kl_beta=0.004, reference="lora",
                                  lora_rank=4, lora_alpha=4.0, epochs=2, eval_every=0, resume=False,
                                  run_dir=str(tmp_path), activation_checkpointing=model == "vace-1.3b")
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    wan = WanConfig.from_name(wan_name)
    policy = WanDiT(wan).init_weights()
    apply_lora(policy, config.lora_rank, config.lora_alpha)
    mark_only_lora_trainable(policy)
    text = HashedText(wan.text_dim)
    if model == "vace-1.3b":
        build = vace_conditioning_builder(vae, text, config, n_ref)
    else:
        build = phantom_conditioning_builder(vae, text, config)
    decoded = []

    def decode(latents):
        decoded.append(tuple(latents.shape))
        return vae.decode_frames(latents)

    trainer = GRPOTrainer(config.grpo, policy, score=brightness_score, decode=decode, build_conditioning=build,
                          latent_shape=(16, 2 + n_ref, 2, 2), train_rows=_rows(n_ref), log=lambda m: None)
    history = trainer.train()
    return trainer, history, decoded


@pytest.mark.parametrize("model,wan_name", [("vace-1.3b", "tiny-vace"), ("phantom-1.3b", "tiny")])
def test_reference_conditioned_grpo_runs_on_tiny_models(model, wan_name, tmp_path):
    trainer, history, decoded = _run(model, wan_name, 2, tmp_path)
    assert decoded and all(shape == (2, 16, 2, 2, 2) for shape in decoded)  # reference slots dropped before decoding
    first = history[0]
    assert first["max_abs_ratio_minus_1_before_update"] < 1e-5
    assert first["kl"] < 1e-8  # zero-initialised LoRA B: the policy equals its adapters-off reference
    assert all(torch.isfinite(torch.tensor(h["reward_mean"])) and h["trained_samples"] == 4 for h in history)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_vace_conditioning_layout():
    config = RecipeConfig.from_name("tiny", height=16, width=16, num_frames=5, guidance=4.5)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    cond = vace_conditioning_builder(vae, HashedText(32), config, 2)(_rows(2))
    assert len(cond.branches) == 2 and cond.drop_front == 2 and cond.drop_back == 0
    ctx = cond.branches[0].kwargs["vace_context"]
    assert ctx.shape == (2, 96, 4, 2, 2)  # 2 reference slots + 2 video latent frames
    assert torch.equal(ctx[:, 16:32, :2], torch.zeros_like(ctx[:, 16:32, :2]))  # references padded to 32 channels
    assert torch.equal(ctx[:, 32:, :2], torch.zeros_like(ctx[:, 32:, :2]))  # their mask frames are zeros
    assert torch.equal(ctx[:, 32:, 2:], torch.ones_like(ctx[:, 32:, 2:]))  # subject-to-video: generate everything
    assert [b.weight for b in cond.branches] == [4.5, -3.5]


def test_load_reward_resolves_a_factory_and_rejects_bad_specs():
    assert load_reward("idgrpo.rl.toy:brightness_reward", None, torch.device("cpu")) is brightness_score
    with pytest.raises(ValueError, match="module:function"):
        load_reward("", None, torch.device("cpu"))


@pytest.mark.parametrize("field, value, message", [
    ("grad_accumulation", "both", "--grad-accumulation"), ("adv_std", "batch", "--adv-std"),
    ("reference", "ema", "--reference"), ("sde_window_size", 9, "SDE window"), ("clip_range", 0.0, "--clip-range")])
def test_config_rejects_bad_settings(field, value, message):
    RecipeConfig.from_name("tiny", num_steps=8)  # the defaults are valid
    with pytest.raises(ValueError, match=message):
        RecipeConfig.from_name("tiny", num_steps=8, **{field: value})


def test_vace_references_are_resized_as_diffusers_does_unless_turned_off():
    from idgrpo.rl.recipe import diffusers_reference_image

    config = RecipeConfig.from_name("tiny", height=16, width=16, num_frames=5)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    rows = _rows(2)  # references of 12x9 and 16x9 pixels: both resized to multiples of 8 first
    resized = [PromptRow(r.prompt, [diffusers_reference_image(image) for image in r.references]) for r in rows]
    off = dataclasses.replace(config, diffusers_ref_resize=False)
    context = vace_conditioning_builder(vae, HashedText(32), config, 2)(rows).branches[0].kwargs["vace_context"]
    by_hand = vace_conditioning_builder(vae, HashedText(32), off, 2)(resized).branches[0].kwargs["vace_context"]
    original = vace_conditioning_builder(vae, HashedText(32), off, 2)(rows).branches[0].kwargs["vace_context"]
    assert torch.equal(context, by_hand) and not torch.equal(context, original)


def test_vace_evaluation_runs_at_its_own_video_size(tmp_path):
    config = RecipeConfig.from_name("tiny", model="vace-1.3b", height=16, width=16, num_frames=5, num_steps=2,
                                  eval_steps=2, eval_solver="euler", eval_height=32, eval_width=48,
                                  eval_num_frames=9, eval_videos=0, guidance=3.0, lora_rank=4, lora_alpha=4.0,
                                  reference="lora", run_dir=str(tmp_path), resume=False)
    eval_config = dataclasses.replace(config, height=32, width=48, num_frames=9)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    wan = WanConfig.from_name("tiny-vace")
    policy = WanDiT(wan).init_weights()
    apply_lora(policy, config.lora_rank, config.lora_alpha)
    mark_only_lora_trainable(policy)
    text = HashedText(wan.text_dim)
    shapes = []

    def decode(latents):
        frames = vae.decode_frames(latents)
        shapes.append(tuple(frames.shape))
        return frames

    trainer = GRPOTrainer(config.grpo, policy, score=brightness_score, decode=decode,
                          build_conditioning=vace_conditioning_builder(vae, text, config, 2),
                          latent_shape=(16, 2 + 2, 2, 2), train_rows=_rows(2), eval_rows=_rows(2),
                          eval_latent_shape=(16, 3 + 2, 4, 6),
                          build_eval_conditioning=vace_conditioning_builder(vae, text, eval_config, 2),
                          log=lambda m: None)
    assert torch.isfinite(torch.tensor(trainer.evaluate(0)))
    assert shapes == [(2, 9, 32, 48, 3)]  # both rows in one batch, at the evaluation size


def test_train_grpo_keeps_one_run_per_directory(tmp_path, capsys):
    """run.json records the settings (docs/reliability.md): a resume may add epochs but not change the algorithm,
    --no-resume refuses a used directory, --overwrite moves the old run aside."""
    import json

    from idgrpo.cli import main

    run = tmp_path / "run"
    args = ["train-grpo", "tiny", "--epochs", "1", "--eval-every", "0", "--num-steps", "2", "--run-dir", str(run)]
    main(args)
    assert json.loads((run / "run.json").read_text())["settings"]["grpo"]["lr"] == 3e-2
    for extra, message in ((["--lr", "0.5"], "--lr: 0.03 -> 0.5"), (["--no-resume"], "already holds a run")):
        with pytest.raises(SystemExit) as stopped:
            main([*args, *extra])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    main([*args[:3], "2", *args[4:]])  # --epochs 2: resumed after epoch 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    main([*args, "--no-resume", "--overwrite", "--lr", "0.5"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list(tmp_path.glob("run.replaced-*"))) == 1
