"""Golden runs: short seeded runs of the commands users launch, pinned to the bit.

Each case runs `idgrpo <command>` through the CLI (so the pin survives any refactor of the API underneath) in 1 or 2
gloo processes with one CPU thread each, and compares with `tests/golden/<case>.json`:
- every per-step record of `metrics.jsonl` (timings left out), float for float;
- every tensor of the run's exported weights (EMA, LoRA in PEFT format, the reward model), by a SHA-256 of its bytes,
  with its float64 sum beside it to tell how far a mismatch is.

A refactor must leave these bit-identical. A commit that changes numerics on purpose regenerates the files and says
why in its message:

    IDGRPO_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Floats depend on the CPU's kernels (vector width, BLAS build), so the files record `torch.backends.cpu.
get_cpu_capability()`: on a CPU with another capability the metrics are compared to 1e-5 relative and the weights by
their sums instead, with a warning that says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from idgrpo.testing import run_distributed

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("IDGRPO_UPDATE_GOLDEN") == "1"

GRPO_TOY = ["train-grpo", "tiny", "--epochs", "3", "--eval-every", "0", "--save-every", "3", "--inner-epochs", "2",
            "--kl-beta", "0.004", "--guidance", "2.0"]
GRPO_DIT = ["train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4", "--lora-alpha", "8", "--epochs", "2",
            "--eval-every", "0", "--save-every", "2", "--kl-beta", "0.004"]
# GIFs and no `reencode` kind: an mp4 round trip is not bit-repeatable (docs/architecture.md, "Determinism").
SYNTH = ["synth-pairs", "--num-videos", "12", "--pairs-per-video", "4", "--frame-size", "32", "--num-frames", "5",
         "--video-suffix", ".gif", "--kinds", "swap", "drift", "blend", "clone", "remove", "mismatch", "photometric",
         "crop"]
REWARD = ["train-reward", "--preset", "tiny", "--epochs", "2", "--batch-size", "8", "--num-frames", "5"]

CASES = {
    "grpo_toy_1proc": (1, "grpo_toy"),
    "grpo_toy_2proc": (2, "grpo_toy"),
    "grpo_dit_lora_1proc": (1, "grpo_dit"),
    "grpo_dit_lora_2proc": (2, "grpo_dit"),
    "reward_1proc": (1, "reward"),
}


def _run(rank: int, world_size: int, kind: str, run_dir: str) -> dict:
    from idgrpo.cli import main

    run = Path(run_dir)
    if kind == "grpo_toy":
        main([*GRPO_TOY, "--run-dir", str(run)])
    elif kind == "grpo_dit":
        main([*GRPO_DIT, "--run-dir", str(run)])
    else:
        if rank == 0:
            main([*SYNTH, "--out", str(run / "pairs")])
        torch.distributed.barrier()
        main([*REWARD, "--data", str(run / "pairs" / "pairs.jsonl"), "--out", str(run / "reward")])
    torch.distributed.barrier()
    return _fingerprint(run, kind) if rank == 0 else {}


def _is_timing(key: str) -> bool:
    """Wall-clock fields (`time_s`, `rollout_time_s`, `samples_per_s`, ...): they never repeat."""
    return key.endswith(("time_s", "_seconds", "per_s")) or "mfu" in key


def _tensor_digests(path: Path) -> dict[str, list]:
    from safetensors.torch import load_file

    out = {}
    for name, tensor in sorted(load_file(str(path)).items()):
        t = tensor.contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out[name] = [digest, float(t.double().sum()), list(t.shape), str(t.dtype)]
    return out


def _fingerprint(run: Path, kind: str) -> dict:
    metrics_file = run / ("reward/metrics.jsonl" if kind == "reward" else "metrics.jsonl")
    records = []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in sorted(record.items()) if not _is_timing(k)})
    if kind == "reward":
        weights = sorted((run / "reward" / "final").glob("*.safetensors"))
    else:
        weights = [run / "ema.safetensors", *sorted(run.glob("lora*/adapter_model.safetensors"))]
    tensors = {str(p.relative_to(run)): _tensor_digests(p) for p in weights if p.is_file()}
    return {"metrics": records, "tensors": tensors}


def _close(a, b, rel: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12))
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_run(case, tmp_path):
    world_size, kind = CASES[case]
    got = run_distributed(_run, world_size, kind, str(tmp_path / "run"), timeout_s=600)[0]
    got["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["tensors"], "the run exported no weights to pin"
    assert len(got["metrics"]) == len(want["metrics"]), "a different number of logged steps"
    strict = want["cpu_capability"] == got["cpu_capability"]
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        assert g.keys() == w.keys(), f"step {step}: logged keys changed: {sorted(set(g) ^ set(w))}"
        for key in w:
            assert _close(g[key], w[key], 0.0 if strict else 1e-5), f"step {step} {key}: {g[key]!r} != {w[key]!r}"
    assert got["tensors"].keys() == want["tensors"].keys()
    for file, tensors in want["tensors"].items():
        assert got["tensors"][file].keys() == tensors.keys(), f"{file}: tensor names changed"
        for name, (digest, total, shape, dtype) in tensors.items():
            g_digest, g_total, g_shape, g_dtype = got["tensors"][file][name]
            assert (g_shape, g_dtype) == (shape, dtype), f"{file}:{name}: shape/dtype changed"
            if strict:
                assert g_digest == digest, f"{file}:{name}: weights differ (sum {g_total!r} vs {total!r})"
            else:
                assert _close(g_total, total, 1e-4), f"{file}:{name}: sum {g_total!r} vs {total!r}"
    if not strict:
        warnings.warn(f"{case}: golden recorded on CPU capability {want['cpu_capability']}, this CPU is "
                      f"{got['cpu_capability']}: compared to 1e-5, not bit for bit", stacklevel=1)
