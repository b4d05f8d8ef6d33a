"""Scale-out (docs/scale-out.md). `train-grpo --sp-size N`: a short tiny-DiT run on a data-parallel x
sequence-parallel layout equals the 1-process run, and a checkpoint saved at one layout resumes at another; layouts
that cannot run are refused; the text-to-video recipe path runs and refuses the identity reward.

Tolerance: fp32. Every logged value within 1e-5 relative (plus 1e-7 absolute for values that are themselves
rounding noise, such as `max_abs_ratio_minus_1_*` ~1e-7 and `approx_kl` ~1e-16 while the policy is still the rollout
policy). Every exported tensor within 1e-5 relative error (the norm of the difference over the norm), or within 10x
the distance by which one process moves that tensor when only the order of its sums changes (the same run with
micro-batches of 1 instead of 2), whichever is larger. That distance is ~1e-4 for the cross-attention adapters: the
tiny run's text is one row zero-padded to 512, so 511 keys are identical, the cross-attention's gradients are sums of
nearly cancelling terms (in one process their fp32 value is ~6e-5 away from float64, measured), and AdamW, dividing
out the gradient's scale, carries that rounding into the weights. Not bit for bit: a sequence-parallel rank
multiplies its chunk of the tokens (another matrix shape, so BLAS may block the sums differently), a weight gradient
is summed chunk by chunk and then over ranks instead of over all tokens at once, and the reductions over 2 or 4 ranks
add in another order than one process does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from idgrpo.testing import run_distributed

# 48x48x9 -> a (3, 6, 6) latent grid -> 27 tokens: odd, so sp 2 pads the sequence and masks the padded keys.
TINY_DIT = ["train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4", "--lora-alpha", "8", "--height", "48",
            "--width", "48", "--num-frames", "9", "--eval-every", "2", "--eval-steps", "4", "--eval-videos", "0",
            "--kl-beta", "0.004", "--save-every", "1", "--num-steps", "4"]
RTOL, ATOL, SPREAD_FACTOR = 1e-5, 1e-7, 10


def _is_timing(key: str) -> bool:
    return key.endswith(("time_s", "_seconds", "per_s")) or "mfu" in key


def _train(rank: int, world_size: int, run_dir: str, sp_size: int, epochs: int, *extra: str) -> dict:
    from idgrpo.cli import main

    main([*TINY_DIT, "--epochs", str(epochs), "--sp-size", str(sp_size), "--run-dir", run_dir, *extra])
    torch.distributed.barrier()
    if rank:
        return {}
    from safetensors.torch import load_file

    run = Path(run_dir)
    records = [{k: v for k, v in json.loads(line).items() if not _is_timing(k)}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    files = ("ema.safetensors", "lora/adapter_model.safetensors")
    weights = {f"{file}:{k}": v.tolist() for file in files for k, v in load_file(str(run / file)).items()}
    return {"metrics": records, "weights": weights}


def _close(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        if math.isnan(want) or math.isnan(got):
            return math.isnan(want) and math.isnan(got)
        return abs(got - want) <= RTOL * max(abs(got), abs(want)) + ATOL
    return got == want


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    errors = {}
    for name, value in want["weights"].items():
        g, w = torch.tensor(got["weights"][name], dtype=torch.float64), torch.tensor(value, dtype=torch.float64)
        errors[name] = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
    return errors


def assert_same_run(got: dict, want: dict, spread: dict[str, float], what: str) -> None:
    assert len(got["metrics"]) == len(want["metrics"]), f"{what}: another number of epochs"
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert g.keys() == w.keys(), f"{what}: logged keys differ: {sorted(set(g) ^ set(w))}"
        for key in w:
            assert _close(g[key], w[key]), f"{what}, epoch {w['epoch']}, {key}: {g[key]!r} != {w[key]!r}"
    assert got["weights"].keys() == want["weights"].keys()
    for name, err in relative_errors(got, want).items():
        limit = max(RTOL, SPREAD_FACTOR * spread[name])
        assert err <= limit, f"{what}, {name}: relative error {err:.3g} > {limit:.3g}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("sp") / "one"
    return run_distributed(_train, 1, str(run), 1, 2, timeout_s=300)[0]


@pytest.fixture(scope="module")
def spread(one_process, tmp_path_factory) -> dict[str, float]:
    """Per exported tensor, how far one process moves it when only the order of its sums changes (micro-batches of
    1 instead of 2: the same gradients, accumulated in another order)."""
    run = tmp_path_factory.mktemp("sp") / "rebatched"
    rebatched = run_distributed(_train, 1, str(run), 1, 2, "--train-batch-size", "1", timeout_s=300)[0]
    assert [m["reward_mean"] for m in rebatched["metrics"]] == [m["reward_mean"] for m in one_process["metrics"]]
    return relative_errors(rebatched, one_process)


def test_one_process_run_trains_something(one_process):
    """The reference run is not vacuous: the adapters moved, every epoch trained, the evaluation scored."""
    assert [m["trained_samples"] for m in one_process["metrics"]] == [8, 8]
    assert "eval_reward" in one_process["metrics"][-1] and math.isfinite(one_process["metrics"][-1]["eval_reward"])
    lora_b = [v for k, v in one_process["weights"].items() if k.startswith("lora/") and "lora_B" in k]
    assert lora_b and any(torch.tensor(v).abs().max() > 0 for v in lora_b)


def test_sp2_on_two_processes_equals_one_process(one_process, spread, tmp_path):
    got = run_distributed(_train, 2, str(tmp_path / "sp2"), 2, 2, timeout_s=300)[0]
    assert_same_run(got, one_process, spread, "sp 2 on 2 processes")
    # Not vacuous: most tensors hold the strict bound.
    assert sum(spread[name] < RTOL for name in spread) > len(spread) / 2


@pytest.mark.slow
def test_dp2_x_sp2_on_four_processes_equals_one_process(one_process, spread, tmp_path):
    got = run_distributed(_train, 4, str(tmp_path / "dp2sp2"), 2, 2, timeout_s=600)[0]
    assert_same_run(got, one_process, spread, "dp 2 x sp 2 on 4 processes")


def test_a_run_saved_at_sp2_resumes_at_one_process(one_process, spread, tmp_path):
    run = str(tmp_path / "resumed")
    # Epoch 0 at sp 2, checkpointed, not evaluated (as in the straight run: only its last epoch evaluates).
    run_distributed(_train, 2, run, 2, 1, "--eval-every", "0", timeout_s=300)
    resumed = run_distributed(_train, 1, run, 1, 2, timeout_s=300)[0]  # epoch 1 at one process
    assert_same_run(resumed, one_process, spread, "saved at sp 2, resumed at 1 process")


def test_nft_at_sp2_on_two_processes_equals_one_process(tmp_path):
    """DiffusionNFT under sequence parallelism: the noise levels and noises follow the samples' seeds, which a
    sequence-parallel group shares, so sp 2 on 2 processes trains what 1 process trains."""
    nft = ("--objective", "nft", "--timestep-fraction", "0.5", "--kl-beta", "1e-4")
    one = run_distributed(_train, 1, str(tmp_path / "one"), 1, 2, *nft, timeout_s=300)[0]
    rebatched = run_distributed(_train, 1, str(tmp_path / "rebatched"), 1, 2, *nft, "--train-batch-size", "1",
                                timeout_s=300)[0]
    got = run_distributed(_train, 2, str(tmp_path / "sp2"), 2, 2, *nft, timeout_s=300)[0]
    assert [m["trained_samples"] for m in one["metrics"]] == [8, 8] and "old_deviation" in one["metrics"][-1]
    assert_same_run(got, one, relative_errors(rebatched, one), "NFT at sp 2 on 2 processes")


@pytest.mark.parametrize("argv, message", [
    (["tiny", "--sp-size", "2"], "the toy policy has none"),
    (["tiny", "--model", "tiny", "--sp-size", "3"], "--sp-size 3 must divide the world size 1"),
    (["t2v-1.3b", "--reward", "idgrpo.reward.factories:compact"], "generates from text alone"),
])
def test_train_grpo_refuses_what_cannot_run(argv, message, tmp_path, capsys):
    from idgrpo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-grpo", *argv, "--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_text_to_video_grpo_runs_without_references(tmp_path):
    """The t2v presets' path at a tiny size: text conditioning (prompt and negative prompt), the VAE decoding the
    whole latent (no reference slots), any reward."""
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanConfig, WanDiT
    from idgrpo.models.wan_vae import WanVAE, WanVAEConfig
    from idgrpo.rl import GRPOTrainer, PromptRow, RecipeConfig
    from idgrpo.rl.recipe import text_conditioning_builder
    from idgrpo.rl.toy import brightness_score, prompt_context

    class Text:  # stands in for the prompt cache
        def lookup(self, prompts):
            return torch.stack([prompt_context(p, 32) for p in prompts])[:, None]

        def negative(self, batch):
            return prompt_context("", 32)[None, None].expand(batch, 1, -1)

    torch.manual_seed(0)
    recipe = RecipeConfig.from_name("t2v-1.3b", height=16, width=16, num_frames=5, num_steps=3, prompts_per_epoch=2,
                                    rollout_batch_size=2, train_batch_size=2, epochs=1, eval_every=0,
                                    compute_dtype="float32", run_dir=str(tmp_path), resume=False)
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval().requires_grad_(False)
    policy = WanDiT(WanConfig.from_name("tiny")).init_weights()
    apply_lora(policy, 4, recipe.lora_alpha)
    mark_only_lora_trainable(policy)
    decoded = []

    def decode(latents):
        decoded.append(tuple(latents.shape))
        return vae.decode_frames(latents)

    trainer = GRPOTrainer(recipe.grpo, policy, score=brightness_score, decode=decode,
                          build_conditioning=text_conditioning_builder(Text(), recipe), latent_shape=(16, 2, 2, 2),
                          train_rows=[PromptRow("a red ball"), PromptRow("a cat")], log=lambda m: None)
    (record,) = trainer.train()
    assert decoded and all(shape[1:] == (16, 2, 2, 2) for shape in decoded)
    assert record["trained_samples"] == 8 and record["optimizer_steps"] == 2  # Flow-GRPO: 2 updates per epoch
