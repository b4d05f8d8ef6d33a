"""Exponential moving average of the trainable weights, with the Flow-GRPO warm-up decay and the two update
schedules of docs/recipe.md ("EMA")."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

EMA_SCHEDULES = ("interval", "identity_grpo")


@contextlib.contextmanager
def swapped_weights(params: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]):
    """`weights` copied into `params` for the duration, the parameters' own values restored afterwards (the EMA's
    evaluation, NFT's old policy)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)


class EMA:
    """Exponential moving average of parameters with the Flow-GRPO warm-up decay min(decay, (1 + g) / (10 + g)).

        weights = [torch.zeros(3)]
        ema = EMA(weights, decay=0.9, every=1)
        for step in range(5):
            weights[0].add_(1.0)          # the optimizer step
            ema.step(step)                # then the EMA, with the 0-based index of that step
        with ema.swapped():               # evaluate with the averaged weights
            ...

    `step(s)` follows optimizer step s (0-based). Schedules (`GRPOConfig.ema_schedule`, docs/recipe.md):
    - "interval": one update after steps every-1, 2·every-1, ... (every `every`-th step), with g = s;
    - "identity_grpo": the official script, whose EMA runs after every micro-batch with its count of optimizer steps
      taken, updating when count + 1 is a multiple of `every`: `repeats` updates (one per micro-batch of a step)
      after steps every-2, 2·every-2, ..., with g = s + 1 (the count)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, every: int, *, schedule: str = "interval",
                 repeats: int = 1):
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"EMA schedule {schedule!r}: expected one of {EMA_SCHEDULES}")
        self.params = list(params)
        self.decay, self.every, self.schedule, self.repeats = decay, every, schedule, repeats
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_after(self, optimizer_step: int) -> float | None:
        """The decay the update after optimizer step `optimizer_step` uses, or None when no update is due."""
        count = optimizer_step + 1 if self.schedule == "identity_grpo" else optimizer_step
        if (count + 1) % self.every:
            return None
        return min(self.decay, (1 + count) / (10 + count))

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        decay = self.decay_after(optimizer_step)
        if decay is None:
            return
        current = [p.detach().float() for p in self.params]
        for _ in range(self.repeats):
            torch._foreach_lerp_(self.shadow, current, 1.0 - decay)

    def swapped(self):
        """Temporarily load the EMA weights into the parameters."""
        return swapped_weights(self.params, self.shadow)

    def reset(self) -> None:
        """Restart the average from the current parameters."""
        self.shadow = [p.detach().float().clone() for p in self.params]

    def state_dict(self) -> dict:
        """The averaged weights (the live tensors, as torch's state_dicts; `copy.deepcopy` for a snapshot)."""
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shadow = list(state["shadow"])
        if [tuple(s.shape) for s in shadow] != [tuple(s.shape) for s in self.shadow]:
            raise ValueError(f"EMA state of shapes {[tuple(s.shape) for s in shadow]} does not fit parameters of "
                             f"shapes {[tuple(s.shape) for s in self.shadow]}")
        with torch.no_grad():
            for s, saved in zip(self.shadow, shadow, strict=True):
                s.copy_(saved)
