"""Stops at every named fault point of `train-reward` (one and two gloo processes), then a resume: the final weights,
the last checkpoint (weights, optimizer state, RNG) and the logs equal those of a run that never stopped; a full
disk during a save leaves the previous checkpoint loadable. The points and the IDGRPO_FAULT syntax are in
idgrpo.engine.faults (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idgrpo.cli import main
from idgrpo.engine import faults
from idgrpo.engine.faults import FAULT_ENV, FAULT_EXIT_CODE, InjectedFault, fault_point
from idgrpo.testing import free_port, run_distributed

TINY = ["--model.image-size", "16", "--model.patch-size", "8", "--model.dim", "16", "--model.depth", "1",
        "--model.heads", "2", "--model.parts", "2"]
EPOCHS = 3  # 2 steps an epoch: checkpoints at steps 2, 4, 6


def train_args(pairs: Path, out: Path) -> list[str]:
    return ["train-reward", "--data", str(pairs / "pairs.jsonl"), "--out", str(out), "--held-out-fraction", "0.34",
            "--batch-size", "8", "--threads", "1", "--epochs", str(EPOCHS), *TINY]


def run_state(out: Path) -> dict:
    """Everything a finished run leaves that must not depend on where it was stopped (wall times left out)."""
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    last = checkpoints[-1]
    index = json.loads((last / "index.json").read_text())
    untimed = lambda record: {k: v for k, v in record.items() if k not in ("time_s", "minutes")}
    return {
        "checkpoints": [p.name for p in checkpoints],
        "final": load_file(out / "final" / "reward_model.safetensors"),
        "last_checkpoint": {f.name: load_file(f) for f in sorted(last.glob("rank_*.safetensors"))},
        "history": [untimed(r) for r in index["extra"]["history"]],
        "metrics": [untimed(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()],
        "eval": [untimed(json.loads(line)) for line in (out / "eval.jsonl").read_text().splitlines()],
    }


def assert_same_run(got: dict, want: dict) -> None:
    assert got["checkpoints"] == want["checkpoints"]
    for key in ("final", *want["last_checkpoint"]):
        a = got["final"] if key == "final" else got["last_checkpoint"][key]
        b = want["final"] if key == "final" else want["last_checkpoint"][key]
        assert a.keys() == b.keys(), key
        for name in b:
            assert torch.equal(a[name], b[name]), f"{key}: {name} differs from the uninterrupted run"
    for log in ("history", "metrics", "eval"):
        assert got[log] == want[log], f"{log} differs from the uninterrupted run"
    assert [r["step"] for r in got["metrics"]] == [2 * (e + 1) for e in range(EPOCHS)]  # each step logged once


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    main(["synth-pairs", "--out", str(out), "--num-videos", "6", "--pairs-per-video", "4", "--num-frames", "9",
          "--seed", "3"])
    return out


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    main(train_args(pairs, out))
    return run_state(out)


# ---------------------------------------------------------------------------------------------- the hook itself


def test_fault_spec_count_rank_and_actions(monkeypatch, tmp_path):
    monkeypatch.setenv(FAULT_ENV, "checkpoint.*:2:raise")
    fault_point("checkpoint.publish")  # 1st match: passes
    fault_point("metrics.flush")  # no match
    torn = []
    with pytest.raises(InjectedFault, match="raise at checkpoint.prune"):
        fault_point("checkpoint.prune", torn=lambda: torn.append(True))
    assert torn == [True]
    fault_point("checkpoint.publish")  # fired once; later matches pass
    monkeypatch.setenv(FAULT_ENV, "step@1:raise")  # another rank's fault
    fault_point("step")
    monkeypatch.setenv(FAULT_ENV, "write/*:enospc")
    with pytest.raises(OSError, match="No space left on device") as err:
        fault_point("write/index.json")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setenv(FAULT_ENV, "step:often")
    with pytest.raises(ValueError, match="'often' is neither a count nor one of exit, raise, enospc"):
        fault_point("step")
    monkeypatch.delenv(FAULT_ENV)
    fault_point("step")
    assert faults._state["spec"] is None


def test_exit_action_ends_the_process_like_a_kill(tmp_path):
    script = "from idgrpo.engine.faults import fault_point\nfault_point('step')\nprint('not reached')\n"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, FAULT_ENV: "step"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == FAULT_EXIT_CODE
    assert "not reached" not in done.stdout and "IDGRPO_FAULT=step: exit at step" in done.stderr


# ---------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("spec, resumes_at", [
    ("step:3", 2),                                    # mid-step, before the update is committed
    ("write/rank_00000.safetensors:2", 2),            # the rank file half written
    ("write/index.json:2", 2),                        # rank files written, the index half written
    ("checkpoint.publish:2", 2),                      # every file written, not yet renamed into place
    ("checkpoint.prune:2", 4),                        # published, the older ones not pruned yet
    ("metrics.flush:2", 2),                           # half a metrics record written
    ("write/run.json", 0),                            # the run record half written, at the very start
    ("write/reward_model.safetensors", 6),            # the final export half written
])  # fmt: skip
def test_stop_anywhere_then_resume_equals_the_uninterrupted_run(pairs, reference, tmp_path, monkeypatch, capsys,
                                                                  spec, resumes_at):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, f"{spec}:raise")
    with pytest.raises(InjectedFault):
        main(train_args(pairs, out))
    monkeypatch.delenv(FAULT_ENV)
    capsys.readouterr()
    main(train_args(pairs, out))
    printed = capsys.readouterr().out
    if resumes_at:
        assert f"(step {resumes_at})" in printed
    else:
        assert "resumed" not in printed
    assert_same_run(run_state(out), reference)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(pairs, reference, tmp_path, monkeypatch):
    from idgrpo.engine import FSDP, Checkpointer, build_optimizer
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "write/rank_00000.safetensors:2:enospc")
    with pytest.raises(OSError, match="No space left on device"):
        main(train_args(pairs, out))
    monkeypatch.delenv(FAULT_ENV)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp_step_00000004", "step_00000002"]
    assert not list((checkpoints / ".tmp_step_00000004").iterdir())  # the partial file was removed
    model = FSDP(IdentityRewardModel(RewardModelConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2,
                                                       parts=2)))
    assert Checkpointer(checkpoints).load_latest(model, build_optimizer(model.trainable_parameters(), lr=1e-3))[0] == 2
    main(train_args(pairs, out))
    assert_same_run(run_state(out), reference)


@pytest.mark.parametrize("spec", ["checkpoint.publish:2", "metrics.flush:3"])
def test_killed_process_then_resume_equals_the_uninterrupted_run(pairs, reference, tmp_path, spec):
    out = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: spec, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "idgrpo", *train_args(pairs, out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    assert not (out / "final").exists()
    if spec.startswith("metrics"):  # the kill left half a record behind
        assert not (out / "metrics.jsonl").read_text().endswith("\n")
    main(train_args(pairs, out))
    assert_same_run(run_state(out), reference)


# ---------------------------------------------------------------------------------------------- two processes

TWO_RANK_CASES = {  # spec -> what each rank's stopped run raises
    "write/rank_*:2:raise": ("InjectedFault", "InjectedFault"),  # every rank stopped while writing its file
    "step:3:raise": ("InjectedFault", "InjectedFault"),
    "metrics.flush:2:raise": ("InjectedFault", "InjectedFault"),
    "write/rank_00001.safetensors:2:enospc": ("CheckpointError", "OSError"),  # rank 1's disk is full: both raise
}


def _two_rank_runs(rank, world_size, pairs, root):
    """The uninterrupted run, then each case: stopped, resumed. Returns what each stopped run raised."""
    main(train_args(pairs, root / "reference"))
    raised = {}
    for i, spec in enumerate(TWO_RANK_CASES):
        os.environ[FAULT_ENV] = spec
        try:
            main(train_args(pairs, root / f"case{i}"))
            raised[spec] = None
        except (Exception, InjectedFault) as e:  # noqa: BLE001 - the stop is the point
            raised[spec] = type(e).__name__
        finally:
            del os.environ[FAULT_ENV]
        main(train_args(pairs, root / f"case{i}"))
    return raised


@pytest.fixture(scope="module")
def two_ranks(pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    raised = run_distributed(_two_rank_runs, 2, pairs, root, timeout_s=300)
    return root, raised


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(TWO_RANK_CASES)))
def test_two_processes_stopped_then_resumed_equal_the_uninterrupted_run(two_ranks, case):
    root, raised = two_ranks
    spec = list(TWO_RANK_CASES)[case]
    assert (raised[0][spec], raised[1][spec]) == TWO_RANK_CASES[spec]
    reference = run_state(root / "reference")
    assert set(reference["last_checkpoint"]) == {"rank_00000.safetensors", "rank_00001.safetensors"}
    assert_same_run(run_state(root / f"case{case}"), reference)


def _resume(rank, world_size, pairs, out):
    main(train_args(pairs, out))


@pytest.mark.slow
def test_torchrun_rank_killed_mid_write_then_resumed(pairs, two_ranks, tmp_path):
    root, _ = two_ranks
    out = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: "write/rank_00001.safetensors@1:2", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "idgrpo", *train_args(pairs, out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "exit at write/rank_00001.safetensors" in killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    run_distributed(_resume, 2, pairs, out, timeout_s=300)
    assert_same_run(run_state(out), run_state(root / "reference"))


# ---------------------------------------------------------------------------------------------- train-grpo
# The tiny Wan DiT with LoRA (so the LoRA and EMA exports exist), 3 epochs of 2 optimizer steps, saved every epoch.
# Each save writes, in order: the EMA checkpoint (checkpoints_ema/: rank files, index, publish, prune),
# ema.safetensors, the EMA's LoRA (lora_ema/, lora_ema_diffusers/), the LoRA (lora/, lora_diffusers/), and last the
# checkpoint (checkpoints/); so the n-th save reaches each `write/...` point of a checkpoint or a LoRA export for the
# (2n-1)-th and 2n-th time.
GRPO_EPOCHS = 3
GRPO_EXPORTS = ("ema.safetensors", "lora/adapter_model.safetensors", "lora_diffusers/pytorch_lora_weights.safetensors",
                "lora_ema/adapter_model.safetensors", "lora_ema_diffusers/pytorch_lora_weights.safetensors")


def grpo_args(out: Path) -> list[str]:
    return ["train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4", "--lora-alpha", "4", "--num-steps", "2",
            "--group-size", "2", "--prompts-per-epoch", "2", "--rollout-batch-size", "2", "--updates-per-epoch", "2",
            "--epochs", str(GRPO_EPOCHS), "--save-every", "1", "--eval-every", "0", "--run-dir", str(out)]


def grpo_run_state(out: Path) -> dict:
    """What a finished train-grpo run leaves that must not depend on where it was stopped (wall times left out):
    the last checkpoint and EMA checkpoint (weights, AdamW moments and step, RNG, counters, history), the exports and
    the log."""
    state = {}
    for folder in ("checkpoints", "checkpoints_ema"):
        steps = sorted((out / folder).glob("step_*"))
        index = json.loads((steps[-1] / "index.json").read_text())
        state[folder] = [p.name for p in steps]
        state[f"{folder}/last"] = {f.name: load_file(f) for f in sorted(steps[-1].glob("rank_*.safetensors"))}
        state[f"{folder}/extra"] = index["extra"]
    for export in GRPO_EXPORTS:
        state[export] = {"": load_file(out / export)}
    for config in ("lora/adapter_config.json", "lora_ema/adapter_config.json"):
        state[config] = (out / config).read_text()
    state["metrics"] = [{k: v for k, v in json.loads(line).items() if k != "time_s"}
                        for line in (out / "metrics.jsonl").read_text().splitlines()]
    return state


def assert_same_grpo_run(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):  # tensors by file
            assert got[key].keys() == value.keys(), key
            for file, tensors in value.items():
                assert got[key][file].keys() == tensors.keys(), f"{key} {file}"
                for name, tensor in tensors.items():
                    assert torch.equal(got[key][file][name], tensor), f"{key} {file}: {name} differs"
        else:
            assert got[key] == value, f"{key} differs from the uninterrupted run"
    assert [r["step"] for r in got["metrics"]] == list(range(GRPO_EPOCHS))  # each epoch logged once


@pytest.fixture(scope="module")
def one_thread():
    """train-grpo has no --threads: the in-process runs use one thread, as the killed subprocesses do
    (OMP_NUM_THREADS=1), so that every run adds its floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grpo_reference(one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_reference") / "run"
    main(grpo_args(out))
    return grpo_run_state(out)


GRPO_STOPS = [  # (spec, the epoch the resumed run starts from)
    ("step:3", 1),                                    # mid-step in epoch 1, before the update is committed
    ("write/rank_00000.safetensors:3", 1),            # save 2: the EMA checkpoint's rank file half written
    ("checkpoint.publish:3", 1),                      # save 2: the EMA checkpoint written, not yet published
    ("checkpoint.prune:3", 1),                        # save 2: the EMA checkpoint published, the checkpoint not yet
    ("write/ema.safetensors:2", 1),                   # save 2: the EMA export half written
    ("write/adapter_model.safetensors:3", 1),         # save 2: the EMA's LoRA export half written
    ("write/adapter_model.safetensors:4", 1),         # save 2: the LoRA export half written
    ("write/rank_00000.safetensors:4", 1),            # save 2: the checkpoint's rank file half written
    ("write/index.json:4", 1),                        # save 2: the checkpoint's index half written
    ("checkpoint.publish:4", 1),                      # save 2: the checkpoint written, not yet published
    ("checkpoint.prune:4", 2),                        # save 2: the checkpoint published, older ones not yet pruned
    ("write/pytorch_lora_weights.safetensors:6", 2),  # the last save: the diffusers-format LoRA export half written
    ("metrics.flush:2", 1),                           # half of epoch 1's metrics record written
    ("write/run.json", 0),                            # the run record half written, at the very start
]  # fmt: skip


@pytest.mark.parametrize("spec, resumes_at", GRPO_STOPS, ids=[s for s, _ in GRPO_STOPS])
def test_grpo_stopped_anywhere_then_resumed_equals_the_uninterrupted_run(grpo_reference, tmp_path, monkeypatch,
                                                                          capsys, spec, resumes_at):
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, f"{spec}:raise")
    with pytest.raises(InjectedFault):
        main(grpo_args(out))
    monkeypatch.delenv(FAULT_ENV)
    capsys.readouterr()
    main(grpo_args(out))
    printed = capsys.readouterr().out
    if resumes_at:
        assert f"(epoch {resumes_at})" in printed
    else:
        assert "resumed" not in printed
    assert_same_grpo_run(grpo_run_state(out), grpo_reference)


@pytest.mark.parametrize("spec", ["checkpoint.publish:4", "metrics.flush:2"])
def test_grpo_killed_process_then_resume_equals_the_uninterrupted_run(grpo_reference, tmp_path, spec):
    out = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: spec, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "idgrpo", *grpo_args(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr[-2000:]
    if spec.startswith("metrics"):  # the kill left half a record behind
        assert not (out / "metrics.jsonl").read_text().endswith("\n")
    main(grpo_args(out))
    assert_same_grpo_run(grpo_run_state(out), grpo_reference)


GRPO_TWO_RANK_CASES = {  # spec -> what each rank's stopped run raises
    "write/rank_*:3:raise": ("InjectedFault", "InjectedFault"),  # save 2: every rank stopped writing its EMA shard
    "step:3:raise": ("InjectedFault", "InjectedFault"),
    "metrics.flush:2:raise": ("InjectedFault", "InjectedFault"),
    "write/rank_00001.safetensors:4:enospc": ("CheckpointError", "OSError"),  # save 2: rank 1's disk is full
}


def _grpo_two_rank_runs(rank, world_size, root):
    """The uninterrupted run, then each case: stopped, resumed. Returns what each stopped run raised."""
    main(grpo_args(root / "reference"))
    raised = {}
    for i, spec in enumerate(GRPO_TWO_RANK_CASES):
        os.environ[FAULT_ENV] = spec
        try:
            main(grpo_args(root / f"case{i}"))
            raised[spec] = None
        except (Exception, InjectedFault) as e:  # noqa: BLE001 - the stop is the point
            raised[spec] = type(e).__name__
        finally:
            del os.environ[FAULT_ENV]
        main(grpo_args(root / f"case{i}"))
    return raised


@pytest.fixture(scope="module")
def grpo_two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_two_ranks")
    raised = run_distributed(_grpo_two_rank_runs, 2, root, timeout_s=300)
    return root, raised


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(GRPO_TWO_RANK_CASES)))
def test_grpo_two_processes_stopped_then_resumed_equal_the_uninterrupted_run(grpo_two_ranks, case):
    root, raised = grpo_two_ranks
    spec = list(GRPO_TWO_RANK_CASES)[case]
    assert (raised[0][spec], raised[1][spec]) == GRPO_TWO_RANK_CASES[spec]
    reference = grpo_run_state(root / "reference")
    assert set(reference["checkpoints/last"]) == {"rank_00000.safetensors", "rank_00001.safetensors"}
    assert_same_grpo_run(grpo_run_state(root / f"case{case}"), reference)


def _grpo_resume(rank, world_size, out):
    main(grpo_args(out))


@pytest.mark.slow
def test_grpo_torchrun_rank_killed_mid_write_then_resumed(grpo_two_ranks, tmp_path):
    root, _ = grpo_two_ranks
    out = tmp_path / "run"
    env = {**os.environ, FAULT_ENV: "write/rank_00001.safetensors@1:4", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "idgrpo", *grpo_args(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "exit at write/rank_00001.safetensors" in killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_00000001"]
    run_distributed(_grpo_resume, 2, out, timeout_s=300)
    assert_same_grpo_run(grpo_run_state(out), grpo_run_state(root / "reference"))


COLLECTIVE_TIMEOUT_S = 10


def _grpo_ranks(out: Path, fault: str | None = None) -> list[subprocess.Popen]:
    """Two train-grpo processes (gloo), started as torchrun starts them, long enough to be stopped midway."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    args = [*grpo_args(out), "--epochs", "200", "--save-every", "1000", "--collective-timeout",
            str(COLLECTIVE_TIMEOUT_S)]
    return [subprocess.Popen([sys.executable, "-m", "idgrpo", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                  "OMP_NUM_THREADS": "1", **({FAULT_ENV: fault} if fault and r == 1 else {})})
            for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_grpo_peer_killed_or_stopped_ends_the_others_within_the_collective_timeout(tmp_path, how):
    import signal
    import time

    out = tmp_path / "run"
    ranks = _grpo_ranks(out, fault="step@1:5" if how == "killed" else None)  # killed: exits mid-step in epoch 2
    try:
        if how == "killed":
            ranks[1].wait(timeout=300)
            assert ranks[1].returncode == FAULT_EXIT_CODE
        else:  # stopped (SIGSTOP, as a hung process or a paused node): alive, but in no collective
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 300
            while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
                assert time.monotonic() < deadline and ranks[0].poll() is None, "the run did not start"
                time.sleep(0.05)
            ranks[1].send_signal(signal.SIGSTOP)
        gone = time.monotonic()
        output, _ = ranks[0].communicate(timeout=COLLECTIVE_TIMEOUT_S + 120)
        waited = time.monotonic() - gone
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert ranks[0].returncode == 1, output[-3000:]  # a traceback, as any error that is not a usage error
    assert "train-grpo: 200 epochs" not in output
    assert waited < COLLECTIVE_TIMEOUT_S + 60, f"rank 0 ran {waited:.0f} s after its peer was {how}"
    if how == "stopped":
        assert waited >= COLLECTIVE_TIMEOUT_S - 1  # it was the timeout that ended it, not a lost connection
