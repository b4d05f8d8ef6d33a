"""Reward factories for `idgrpo train-grpo --reward module:function`.

The GRPO recipe resolves its reward from a "module:function" string and calls it as
`factory(config, device) -> score`, so `idgrpo.rl` never imports this package. Settings come
from the trainer config's free-form `extra` dict (`--extra reward_checkpoint DIR [KEY VALUE ...]`):

- `idgrpo.reward.factories:compact` — the compact identity reward model written by
  `idgrpo train-reward` (`extra.reward_checkpoint` = its `<out>/final` directory);
- `idgrpo.reward.factories:vlm` — the Qwen2.5-VL reward (`extra.reward_base` = the base model
  directory with tokenizer.json, `extra.reward_checkpoint` = the published-layout reward
  checkpoint; optional `extra.reward_dtype` = bfloat16|float32). How it scores (`vlm_scoring_config`):
  a checkpoint trained by idgrpo brings its own `reward_config.json`; any other checkpoint is taken
  to be the published Identity-GRPO reward and scored as the official GRPO loop does (its
  `model_config.json` frame count and pixel budget, 10 fps, its training rubric), which needs
  `extra.reward_template` = the official `vace_reward/prompt_template.py` (or a text file with the
  rubric). Optional overrides: `reward_template` (`idgrpo` = idgrpo's own instruction),
  `reward_fps`, `reward_num_frames`, `reward_max_pixels`. See docs/recipe.md, "Reward scoring".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from idgrpo.errors import UsageError

if TYPE_CHECKING:
    from idgrpo.reward.vlm import VLMRewardConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# extra key -> (VLMRewardConfig field, parser)
_SCORING_OVERRIDES = {"reward_fps": ("fps", float), "reward_num_frames": ("num_frames", int),
                      "reward_max_pixels": ("max_pixels", int)}


def _setting(config, key: str, required: bool = True) -> str | None:
    value = (getattr(config, "extra", None) or {}).get(key)
    if required and not value:
        raise UsageError(f"this reward needs --extra {key} ... (see idgrpo.reward.factories)")
    return value


def compact(config, device: torch.device) -> Callable:
    """The compact identity reward model of `train-reward`, frozen, as a score callable."""
    from idgrpo.reward.model import IdentityRewardModel

    model = IdentityRewardModel.load(_setting(config, "reward_checkpoint"), device=device)
    model.requires_grad_(False)
    return model.score


def vlm_scoring_config(config) -> VLMRewardConfig:
    """The `VLMRewardConfig` the `vlm` factory scores with, from the trainer config's `extra` settings (module
    docstring): the checkpoint's `reward_config.json`; else, for a checkpoint, the official GRPO loop's scoring
    (`published_scoring_config`, which needs `reward_template`); else the defaults. Then the overrides."""
    from idgrpo.reward.vlm import (
        REWARD_CONFIG_FILE,
        SUBJECT_ALIGNMENT_INSTRUCTION,
        VLMRewardConfig,
        published_scoring_config,
        read_instruction,
    )

    checkpoint = _setting(config, "reward_checkpoint", required=False)
    template = _setting(config, "reward_template", required=False)
    instruction = None
    if template:
        instruction = SUBJECT_ALIGNMENT_INSTRUCTION if template == "idgrpo" else read_instruction(template)
    if checkpoint and (Path(checkpoint) / REWARD_CONFIG_FILE).is_file():
        scoring = VLMRewardConfig.load(Path(checkpoint) / REWARD_CONFIG_FILE)
    elif checkpoint:
        if instruction is None:
            raise UsageError(
                f"reward checkpoint {checkpoint} has no {REWARD_CONFIG_FILE}, so it is scored as the published "
                f"Identity-GRPO reward, with the rubric it was trained on: pass --extra reward_template "
                f"<identity-grpo>/vace_reward/prompt_template.py (the official file, read without running it) or a "
                f"text file holding that rubric; --extra reward_template idgrpo scores with idgrpo's own instruction")
        scoring = published_scoring_config(checkpoint, instruction)
    else:
        scoring = VLMRewardConfig()
    changes = {} if instruction is None else {"instruction": instruction}
    for key, (name, parse) in _SCORING_OVERRIDES.items():
        value = _setting(config, key, required=False)
        if value:
            try:
                changes[name] = parse(value)
            except ValueError as e:
                raise UsageError(f"--extra {key} {value!r}: expected a {parse.__name__}") from e
    return dataclasses.replace(scoring, **changes)


def vlm(config, device: torch.device) -> Callable:
    """The Qwen2.5-VL identity reward (published layout), frozen, as a score callable."""
    from idgrpo.reward.vlm import VLMReward

    dtype_name = _setting(config, "reward_dtype", required=False) or (
        "bfloat16" if torch.device(device).type == "cuda" else "float32")
    if dtype_name not in _DTYPES:
        raise UsageError(f"--extra reward_dtype {dtype_name!r}: expected one of {', '.join(sorted(_DTYPES))}")
    base = _setting(config, "reward_base")
    model = VLMReward.from_pretrained(base, _setting(config, "reward_checkpoint", False),
                                      config=vlm_scoring_config(config), dtype=_DTYPES[dtype_name], device=device)
    model.requires_grad_(False)
    return model.score
