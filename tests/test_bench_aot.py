"""bench/aot.py: Triton kernels compiled ahead of time for sm_80 / sm_90 on a machine without a GPU.

The compiles run in child processes (this one has Triton in interpreter mode, which compiles
nothing): the CI subset of real kernels, and three synthetic kernels that must each be caught,
one per failure rule (does not compile, shared memory over the target's limit, a hot-path spill).
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import aot

REPO = Path(__file__).resolve().parent.parent


def _python(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"IDGRPO_BENCH_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("triton", ["pinned", "importable"])
def test_quick_subset_compiles_for_both_targets_and_reads_the_binaries(tmp_path, triton):
    """Under torch 2.13's triton (what a GPU machine compiles with; its side environment is made on
    first use) and under whichever triton is importable (the newest must keep working)."""
    done = _python(["-m", "bench.aot", "--quick", "--jobs", "1", *(["--pinned-triton"] if triton == "pinned" else [])],
                   tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    [result_file] = tmp_path.glob("aot-quick-*.json")
    result = json.loads(result_file.read_text())
    rows = result["rows"]
    assert result["triton_pinned_by_torch_2_13"] == aot.TORCH_2_13_TRITON
    if triton == "pinned":
        assert result["environment"]["triton"] == aot.TORCH_2_13_TRITON
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"_rope_kernel", "_attention_fwd_kernel", "_attention_bwd_delta_kernel",
                                           "_group_advantage_kernel"}
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        assert 0 < row["regs"] <= 255 and row["spill_B"] == 0 and row["compile_s"] > 0
        assert row["shared_B"] <= aot.TARGETS[row["target"]][1]
    lowering = {(r["kernel"], r["target"]): r["matmul"] for r in rows}
    assert lowering[("_attention_fwd_kernel", "sm_90")] == "wgmma"  # Hopper tensor cores
    assert lowering[("_attention_fwd_kernel", "sm_80")] == "mma"  # Ampere: mma.sync
    assert lowering[("_rope_kernel", "sm_90")] == "-"  # no tl.dot
    forward = [r for r in rows if r["kernel"] == "_attention_fwd_kernel"]
    assert all(r["shared_B"] > 0 and r["case"] == "attention d128 full dense (fwd)" for r in forward)
    table = result_file.with_suffix(".txt").read_text()
    assert table in done.stdout and f"{len(rows)} compiles, 0 failing" in table


BAD_KERNELS = '''
import json

import torch
import triton
import triton.language as tl

from bench import aot


@triton.jit
def deep_pipeline(A, B, C, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + offs[:, None] * K + k + offs[None, :])
        b = tl.load(B + (k + offs[:, None]) * BLOCK + offs[None, :])
        acc += tl.dot(a, b)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def softmax_row(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    e = tl.exp(x - tl.max(x, 0))
    tl.store(Y + offs, e / tl.sum(e, 0))


@triton.jit
def odd_range(X, N: tl.constexpr):
    tl.store(X + tl.arange(0, N), 0.0)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


with aot.capturing() as launches:
    # 5 stages of two 128x128 fp16 tiles: 320 KB of shared memory, over every target's limit.
    deep_pipeline[(1,)](meta(128, 1024, dtype=torch.float16), meta(1024, 128, dtype=torch.float16),
                        meta(128, 128), 1024, BLOCK=128, num_warps=8, num_stages=5)
    # 32 registers for 32 row values, their exponentials and the reductions: spills.
    softmax_row[(1,)](meta(1024), meta(1024), N=1024, num_warps=1, maxnreg=32)
    odd_range[(1,)](meta(3), N=3)  # arange over 3 elements: not a power of two
jobs = [job for launch in launches for job in aot.jobs_for(launch, target="sm_90", case="synthetic", dtype="bf16",
                                                           hot=True)]
print(json.dumps(aot.run_jobs(jobs, workers=1)))
'''


def test_each_failure_rule_is_caught_on_a_real_compile(tmp_path):
    script = tmp_path / "bad_kernels.py"
    script.write_text(textwrap.dedent(BAD_KERNELS))
    done = _python([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["kernel"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}
    assert rows["deep_pipeline"]["shared_B"] == 320 * 1024 and rows["deep_pipeline"]["matmul"] == "wgmma"
    assert rows["deep_pipeline"]["status"] == "FAIL: shared memory 320 KB > 227 KB"
    assert rows["softmax_row"]["regs"] <= 32 and rows["softmax_row"]["spill_B"] > 0
    assert rows["softmax_row"]["status"].startswith("FAIL: spills")
    assert rows["softmax_row"]["config"] == "w1 maxnreg=32"
    assert rows["odd_range"]["status"].startswith("FAIL: does not compile")
    assert "power of 2" in rows["odd_range"]["error"]


def _row(**overrides) -> dict:
    row = dict(kernel="k", target="sm_90", dtype="bf16", case="c", config="w4", hot=True, error=None, compile_s=1.0,
               shared_B=0, shared_KB=0.0, regs=128, spill_B=0, matmul="-")
    return row | overrides


@pytest.mark.parametrize("overrides, status", [
    ({}, "ok"),
    ({"shared_B": 200 * 1024}, "ok"),  # fits a Hopper block
    ({"shared_B": 200 * 1024, "target": "sm_80"}, "FAIL: shared memory 200 KB > 163 KB"),  # not an Ampere one
    ({"shared_B": 227 * 1024 + 1}, "FAIL: shared memory 227 KB > 227 KB"),
    ({"spill_B": 32}, "FAIL: spills 32 B per thread on the bf16 hot path"),
    ({"spill_B": 32, "dtype": "fp16"}, "FAIL: spills 32 B per thread on the fp16 hot path"),
    ({"spill_B": 32, "dtype": "fp32"}, "spills"),  # the accuracy path: reported, not failed
    ({"spill_B": 32, "hot": False}, "spills"),
    ({"error": "CompilationError: at 3:4:\nboom"}, "FAIL: does not compile: boom"),
])
def test_failure_rules(overrides, status):
    assert aot.with_status(_row(**overrides))["status"] == status


def test_full_run_exit_code_follows_the_rows(tmp_path, monkeypatch):
    """`python -m bench aot` fails exactly when a row fails (its summary names each failing one)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # _check is replaced: nothing compiles here
    rows = [aot.with_status(_row()), aot.with_status(_row(kernel="dkdv", spill_B=1424, config="BLOCK_N=128 w4 s3"))]
    monkeypatch.setattr(aot, "_check", lambda args: rows)
    assert aot.run(["--rows-out", str(tmp_path / "rows.json")]) == 1
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert aot.summary(rows)[1] == "FAIL dkdv sm_90 bf16 [c] BLOCK_N=128 w4 s3: spills 1424 B per thread on the " \
                                   "bf16 hot path"
    monkeypatch.setattr(aot, "_check", lambda args: rows[:1])
    assert aot.run([]) == 0


def test_every_kernel_is_launched_by_some_case(tmp_path):
    """A kernel added to idgrpo/kernels without a case in bench/aot.py would never be compiled: the full
    run fails on it. Here: every `*_kernel` of every module there is planned for compiles."""
    import idgrpo.kernels

    defined = set()
    for path in Path(idgrpo.kernels.__file__).parent.glob("*.py"):
        module = importlib.import_module(f"idgrpo.kernels.{path.stem}")
        defined |= {f"{module.__name__}.{name}" for name in vars(module) if name.endswith("_kernel")}
    done = _python(["-m", "bench.aot", "--list"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    planned = dict(line.split(": ") for line in done.stdout.splitlines()[1:])
    assert set(planned) == defined
    assert all(int(count.split()[0]) > 0 for count in planned.values())
    assert aot.with_status(_row(uncovered=True))["status"] == "FAIL: no case of bench/aot.py launches this kernel"
