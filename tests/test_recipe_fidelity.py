"""What the `vace-1.3b` preset takes over from the official Identity-GRPO script (docs/recipe.md): its EMA schedule
(against a re-enactment of the official loop), its configuration, the diffusers reference-image preprocessing
(against PIL and diffusers), evaluation at another video size, and training that starts from a given LoRA."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from idgrpo.models.conditioning import fit_on_white
from idgrpo.models.lora import apply_lora, lora_state_dict, save_peft
from idgrpo.models.wan_dit import WanConfig, WanDiT
from idgrpo.rl.config import RecipeConfig
from idgrpo.rl.ema import EMA
from idgrpo.rl.recipe import build_trainer, diffusers_reference_image, pil_lanczos_resize


def official_ema_run(snapshots, *, epochs, micro_batches, steps_per_epoch, decay=0.9, interval=8, timesteps=3):
    """The official training loop's control flow around its EMA, re-enacted on plain tensors.

    Per epoch: `micro_batches` micro-batches of `timesteps` accumulation calls each; the gradient-accumulation counter
    runs over all calls and an optimizer step (here: the parameters jump to the next snapshot) happens every
    micro_batches / steps_per_epoch micro-batches' worth of calls; after every micro-batch the EMA is stepped with the
    number of optimizer steps taken so far, and updates (ema += (1 - d)(p - ema), d = min((1 + g)/(10 + g), decay))
    when that number plus one is a multiple of `interval`. Returns the shadow at the end of every epoch."""
    calls_per_step = micro_batches // steps_per_epoch * timesteps
    param, ema = snapshots[0].clone(), snapshots[0].clone()
    calls, global_step, per_epoch = 0, 0, []
    for _ in range(epochs):
        for _ in range(micro_batches):
            for _ in range(timesteps):
                calls += 1
                if calls % calls_per_step == 0:
                    global_step += 1
                    param = snapshots[global_step].clone()
            one_minus_decay = 1 - min((1 + global_step) / (10 + global_step), decay)
            if (global_step + 1) % interval == 0:
                ema += one_minus_decay * (param - ema)
        per_epoch.append(ema.clone())
    return per_epoch


def test_identity_grpo_ema_schedule_matches_the_official_loop():
    epochs, steps_per_epoch, micro_batches = 12, 2, 8  # the dgx configuration: 4 micro-batches per optimizer step
    gen = torch.Generator().manual_seed(0)
    snapshots = torch.randn(epochs * steps_per_epoch + 1, 5, dtype=torch.float64, generator=gen)
    expected = official_ema_run(snapshots, epochs=epochs, micro_batches=micro_batches, steps_per_epoch=steps_per_epoch)

    param = snapshots[0].clone()
    ema = EMA([param], 0.9, 8, schedule="identity_grpo", repeats=micro_batches // steps_per_epoch)
    got = []
    for step in range(epochs * steps_per_epoch):
        param.copy_(snapshots[step + 1])  # the optimizer step
        ema.step(step)
        if (step + 1) % steps_per_epoch == 0:
            got.append(ema.shadow[0].double().clone())
    for epoch, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"epoch {epoch}")
    # The shadow moves only after the epochs that reach 7, 15 and 23 optimizer steps (epochs 3, 7, 11).
    moved = [e for e in range(1, epochs) if not torch.equal(expected[e], expected[e - 1])]
    assert moved == [3, 7, 11] and torch.equal(expected[2], snapshots[0])


def test_ema_schedules_update_at_their_step_counts_with_the_warmup_decay():
    official = EMA([torch.zeros(1)], 0.9, 8, schedule="identity_grpo", repeats=4)
    interval = EMA([torch.zeros(1)], 0.9, 8)
    due_official = {s: official.decay_after(s) for s in range(200) if official.decay_after(s) is not None}
    due_interval = {s: interval.decay_after(s) for s in range(200) if interval.decay_after(s) is not None}
    assert sorted(due_official) == list(range(6, 200, 8))  # after the 7th, 15th, ... optimizer step
    assert sorted(due_interval) == list(range(7, 200, 8))  # after the 8th, 16th, ...
    assert due_official[6] == pytest.approx(8 / 17) and due_interval[7] == pytest.approx(8 / 17)
    assert due_official[94] == 0.9 and due_official[78] == pytest.approx(80 / 89)
    with pytest.raises(ValueError, match="schedule"):
        EMA([torch.zeros(1)], 0.9, 8, schedule="flow_grpo")


def test_interval_ema_is_one_lerp_per_interval():
    param = torch.zeros(3)
    ema = EMA([param], 0.9, 2)
    shadow = torch.zeros(3, dtype=torch.float64)
    for step in range(6):
        param.fill_(step + 1.0)
        ema.step(step)
        if (step + 1) % 2 == 0:
            shadow += (1 - min(0.9, (1 + step) / (10 + step))) * (param.double() - shadow)
    torch.testing.assert_close(ema.shadow[0].double(), shadow)


def test_vace_preset_carries_the_official_dgx_configuration():
    gpus, videos_per_gpu, batches_per_epoch, group = 4, 4, 8, 8  # scripts/single_node/train.sh, config/dgx.py
    accumulation = batches_per_epoch // 2  # train.gradient_accumulation_steps, in micro-batches
    cfg = RecipeConfig.from_name("vace-1.3b")
    grpo = cfg.grpo
    assert grpo.group_size == group
    assert grpo.prompts_per_epoch == gpus * videos_per_gpu * batches_per_epoch // group
    assert grpo.updates_per_epoch == batches_per_epoch // accumulation
    assert (grpo.ema_schedule, grpo.ema_every, grpo.ema_repeats, grpo.ema_decay) == ("identity_grpo", 8, accumulation,
                                                                                      0.9)
    assert (grpo.eval_solver, grpo.eval_steps, cfg.eval_size) == ("euler", 50, (480, 832, 81))
    assert cfg.vae_dtype == "float32" and cfg.diffusers_ref_resize and cfg.init_lora is None
    tiny = RecipeConfig.from_name("tiny")  # the CPU demo keeps its own schedule and evaluates at the training size
    assert tiny.grpo.ema_schedule == "interval" and tiny.grpo.ema_repeats == 1
    assert tiny.eval_size == (tiny.height, tiny.width, tiny.num_frames)


@pytest.mark.parametrize("field, value, reason", [
    ("ema_schedule", "official", "must be one of"), ("ema_repeats", 0, ">= 1"), ("eval_height", 40, "multiple of 16"),
    ("eval_width", 0, ">= 16"), ("eval_num_frames", 10, "4k\\+1"), ("vae_dtype", "float16", "must be one of"),
    ("diffusers_ref_resize", "yes", "must be a bool"), ("init_lora", "some/lora", "needs a LoRA policy")])
def test_new_settings_are_validated(field, value, reason):
    RecipeConfig.from_name("tiny", model="tiny", lora_rank=4, eval_height=32, eval_num_frames=9, init_lora="some/lora")
    flag = "--" + field.replace("_", "-")  # errors name the flag the user typed, then why it is refused
    with pytest.raises(ValueError, match=f"{flag}.*{reason}"):
        RecipeConfig.from_name("tiny", **{field: value})  # the tiny preset's toy policy has no LoRA to start from


def test_the_toy_policy_evaluates_at_its_training_size():
    with pytest.raises(ValueError, match="toy policy"):
        RecipeConfig.from_name("tiny", eval_height=32)


# ---------------------------------------------------------------------------------------------- reference images


def smooth_image(h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, max(2, h // 6), max(2, w // 6), generator=gen)
    img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    noise = 0.1 * torch.rand(3, h, w, generator=gen)
    return ((img + noise).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


@pytest.mark.parametrize("size, target", [((517, 333), (512, 328)), ((37, 29), (32, 24)), ((64, 50), (30, 80)),
                                          ((40, 41), (40, 40)), ((9, 300), (41, 17))])
def test_lanczos_resize_equals_pil(size, target):
    Image = pytest.importorskip("PIL.Image")
    image = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(size)))
    h, w = target
    pil = Image.fromarray(image.numpy())
    # Pillow 10.4 (the official environment) resizes horizontally first, then vertically; each pass is one PIL call.
    expected = pil.resize((w, size[0]), Image.LANCZOS).resize((w, h), Image.LANCZOS)
    assert torch.equal(pil_lanczos_resize(image, h, w), torch.from_numpy(np.array(expected)))


@pytest.mark.parametrize("size", [(61, 48), (48, 77), (64, 40)])
def test_reference_preprocessing_equals_diffusers_wan_vace(size):
    """diffusers' own WanVACEPipeline.preprocess_conditions is the oracle (one side off a multiple of 8, so the
    result does not depend on the order of PIL's passes)."""
    pytest.importorskip("diffusers")
    from diffusers import WanVACEPipeline
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    image = smooth_image(*size, seed=size[0])
    pipeline = SimpleNamespace(video_processor=VideoProcessor(vae_scale_factor=8), vae_scale_factor_spatial=8)
    _, _, refs = WanVACEPipeline.preprocess_conditions(pipeline, None, None, [[Image.fromarray(image.numpy())]], 1,
                                                      48, 80, 5, torch.float32, "cpu")
    ours = fit_on_white(diffusers_reference_image(image), 48, 80)
    assert diffusers_reference_image(image).shape[:2] == (size[0] // 8 * 8, size[1] // 8 * 8)
    torch.testing.assert_close(ours, refs[0][0], rtol=0, atol=2e-6)


def test_reference_already_a_multiple_of_8_is_untouched():
    image = smooth_image(40, 56, seed=3)
    assert torch.equal(diffusers_reference_image(image), image)
    with pytest.raises(ValueError, match="8x8"):
        diffusers_reference_image(smooth_image(7, 20, seed=4))


# ---------------------------------------------------------------------------------------------- trainer wiring


def test_evaluation_runs_at_its_own_video_size(tmp_path):
    cfg = RecipeConfig.from_name("tiny", model="tiny", lora_rank=4, lora_alpha=4.0, eval_videos=1, eval_steps=2,
                               eval_height=32, eval_width=48, eval_num_frames=9, ema_schedule="identity_grpo",
                               ema_every=1, ema_repeats=3, run_dir=str(tmp_path), resume=False)
    trainer = build_trainer(cfg)
    assert trainer.latent_shape == (16, 2, 2, 2) and trainer.eval_latent_shape == (16, 3, 4, 6)
    assert (trainer.ema.schedule, trainer.ema.repeats) == ("identity_grpo", 3)
    shapes = []
    decode = trainer.decode

    def recording_decode(latents):
        frames = decode(latents)
        shapes.append(tuple(frames.shape))
        return frames

    trainer.decode = recording_decode
    assert torch.isfinite(torch.tensor(trainer.evaluate(0)))
    assert shapes and all(shape[1:] == (3, 4, 6, 3) for shape in shapes)  # toy decode: the latent grid


def test_training_starts_from_the_given_lora(tmp_path):
    source = WanDiT(WanConfig.from_name("tiny"))
    apply_lora(source, 2, 3.0, ["to_q", "to_v"], init="gaussian")
    with torch.no_grad():
        for tensor in lora_state_dict(source).values():
            tensor.normal_(0, 0.1)
    save_peft(source, tmp_path / "lora")
    cfg = RecipeConfig.from_name("tiny", model="tiny", lora_rank=8, init_lora=str(tmp_path / "lora"), epochs=1,
                               run_dir=str(tmp_path / "run"), resume=False, num_steps=2, eval_every=0)
    trainer = build_trainer(cfg)
    trained = trainer.policy.full_state_dict(trainable_only=True)  # only the adapters train
    expected = lora_state_dict(source)
    assert sorted(trained) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name].float(), tensor.float(), rtol=0, atol=0)
    assert all(m.rank == 2 and m.alpha == 3.0 for m in trainer.policy.module.modules() if hasattr(m, "lora_A"))
    assert all(torch.equal(s, p.detach().float()) for s, p in zip(trainer.ema.shadow, trainer.params, strict=True))
