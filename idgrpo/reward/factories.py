"""Reward factories for `idgrpo train-grpo --reward module:function`.

The GRPO recipe resolves its reward from a "module:function" string and calls it as
`factory(config, device) -> score`, so `idgrpo.rl` never imports this package. Settings come
from the trainer config's free-form `extra` dict (`--extra reward_checkpoint=DIR ...`):

- `idgrpo.reward.factories:compact` — the compact identity reward model written by
  `idgrpo train-reward` (`extra.reward_checkpoint` = its `<out>/final` directory);
- `idgrpo.reward.factories:vlm` — the Qwen2.5-VL reward (`extra.reward_base` = the base model
  directory with tokenizer.json, `extra.reward_checkpoint` = the published-layout reward
  checkpoint; optional `extra.reward_dtype` = bfloat16|float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _setting(config, key: str, required: bool = True) -> str | None:
    value = (getattr(config, "extra", None) or {}).get(key)
    if required and not value:
        raise ValueError(f"this reward needs --extra {key}=... (see idgrpo.reward.factories)")
    return value


def compact(config, device: torch.device) -> Callable:
    """The compact identity reward model of `train-reward`, frozen, as a score callable."""
    from idgrpo.reward.model import IdentityRewardModel

    model = IdentityRewardModel.load(_setting(config, "reward_checkpoint"), device=device)
    model.requires_grad_(False)
    return model.score


def vlm(config, device: torch.device) -> Callable:
    """The Qwen2.5-VL identity reward (published layout), frozen, as a score callable."""
    from idgrpo.reward.vlm import VLMReward

    dtype_name = _setting(config, "reward_dtype", required=False) or (
        "bfloat16" if torch.device(device).type == "cuda" else "float32")
    if dtype_name not in _DTYPES:
        raise ValueError(f"reward_dtype={dtype_name!r}: expected one of {sorted(_DTYPES)}")
    model = VLMReward.from_pretrained(_setting(config, "reward_base"), _setting(config, "reward_checkpoint", False),
                                      dtype=_DTYPES[dtype_name], device=device)
    model.requires_grad_(False)
    return model.score
