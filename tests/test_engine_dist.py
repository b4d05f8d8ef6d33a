"""Process group: world size 1 without torchrun, and no hang when one rank fails mid-step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from idgrpo.testing import free_port

REPO = Path(__file__).resolve().parents[1]

TRAIN_AND_FAIL = textwrap.dedent("""
    import os, torch, torch.nn as nn
    from idgrpo.engine import FSDP, build_optimizer, init_distributed
    info = init_distributed(timeout_s=float(os.environ["TEST_TIMEOUT_S"]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(2)]), nn.Linear(8, 1))
    model = FSDP(model, units=list(model[1]))
    opt = build_optimizer(model.trainable_parameters(), lr=1e-3)
    for step in range(4):
        loss = model(torch.randn(3, 4)).square().mean()
        if step == 2 and info.rank == 1:
            raise RuntimeError("injected failure on rank 1")
        loss.backward()
        opt.step()
        opt.zero_grad()
    print("finished", info.rank)
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def test_one_rank_raising_makes_every_rank_exit_nonzero_without_hanging():
    timeout_s = 10
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", TRAIN_AND_FAIL], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TEST_TIMEOUT_S=str(timeout_s)))
        for r in range(2)
    ]
    t0 = time.monotonic()
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout_s + 60)  # start-up + the collective timeout
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), f"exit codes {codes}:\n" + "\n----\n".join(outputs)
    assert "injected failure on rank 1" in outputs[1]
    assert "finished" not in outputs[0]
    assert elapsed < timeout_s + 60


def test_world_size_one_without_torchrun_runs_real_collectives():
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from idgrpo.engine import init_distributed
        info = init_distributed(timeout_s=30)
        t = torch.full((3,), 2.0)
        dist.all_reduce(t)
        out = torch.empty(3)
        dist.reduce_scatter_tensor(out, t)
        again = init_distributed()  # reuses the group
        print(info.rank, info.world_size, info.device, again.world_size, out.tolist())
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:4] == ["0", "1", "cpu", "1"]
    assert "[2.0, 2.0, 2.0]" in res.stdout


def test_rank_helpers_work_without_a_process_group(monkeypatch, tmp_path):
    """Checkpoints, run directories and fault points ask `engine.dist` who they are; a process that never initialised
    a group (a script, a converter) is rank 0 of 1 and has no one to wait for."""
    import pytest
    import torch.distributed as dist

    from idgrpo.engine import barrier, open_run, world
    from idgrpo.engine.faults import FAULT_ENV, InjectedFault, fault_point

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert world() == (0, 1)
    barrier()  # returns at once
    run = open_run(tmp_path / "run", {"lr": 1.0})
    assert not run.resuming and (tmp_path / "run" / "run.json").is_file()  # written by the one process, rank 0
    monkeypatch.setenv(FAULT_ENV, "step@1:raise")
    fault_point("step")  # rank 1's fault: not this process
    monkeypatch.setenv(FAULT_ENV, "step@0:raise")
    with pytest.raises(InjectedFault):
        fault_point("step")
