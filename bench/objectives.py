"""Which objective buys the identity gain fastest: the demo's synthetic world, one pretrained policy and reward
model per seed (stages 1-3 cached), and stage 4 run with each arm (docs/objective-study.md).

Usage:
    python -m bench objectives                       # 5 arms x seeds 0 1 2, full demo sizes (about 70 min, 2 cores)
    python -m bench.objectives --seeds 0 --arms full nft
    python -m bench.objectives --quick               # the demo's --quick sizes, seed 0: checks that it runs

Arms (flags of `idgrpo demo`):
- window3: GRPO on a fixed SDE window of the first 3 of 6 steps (the demo's default);
- full:    GRPO on the full SDE trajectory (every step stochastic and trained), as the Identity-GRPO paper;
- window2: GRPO on a fixed window of 2 steps (Flow-GRPO-Fast);
- sliding: GRPO on a window of 2 steps that slides by one step every 2 epochs (MixGRPO);
- nft:     DiffusionNFT (Euler ODE rollouts of the old policy, 3 of 6 noise levels per sample, the official KL weight).

Every arm runs 16 epochs of 4 prompt rows x 8 videos (`STUDY_SCHEDULE`, the demo's default when the study ran).
Every arm is a separate `idgrpo demo` process (the first of a seed also builds the cache: its total time is the
demo's). Wall time is stage 4's training time (`train_wall_s`: the held-out curve evaluations excluded), policy
forwards the videos through the DiT's forward. Writes bench/results/objectives/{results.json,table.md} and
docs/demo/objectives.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "objectives"
PLOT = ROOT / "docs" / "demo" / "objectives.png"


def arms(num_steps: int) -> dict[str, list[str]]:
    """Each arm's `idgrpo demo` flags, every window setting explicit (independent of the demo's defaults)."""
    fixed = ["--sde-window-slide-every", "0"]
    return {
        "window3": ["--sde-window-size", "3", *fixed],
        "full": ["--sde-window-size", str(num_steps), *fixed],
        "window2": ["--sde-window-size", "2", *fixed],
        "sliding": ["--sde-window-size", "2", "--sde-window-slide-every", "2"],
        "nft": ["--objective", "nft", "--timestep-fraction", "0.5", "--kl-beta", "1e-4"],
    }


STUDY_SCHEDULE = ["--grpo-epochs", "16", "--prompts-per-epoch", "4"]
"""The stage-4 schedule every arm ran in the study (docs/objective-study.md): the demo's default then. The demo now
runs 12 epochs of 6 rows; pinning the study's keeps its numbers reproducible."""

LABELS = {"window3": "GRPO, window 3 (the demo default)", "full": "GRPO, full trajectory (paper)",
          "window2": "GRPO, window 2 (Flow-GRPO-Fast)", "sliding": "GRPO, sliding window 2 (MixGRPO)",
          "nft": "DiffusionNFT (ODE rollouts)"}


def run_arm(arm: str, flags: list[str], seed: int, quick: bool, work: Path) -> dict:
    run_dir = work / f"seed{seed}" / arm
    argv = [sys.executable, "-m", "idgrpo", "demo", "--seed", str(seed), "--run-dir", str(run_dir),
            "--stage-cache", str(work / "cache"), "--curve-every", "1" if quick else "2", *flags]
    argv += ["--quick"] if quick else STUDY_SCHEDULE
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["before"]["oracle_mean"]
    curve = [{"train_wall_s": 0.0, "policy_forwards": 0, "oracle": before,
              "reward": summary["before"]["reward_mean"]}]
    for record in summary["grpo"]["history"]:
        if "eval_oracle" in record:
            curve.append({"train_wall_s": record["train_wall_s"], "policy_forwards": record["policy_forwards"],
                          "oracle": record["eval_oracle"], "reward": record["eval_reward"]})
    return {"arm": arm, "seed": seed, "flags": flags, "process_s": time.monotonic() - started,
            "total_s": summary["timings_s"]["total_s"], "cached": "cache_load_s" in summary["timings_s"],
            "oracle_before": before, "oracle_after": summary["after"]["oracle_mean"],
            "oracle_gain": summary["oracle_change_relative"], "reward_change": summary["reward_change"],
            "train_wall_s": summary["grpo"]["history"][-1]["train_wall_s"],
            "policy_forwards": summary["grpo"]["history"][-1]["policy_forwards"], "curve": curve}


def time_to_reach(result: dict, oracle: float) -> float | None:
    """Training seconds at the first curve point whose oracle is at least `oracle` (None: never)."""
    for point in result["curve"][1:]:
        if point["oracle"] >= oracle:
            return point["train_wall_s"]
    return None


def analyse(results: list[dict]) -> dict:
    """Per arm: mean/min oracle gain, time to reach the full-trajectory arm's final oracle (per seed, as a fraction
    of that arm's training time), reward hacking (learned reward up while the oracle goes down)."""
    seeds = sorted({r["seed"] for r in results})
    by = {(r["arm"], r["seed"]): r for r in results}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [by[(arm, s)] for s in seeds if (arm, s) in by]
        fractions = []
        for r in rows:
            paper = by.get(("full", r["seed"]))
            if paper is None:
                continue
            reached = time_to_reach(r, paper["oracle_after"])
            fractions.append(None if reached is None else reached / paper["train_wall_s"])
        out[arm] = {
            "seeds": [r["seed"] for r in rows],
            "oracle_gain_mean": sum(r["oracle_gain"] for r in rows) / len(rows),
            "oracle_gain_min": min(r["oracle_gain"] for r in rows),
            "reward_change_mean": sum(r["reward_change"] for r in rows) / len(rows),
            "train_wall_s_mean": sum(r["train_wall_s"] for r in rows) / len(rows),
            "policy_forwards": rows[0]["policy_forwards"],
            "fraction_of_paper_time_to_paper_gain": fractions,
            "reaches_paper_gain_in_half_the_time_on_every_seed": bool(fractions) and all(
                f is not None and f <= 0.5 for f in fractions),
            "reward_hacking_seeds": [r["seed"] for r in rows if r["reward_change"] > 0 and r["oracle_gain"] < 0],
        }
    return out


def table(analysis: dict, results: list[dict]) -> str:
    def fmt(fractions):
        return ", ".join("never" if f is None else f"{f:.2f}" for f in fractions) or "-"

    lines = ["| arm | oracle gain, mean (min) | learned reward change | stage-4 training s | policy forwards (videos) "
             "| time to the paper arm's gain, per seed (fraction of its time) | reward hacking |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in analysis.items():
        hacking = ", ".join(f"seed {s}" for s in a["reward_hacking_seeds"]) or "none"
        lines.append(f"| {LABELS.get(arm, arm)} | {a['oracle_gain_mean']:+.1%} ({a['oracle_gain_min']:+.1%}) | "
                     f"{a['reward_change_mean']:+.3f} | {a['train_wall_s_mean']:.0f} | {a['policy_forwards']} | "
                     f"{fmt(a['fraction_of_paper_time_to_paper_gain'])} | {hacking} |")
    seeds = sorted({r["seed"] for r in results})
    lines += ["", "Per seed, oracle gain (relative) and stage-4 training seconds:", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    by = {(r["arm"], r["seed"]): r for r in results}
    for arm in analysis:
        cells = [f"{by[(arm, s)]['oracle_gain']:+.1%} in {by[(arm, s)]['train_wall_s']:.0f} s" if (arm, s) in by
                 else "-" for s in seeds]
        lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Oracle gain (relative to the pretrained policy) against stage-4 training time and against policy forwards:
    each seed a thin line, the mean over seeds a thick one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Held-out oracle identity consistency during stage 4 (demo world; mean of seeds thick)")
    time_axes, forward_axes = figure.subplots(1, 2)
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in results))}
    for arm in colours:
        rows = [r for r in results if r["arm"] == arm]
        for r in rows:
            gains = [p["oracle"] / r["oracle_before"] - 1 for p in r["curve"]]
            for axes, key in ((time_axes, "train_wall_s"), (forward_axes, "policy_forwards")):
                axes.plot([p[key] for p in r["curve"]], gains, linewidth=0.7, alpha=0.35, color=colours[arm])
        n = min(len(r["curve"]) for r in rows)
        for axes, key in ((time_axes, "train_wall_s"), (forward_axes, "policy_forwards")):
            xs = [sum(r["curve"][i][key] for r in rows) / len(rows) for i in range(n)]
            ys = [sum(r["curve"][i]["oracle"] / r["oracle_before"] - 1 for r in rows) / len(rows) for i in range(n)]
            axes.plot(xs, ys, linewidth=2.2, marker="o", markersize=3, color=colours[arm], label=LABELS.get(arm, arm))
    for axes, label in ((time_axes, "stage-4 training time (s, 2 CPU cores)"),
                        (forward_axes, "policy forwards (videos through the DiT)")):
        axes.set_xlabel(label)
        axes.set_ylabel("oracle gain over the pretrained policy")
        axes.yaxis.set_major_formatter(lambda v, _: f"{v:+.0%}")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.grid(True, alpha=0.3)
    time_axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def main(quick: bool = False, seeds: list[int] | None = None, names: list[str] | None = None,
         work: Path | None = None) -> list[dict]:
    seeds = seeds if seeds is not None else ([0] if quick else [0, 1, 2])
    all_arms = arms(4 if quick else 6)
    names = names or list(all_arms)
    unknown = [n for n in names if n not in all_arms]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms: {list(all_arms)}")
    standard = work is None and not quick  # the study of docs/objective-study.md: its plot goes to docs/demo/
    work = work or (OUT / ("quick" if quick else "runs"))
    results = []
    for seed in seeds:
        for name in names:
            result = run_arm(name, all_arms[name], seed, quick, work)
            results.append(result)
            built = "" if result["cached"] else f" (stages 1-3 built: demo total {result['total_s']:.0f} s)"
            print(f"[objectives] seed {seed} {name:8s} oracle {result['oracle_before']:.3f} -> "
                  f"{result['oracle_after']:.3f} ({result['oracle_gain']:+.1%}), learned reward "
                  f"{result['reward_change']:+.3f}, stage 4 {result['train_wall_s']:.0f} s{built}", flush=True)
    analysis = analyse(results)
    text = table(analysis, results)
    print(text)
    out = work.parent if not quick else work
    out.mkdir(parents=True, exist_ok=True)
    (out / ("results.json" if not quick else "quick.json")).write_text(
        json.dumps({"results": results, "analysis": analysis}, indent=1, allow_nan=False))
    (out / ("table.md" if not quick else "quick.md")).write_text(text + "\n")
    plot(results, PLOT if standard else out / "objectives.png")
    return [{"arm": a, **{k: v for k, v in s.items() if not isinstance(v, list)}} for a, s in analysis.items()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.objectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--arms", nargs="*")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: bench/results/objectives/runs); "
                                                    "results, table and plot go to its parent")
    args = parser.parse_args()
    main(args.quick, args.seeds, args.arms, args.work)
