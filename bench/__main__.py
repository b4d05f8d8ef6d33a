"""Run the benchmark suite.

Usage:
    python -m bench                     # every benchmark, full sizes (needs a GPU to mean anything)
    python -m bench attention norm      # a chosen subset
    python -m bench --quick             # tiny sizes: checks on CPU that every benchmark runs
    python -m bench --list
    python -m bench aot                 # a check, run only when named: every kernel compiled for sm_80/sm_90
    python -m bench kernel_check        # a check: every kernel against its reference in bf16/fp16/fp32
    python -m bench objectives          # a study (45 min on 2 CPU cores): GRPO arms vs DiffusionNFT on the demo

Each benchmark is a module `bench/<name>.py` with `main(quick: bool) -> list[dict]` that
prints its own table and writes its JSON under bench/results/; this runner prints one
summary table last.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback

# Benchmarks in the order they run; a module that does not exist yet is skipped with a note.
BENCHMARKS = ["attention", "grpo_ops", "glue", "engine", "sp_comm", "dit", "reward", "e2e"]
# Checks pass or fail rather than measure, and studies take tens of minutes: they run only when named
# (bench/README.md).
CHECKS = ["aot", "kernel_check", "objectives"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"subset of: {', '.join(BENCHMARKS + CHECKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; checks that each benchmark runs")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS + CHECKS))
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS + CHECKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS + CHECKS}")
    import torch

    if not torch.cuda.is_available():
        # Note: one process runs several benchmarks, and whichever imports triton first fixes
        # interpreter mode for all of them; decide it here, before any benchmark is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.common import format_table

    summary, failed = [], 0
    for name in args.names or BENCHMARKS:
        if importlib.util.find_spec(f"bench.{name}") is None:
            summary.append({"benchmark": name, "status": "not built yet", "rows": 0, "seconds": 0.0})
            continue
        t0 = time.perf_counter()
        try:
            rows = importlib.import_module(f"bench.{name}").main(quick=args.quick)
            summary.append({"benchmark": name, "status": "ok", "rows": len(rows or []),
                            "seconds": time.perf_counter() - t0})
        except Exception:  # keep going: one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed += 1
            summary.append({"benchmark": name, "status": "FAILED", "rows": 0, "seconds": time.perf_counter() - t0})
    print("\n== summary")
    print(format_table(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
