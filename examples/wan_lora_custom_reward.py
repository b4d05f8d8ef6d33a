"""The Wan2.1 DiT with LoRA adapters and your own reward, built by the recipe API that `idgrpo train-grpo` runs
(docs/embedding.md, docs/recipe.md).

Usage:
    python examples/wan_lora_custom_reward.py --out runs/example-wan                          # one CPU process
    python examples/wan_lora_custom_reward.py --out runs/example-wan-blue --target blue --epochs 12
    torchrun --nproc-per-node 2 examples/wan_lora_custom_reward.py --out runs/example-wan-2   # 2 processes

`RecipeConfig.from_name("tiny", model="tiny", ...)` is the tiny Wan DiT (random weights, the real architecture and
LoRA path; its latents' first three channels are shown as RGB). The same code trains Wan2.1-VACE-1.3B on GPUs with
`RecipeConfig.from_name("vace-1.3b", weights_dir=..., vae_path=..., prompt_cache=..., train_csv=..., reward=...)`
(docs/recipe.md lists what each needs). The reward is this file's `target_colour_reward` factory, named to the recipe
as "module:function" and configured through `extra`. Prints the evaluation reward (fixed noise, ODE sampler) before
and after GRPO, writes `<out>/summary.json` beside the run directory's metrics, checkpoints and LoRA exports
(`lora/`: PEFT, `lora_diffusers/`: diffusers), and exits 1 when the run did not finish with finite values.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from idgrpo.engine import open_run
from idgrpo.rl import RecipeConfig, RewardFn
from idgrpo.rl.recipe import RESUMABLE_SETTINGS, build_trainer

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def target_colour_reward(config: RecipeConfig, device: torch.device) -> RewardFn:
    """A reward factory, as `RecipeConfig.reward` names one: called once as factory(config, device), it returns
    score(frames uint8 (B, T, H, W, 3), references, prompts) -> (B,). Its settings come from `config.extra`."""
    target = torch.tensor(COLOURS[config.extra.get("target", "red")], device=device)

    def score(frames: torch.Tensor, references: list, prompts: list[str]) -> torch.Tensor:
        # Runs on the trainer's reward thread, overlapping the next rollout batch: no collectives, no shared state.
        mean = frames.float().mean(dim=(1, 2, 3)) / 255.0  # (B, 3)
        return 1.0 - (mean - target).norm(dim=1) / math.sqrt(3)

    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory (an earlier run is resumed)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target", choices=sorted(COLOURS), default="red", help="the colour the reward asks for")
    args = parser.parse_args(argv)

    # Flat overrides go to the part that has the field: `model`, `lora_rank`, `reward`, `extra` are the recipe's,
    # `epochs`, `lr`, `group_size`, ... its algorithm's (`recipe.grpo`, a GRPOConfig).
    recipe = RecipeConfig.from_name(
        "tiny", model="tiny", lora_rank=8, lora_alpha=8.0, reward=f"{__name__}:target_colour_reward",
        extra={"target": args.target}, num_steps=6, sde_window_size=2, shared_initial_noise=True, group_size=8,
        prompts_per_epoch=2, rollout_batch_size=8, train_batch_size=8, updates_per_epoch=2, lr=3e-2, kl_beta=0.004,
        reference="lora", epochs=args.epochs, eval_every=args.epochs, eval_steps=6, eval_videos=1,
        save_every=args.epochs, run_dir=str(args.out))
    trainer = build_trainer(recipe)  # the policy + LoRA, decoder, conditioning, reward and data; writes nothing
    # What `idgrpo train-grpo` does next: one run per directory, a rerun resumes it (docs/reliability.md).
    open_run(recipe.grpo.run_dir, recipe.run_settings(), mutable=RESUMABLE_SETTINGS, resume=recipe.grpo.resume,
             overwrite=recipe.overwrite, log=trainer.log)
    before = trainer.evaluate(0)  # the initial policy on the evaluation rows (its videos: samples/epoch00000_*)
    history = trainer.train()
    after = history[-1]["eval_reward"]

    finite = all(math.isfinite(record[key]) for record in history for key in ("reward_mean", "loss", "kl"))
    if trainer.rank == 0:
        summary = {"eval_reward_before": before, "eval_reward_after": after, "epochs": len(history),
                   "training_reward": [record["reward_mean"] for record in history]}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"GRPO on the tiny Wan DiT + LoRA, {len(history)} epochs: evaluation reward {before:.3f} -> {after:.3f}")
    if not (finite and math.isfinite(after)):
        print("error: the run did not finish with finite rewards and losses", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
