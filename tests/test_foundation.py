"""The package skeleton: backend dispatch, the CLI, and the distributed test helper."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from idgrpo.kernels import backend
from idgrpo.testing import poisoned_empty, randn, run_distributed


def test_auto_backend_follows_the_device(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    cpu = torch.zeros(3)
    assert backend.resolve(None, cpu) == "reference"
    assert backend.resolve("auto", cpu, None) == "reference"
    assert backend.resolve("reference", cpu) == "reference"
    assert backend.choose("auto", on_cuda=True) == "triton"


def test_env_var_sets_the_default_and_is_validated(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.choose(None, on_cuda=True) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="IDGRPO_KERNELS"):
        backend.resolve(None, torch.zeros(1))
    with pytest.raises(ValueError, match="backend='fast'"):
        backend.resolve("fast", torch.zeros(1))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve("triton", torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.resolve("triton", torch.zeros(1))


def test_autotune_keeps_one_config_when_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.autotune_configs([1, 2, 3]) == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.autotune_configs([1, 2, 3]) == [1, 2, 3]


def test_helpers_are_seeded_and_poisoned():
    a, b = randn(5, 7, seed=3), randn(5, 7, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, randn(5, 7, seed=4))
    assert (a != 0).all()
    assert torch.isnan(poisoned_empty(4, 3)).all()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idgrpo", *args], capture_output=True, text=True,
                          env={**os.environ, "IDGRPO_KERNELS": "auto"}, timeout=120)


def test_cli_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0 and "env" in out.stdout
    bad = _cli("no-such-command")
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_cli_env_reports_versions_and_backends():
    out = _cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert set(info["accelerators"]) == {"flash_attn", "apex"}
    assert set(info["kernel_backend"]) == set(backend.OPS)
    expected = "triton" if torch.cuda.is_available() else "reference"
    assert all(v in (expected, "not built") for v in info["kernel_backend"].values())


def _allreduce_rank(rank: int, world_size: int, base: float):
    t = torch.tensor([base + rank])
    dist.all_reduce(t)
    return rank, world_size, t.item()


def test_run_distributed_gloo_two_ranks():
    results = run_distributed(_allreduce_rank, 2, 10.0)
    assert results == [(0, 2, 21.0), (1, 2, 21.0)]


def _fail_on_rank_one(rank: int, world_size: int):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_distributed_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=20)
