"""Shared benchmark plumbing: timing, the environment record, JSON output and the table.

Conventions every benchmark follows:
- the baseline is measured in the same run, on the same shapes and dtype, and named;
- on a machine without a GPU the benchmark still runs (at `--quick` sizes) to prove the
  code path works, and says that its timings are not performance figures;
- results go to `bench/results/<name>-<date>.json` with the device, driver, versions,
  commit and date, and a table is printed last.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device, driver, versions, commit and date for a result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    driver = None
    if cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "driver": driver,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
    }


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, device=None) -> dict:
    """Median / min wall time of `fn()` in milliseconds. On CUDA, timed with events."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.cuda.is_available():
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms_median": times[len(times) // 2], "ms_min": times[0], "iters": iters}


def gpu_note() -> str | None:
    """The caveat printed under a table measured without a GPU."""
    if torch.cuda.is_available():
        return None
    return "no GPU here: this run only checks that the benchmark works; its timings are not performance figures"


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_results(name: str, rows: list[dict], extra: dict | None = None, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or os.environ.get("IDGRPO_BENCH_DIR") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, **(extra or {}), "rows": rows}, indent=2))
    return path


def report(name: str, rows: list[dict], columns: list[str] | None = None, extra: dict | None = None) -> Path:
    """Write the JSON, then print the table last (with the no-GPU caveat where it applies)."""
    path = write_results(name, rows, extra)
    print(f"\n== {name} ({environment()['device']}) -> {path}")
    note = gpu_note()
    if note:
        print(f"note: {note}")
    print(format_table(rows, columns))
    return path
