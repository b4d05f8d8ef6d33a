"""Training curves of a GRPO or NFT run as one PNG: reward (training mean ± std and evaluation), the demo's oracle,
distance to the reference policy, clipped fraction, per epoch. `GRPOTrainer` writes it as
`<run_dir>/reward_curve.png` at every evaluation and at the end of a run; `idgrpo demo` writes its own.

    plot_training(trainer.history, "curves.png", title="my run")

matplotlib is imported here only, when a plot is drawn, and drawn through its Agg canvas (no display, no change to
the process's pyplot backend).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# (history key, label) per series, per panel: (title, y-axis label, series)
PANELS = (
    ("Reward per video", "reward (reward model's units)",
     (("reward_mean", "training (rollouts)"), ("eval_reward", "evaluation (fixed noise, ODE)"))),
    ("Oracle identity consistency", "consistency (1 = every person kept)",
     (("eval_oracle", "held-out scenes (fixed noise, ODE)"),)),
    ("KL to the reference policy", "KL (nats per latent element)", (("kl", "training"),)),
    ("Distance to the reference policy", "mean squared velocity difference", (("velocity_kl", "training (NFT)"),)),
    ("Clipped fraction", "fraction of ratios clipped", (("clipfrac", "training"),)),
)
"""`eval_oracle` is the demo's (its synthetic world has an exact identity oracle); `velocity_kl` is NFT's KL term,
`kl` and `clipfrac` GRPO's. A panel is drawn when its series have values."""


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(history: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records whose `key` is a finite number (NaN/Inf points are left out)."""
    points = [(float(r["epoch"]), float(r[key])) for r in history if _finite(r.get(key)) and _finite(r.get("epoch"))]
    return [e for e, _ in points], [v for _, v in points]


def plot_training(history: Sequence[Mapping], path: str | Path, *, title: str = "GRPO training") -> Path | None:
    """Draw the panels of `PANELS` that `history` (the trainer's per-epoch records) has finite values for, side by
    side, and write them to `path` as a PNG; None when there is nothing to draw. The training reward carries a band of
    ± its standard deviation over the epoch's videos. Errors (a full disk, matplotlib missing) propagate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(name, unit, [(label, *_series(history, key)) for key, label in series])
              for name, unit, series in PANELS]
    panels = [(name, unit, [s for s in series if s[1]]) for name, unit, series in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    figure = Figure(figsize=(4.6 * len(panels), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    grid = figure.subplots(1, len(panels), squeeze=False, sharex=True)[0]  # shared epochs: one x range
    for axes, (name, unit, series) in zip(grid, panels, strict=True):
        for label, epochs, values in series:
            (line,) = axes.plot(epochs, values, marker="o", markersize=3, label=label)
            if label.startswith("training") and name.startswith("Reward"):
                epochs_std, std = _series(history, "reward_std")
                band = dict(zip(epochs_std, std, strict=True))
                with_band = [(e, v, band[e]) for e, v in zip(epochs, values, strict=True) if e in band]
                if with_band:
                    axes.fill_between([e for e, _, _ in with_band], [v - s for _, v, s in with_band],
                                      [v + s for _, v, s in with_band], color=line.get_color(), alpha=0.2,
                                      linewidth=0, label="± std over the epoch's videos")
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(unit)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
