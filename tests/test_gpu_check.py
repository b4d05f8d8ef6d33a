"""bench/gpu_check.sh: its --dry-run runs every step on the CPU at tiny sizes within the budget, records each
step's table in a dry-run entry, and never touches bench/RESULTS.md; an exhausted budget skips steps and fails."""

import os
import subprocess
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"IDGRPO_GPU_CHECK_DIR": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _steps(run_dir: Path) -> dict[str, str]:
    return {line.split("\t")[0]: line.split("\t")[1] for line in (run_dir / "steps.tsv").read_text().splitlines()}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_records_their_tables(tmp_path):
    results_before = (REPO / "bench" / "RESULTS.md").read_text()
    done = _run(tmp_path, "--dry-run", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _steps(tmp_path) == {"kernels": "ok", "attention": "ok", "memory-bound": "ok", "e2e": "ok"}
    entry = (tmp_path / "RESULTS.dry-run.md").read_text()
    assert "(dry run: CPU, tiny sizes; timings mean nothing)" in entry
    for name, table in gpu_check.STEP_TABLES.items():
        assert f"{name} (ok):" in entry and f"== {table} (" in entry
        assert list(tmp_path.glob(f"{table}-*.json")), f"{table} wrote no JSON"
    assert " fp16 " in entry and " fp32 " in entry  # the CPU dry run checks both (bf16 needs a GPU)
    assert (REPO / "bench" / "RESULTS.md").read_text() == results_before


def test_exhausted_budget_skips_every_step_and_fails(tmp_path):
    done = _run(tmp_path, "--dry-run", "--budget", "20", timeout=120)
    assert done.returncode == 1
    assert set(_steps(tmp_path).values()) == {"skipped"}
    assert "kernels skipped (0 s)" in (tmp_path / "RESULTS.dry-run.md").read_text()


def test_unknown_option_is_refused(tmp_path):
    done = _run(tmp_path, "--fast", timeout=30)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr


def test_table_is_read_from_after_its_header():
    log = "\n".join(["== grpo_ops (cpu) -> x.json", "note: no GPU here", "op  ms", "--  --", "a   1", "",
                     "== summary", "benchmark  status", "---------  ------", "grpo_ops   ok"])
    assert gpu_check._table(log, "grpo_ops") == "\n".join(log.splitlines()[:5])
    assert gpu_check._table(log, "e2e") is None
