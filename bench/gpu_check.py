"""The steps of bench/gpu_check.sh that need Python: attention at the Wan shapes only, one reduced end-to-end
epoch, and the dated entry appended to bench/RESULTS.md.

Usage (bench/gpu_check.sh calls these; each also runs alone):
    python -m bench.gpu_check attention [--quick]   # bench/attention.py at 1x32760x12x128 and 1x32760x40x128
    python -m bench.gpu_check e2e [--quick]         # bench/e2e.py: one reduced epoch per mode, compact reward
    python -m bench.gpu_check record RUN_DIR [--results FILE]

--quick runs the same code at bench's tiny CPU sizes (the dry run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
WAN_SHAPES = ("wan1.3b-self", "wan14b-self")  # (1, 32760, 12 | 40, 128), bf16, non-causal
# The reduced epoch: the full recipe's model, resolution and group micro-batch, with 4 sampling steps and one
# prompt x 4 videos, so that a warm-up and a measured epoch per mode fit in two minutes on an H100.
E2E_REDUCED = dict(num_steps=4, prompts_per_epoch=1, group_size=4, batch=4)
# Step name in gpu_check.sh -> the benchmark whose table its log ends with.
STEP_TABLES = {"kernels": "kernel_check", "attention": "attention", "memory-bound": "grpo_ops", "e2e": "e2e"}


def attention(quick: bool) -> None:
    import bench.attention as bench_attention

    every_shape = bench_attention._shapes

    def wan_only(quick: bool, on_gpu: bool) -> list[dict]:
        shapes = every_shape(quick, on_gpu)
        return shapes[:1] if quick else [s for s in shapes if s["name"] in WAN_SHAPES]

    with mock.patch.object(bench_attention, "_shapes", wan_only):
        bench_attention.main(quick=quick)


def e2e(quick: bool) -> None:
    import bench.e2e as bench_e2e

    with mock.patch.dict(bench_e2e.FULL, E2E_REDUCED), mock.patch.object(bench_e2e, "REPETITIONS", 1), \
            mock.patch.dict(os.environ, {"IDGRPO_E2E_REWARDS": "compact"}):
        bench_e2e.main(quick=quick)


def _table(log: str, name: str) -> str | None:
    """The table a benchmark printed after its `== name (...)` header (benchmarks print it last)."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"== {name} (")]
    if not starts:
        return None
    block = []
    for line in lines[starts[-1]:]:
        if not line.strip() or line.startswith("Traceback"):
            break
        block.append(line)
    return "\n".join(block)


def _versions() -> dict:
    from bench.common import environment

    env = environment()
    flash = "not installed"
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn

        flash = flash_attn.__version__
    return env | {"flash_attn": flash}


def entry(run_dir: Path, dry_run: bool) -> str:
    """A RESULTS.md entry: when, where, what ran, and each step's table."""
    env = _versions()
    steps = [line.split("\t") for line in (run_dir / "steps.tsv").read_text().splitlines() if line.strip()]
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"### {date}: {env['device']}" + (" (dry run: CPU, tiny sizes; timings mean nothing)" if dry_run else "")
    parts = [
        title, "",
        f"- driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"flash-attn {env['flash_attn']}, python {env['python']}; commit {env['commit']}",
        "- `bash bench/gpu_check.sh`: " + ", ".join(f"{name} {status} ({secs} s)" for name, status, secs in steps),
        f"- logs and JSON: `{run_dir}`",
    ]
    for name, status, _ in steps:
        log_file = run_dir / f"{name}.log"
        table = _table(log_file.read_text(errors="replace"), STEP_TABLES[name]) if log_file.exists() else None
        parts += ["", f"{name} ({status}):", "", "```", table or "(no table: see the log)", "```"]
    return "\n".join(parts) + "\n"


def record(run_dir: Path, results: Path, dry_run: bool) -> None:
    text = entry(run_dir, dry_run)
    with results.open("a") as f:
        f.write("\n" + text)
    print(text, end="")
    print(f"appended to {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["attention", "e2e", "record"])
    parser.add_argument("run_dir", nargs="?", type=Path, help="record: the run's folder (logs, steps.tsv)")
    parser.add_argument("--quick", action="store_true", help="tiny CPU sizes (the dry run)")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="record: the file to append to")
    args = parser.parse_args(argv)
    if args.step == "record":
        if args.run_dir is None:
            parser.error("record needs RUN_DIR")
        record(args.run_dir, args.results, dry_run=args.quick)
    else:
        {"attention": attention, "e2e": e2e}[args.step](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
