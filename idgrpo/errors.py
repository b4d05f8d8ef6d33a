"""Errors that are the user's to fix, and the field checks that config dataclasses run in `__post_init__`.

`idgrpo <command>` prints a `UsageError` (and a `FileNotFoundError`) as one line on stderr,
`idgrpo <command>: error: <message>`, and exits with status 2; every other exception keeps its traceback
(docs/reliability.md). `UsageError` is a `ValueError`, so code that catches `ValueError` still catches it.

    def __post_init__(self):
        at_least(self, 1, "epochs", "batch_size")              # --epochs, --batch-size: >= 1
        above(self, 0.0, "lr", "grad_clip")                    # finite and > 0
        within(self, "held_out_fraction", 0.0, 1.0, open_low=True, open_high=True)
        one_of(self, "precision", ("fp32", "bf16"))

Every check names the flag as the user typed it (`grad_clip` -> `--grad-clip`; a nested config's field
with its prefix, `--model.patch-size`) and rejects NaN and infinities in float fields.

Note: this module imports nothing heavy (no torch), so every layer may import it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The `--device` values the commands accept."""


class UsageError(ValueError):
    """Input the user has to fix: a flag value, a file, a row of a data file. The message names it."""


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot be used: unreadable, damaged, not fitting the model, non-finite.
    The message names the file and the key. The model loaders (`idgrpo.models.weights`) and the engine's
    checkpointer (`idgrpo.engine.checkpoint`) raise this one class."""


def flag(name: str, prefix: str = "") -> str:
    """The command-line spelling of a config field: `grad_clip` -> `--grad-clip`; prefix `model`: `--model.dim`."""
    return "--" + (f"{prefix}." if prefix else "") + name.replace("_", "-")


def _number(config, name: str, prefix: str):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{flag(name, prefix)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{flag(name, prefix)} must be a finite number, got {value}")
    return value


def at_least(config, low: float, *names: str, prefix: str = "") -> None:
    """Each named field is a finite number >= `low`."""
    for name in names:
        value = _number(config, name, prefix)
        if value < low:
            raise UsageError(f"{flag(name, prefix)} must be >= {low}, got {value}")


def above(config, low: float, *names: str, prefix: str = "") -> None:
    """Each named field is a finite number > `low`."""
    for name in names:
        value = _number(config, name, prefix)
        if value <= low:
            raise UsageError(f"{flag(name, prefix)} must be > {low}, got {value}")


def within(config, name: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False,
           prefix: str = "") -> None:
    """The field is a finite number in the interval from `low` to `high` (closed unless `open_*`)."""
    value = _number(config, name, prefix)
    if (value <= low if open_low else value < low) or (value >= high if open_high else value > high):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise UsageError(f"{flag(name, prefix)} must be in {interval}, got {value}")


def one_of(config, name: str, choices: Iterable, *, prefix: str = "") -> None:
    """The field is one of `choices`."""
    choices = tuple(choices)
    value = getattr(config, name)
    if value not in choices:
        raise UsageError(f"{flag(name, prefix)} must be one of {', '.join(map(str, choices))}; got {value!r}")


def device_name(config, name: str = "device") -> None:
    """The field is `auto`, `cpu`, `cuda` or `cuda:N`; a CUDA device must exist."""
    value = getattr(config, name)
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise UsageError(f"{flag(name)} must be auto, cpu, cuda or cuda:N; got {value!r}")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{flag(name)} {value}: no CUDA device is available (use --{name} cpu or auto)")
        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"{flag(name)} {value}: only {torch.cuda.device_count()} CUDA device(s)")
