"""The embedding examples of examples/ (docs/embedding.md) run as a user runs them, each in a subprocess, and do
what they print: the reward rises, checkpoints reload (at another world size), the LoRA adapters were trained."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from idgrpo.testing import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(*args: str, torchrun: int = 0) -> str:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                     "--master-port", str(free_port())]
    result = subprocess.run([*launcher, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _trained_lora_b(adapter_dir: Path) -> list[torch.Tensor]:
    """The lora_B factors of a PEFT export: zero when the adapters are created, so non-zero only after training."""
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = [v for k, v in weights.items() if ".lora_B." in k]
    assert factors and all(torch.isfinite(v).all() for v in weights.values())
    return factors


@pytest.mark.slow
def test_custom_policy_and_reward_example_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    stdout = _run("examples/custom_policy_grpo.py", "--out", str(out), "--epochs", "5", "--pretrain-steps", "200")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 5 and f"{summary['reward_after']:.3f}" in stdout
    assert summary["reward_after"] > summary["reward_before"] + 0.05, summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    assert any(v.abs().max() > 0 for v in _trained_lora_b(out / "lora"))


@pytest.mark.slow
def test_engine_example_on_two_processes_resumes_on_one_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    flags = ("--save-every", "6", "--log-every", "6")
    _run("examples/engine_fsdp_training.py", "--out", str(out), "--steps", "12", *flags, torchrun=2)
    first = json.loads((out / "summary.json").read_text())
    assert first["world_size"] == 2 and first["held_out_loss_after"] < first["held_out_loss_before"]
    # One process resumes the two-process run: the sharded checkpoint is read at another world size.
    stdout = _run("examples/engine_fsdp_training.py", "--out", str(out), "--steps", "18", *flags)
    assert "resumed from step 12" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 12 and summary["world_size"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000012", "step_00000018"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [6, 12, 18]
    # The exported weights are plain PyTorch's: a fresh model loads them and gives the held-out loss it printed.
    spec = importlib.util.spec_from_file_location("engine_fsdp_training", EXAMPLES / "engine_fsdp_training.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    student = example.Student()
    student.load_state_dict(load_file(str(out / "model.safetensors")))
    x, y = example.teacher_batch(10**6, example.GLOBAL_BATCH)
    with torch.no_grad():
        loss = F.mse_loss(student(x), y).item()
    assert loss == pytest.approx(summary["held_out_loss_after"], rel=1e-4)
    assert loss < summary["held_out_loss_before"] / 2


@pytest.mark.slow
def test_wan_lora_recipe_example_with_a_custom_reward(tmp_path):
    out = tmp_path / "run"
    stdout = _run("examples/wan_lora_custom_reward.py", "--out", str(out), "--epochs", "2", "--target", "blue")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and "evaluation reward" in stdout
    assert all(0 <= r <= 1 for r in [summary["eval_reward_before"], summary["eval_reward_after"],
                                      *summary["training_reward"]])
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["reward"].endswith(":target_colour_reward") and settings["extra"] == {"target": "blue"}
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 8 and "blocks.0.attn1.to_q" in config["target_modules"]
    assert any(v.abs().max() > 0 for v in _trained_lora_b(out / "lora"))
    assert (out / "lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()
