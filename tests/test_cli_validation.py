"""Bad input is refused before any work, in one line with exit status 2 (docs/reliability.md); logs are strict JSON;
accuracies over zero pairs are absent; `demo --quick` keeps the flags the user gave; the collective timeout is
configurable. No model is trained here."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from idgrpo.cli import main
from idgrpo.errors import UsageError

# (command, arguments, the flag the message must name). Every command also gets an output path under tmp_path, which
# must still be missing afterwards: the refusal comes before any work.
BAD_FLAGS = [
    ("train-reward", ["--grad-clip", "-1"], "--grad-clip"),  # trained by gradient ascent before
    ("train-reward", ["--grad-clip", "0"], "--grad-clip"),  # learned nothing before
    ("train-reward", ["--grad-clip", "nan"], "--grad-clip"),
    ("train-reward", ["--lr", "0"], "--lr"),
    ("train-reward", ["--lr", "inf"], "--lr"),
    ("train-reward", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("train-reward", ["--epochs", "0"], "--epochs"),
    ("train-reward", ["--batch-size", "0"], "--batch-size"),
    ("train-reward", ["--num-frames", "0"], "--num-frames"),
    ("train-reward", ["--num-frames", "33"], "--num-frames"),  # more than the tiny model's 32 positions
    ("train-reward", ["--held-out-fraction", "0"], "--held-out-fraction"),
    ("train-reward", ["--held-out-fraction", "1"], "--held-out-fraction"),
    ("train-reward", ["--ties-k", "1"], "--ties-k"),
    ("train-reward", ["--threads", "-1"], "--threads"),
    ("train-reward", ["--max-minutes", "-1"], "--max-minutes"),
    ("train-reward", ["--max-minutes", "nan"], "--max-minutes"),
    ("train-reward", ["--lora-rank", "-1"], "--lora-rank"),
    ("train-reward", ["--lora-alpha", "-1"], "--lora-alpha"),
    ("train-reward", ["--seed", "-1"], "--seed"),
    ("train-reward", ["--device", "tpu"], "--device"),
    ("train-reward", ["--preset", "huge"], "--preset"),
    ("train-reward", ["--collective-timeout", "0"], "--collective-timeout"),
    ("train-reward", ["--vlm-lora-rank", "0"], "--vlm-lora-rank"),
    ("train-reward", ["--vlm-lora-alpha", "0"], "--vlm-lora-alpha"),
    ("train-reward", ["--vlm-image-size", "27"], "--vlm-image-size"),
    ("train-reward", ["--vlm-max-pixels", "100"], "--vlm-max-pixels"),
    ("train-reward", ["--vlm-video-min-pixels", "0"], "--vlm-video-min-pixels"),
    ("train-reward", ["--model", "vlm", "--vlm-tokenizer", "t.json", "--vlm-preset", "7b"], "--vlm-preset"),
    ("train-reward", ["--model", "vlm"], "--vlm-base"),
    ("train-reward", ["--model.image-size", "0"], "--model.image-size"),
    ("train-reward", ["--model.patch-size", "0"], "--model.patch-size"),
    ("train-reward", ["--model.patch-size", "5"], "--model.patch-size"),
    ("train-reward", ["--model.dim", "0"], "--model.dim"),
    ("train-reward", ["--model.heads", "3"], "--model.heads"),
    ("train-reward", ["--model.depth", "0"], "--model.depth"),
    ("train-reward", ["--model.mlp-ratio", "0"], "--model.mlp-ratio"),
    ("train-reward", ["--model.temporal-depth", "-1"], "--model.temporal-depth"),
    ("train-reward", ["--model.max-frames", "0"], "--model.max-frames"),
    ("train-reward", ["--model.parts", "0"], "--model.parts"),
    ("train-reward", ["--model.presence-patch", "0"], "--model.presence-patch"),
    ("train-reward", ["--model.presence-dim", "0"], "--model.presence-dim"),
    ("score", ["--videos", "v.mp4", "--refs", "r.png", "--batch-size", "-1"], "--batch-size"),  # scored 0 videos
    ("score", ["--videos", "v.mp4", "--refs", "r.png", "--batch-size", "0"], "--batch-size"),
    ("score", ["--videos", "v.mp4", "--refs", "r.png", "--num-frames", "0"], "--num-frames"),
    ("score", ["--videos", "v.mp4", "--refs", "r.png", "--device", "gpu"], "--device"),
    ("score", [], "--videos"),
    ("score", ["--videos", "v.mp4"], "--refs"),
    ("synth-pairs", ["--fps", "0"], "--fps"),
    ("synth-pairs", ["--fps", "-5"], "--fps"),
    ("synth-pairs", ["--num-videos", "1"], "--num-videos"),
    ("synth-pairs", ["--pairs-per-video", "0"], "--pairs-per-video"),
    ("synth-pairs", ["--frame-size", "8"], "--frame-size"),
    ("synth-pairs", ["--num-frames", "1"], "--num-frames"),
    ("synth-pairs", ["--num-frames", "65"], "--num-frames"),
    ("synth-pairs", ["--num-people", "4"], "--num-people"),
    ("synth-pairs", ["--both-shift-probability", "1.5"], "--both-shift-probability"),
    ("synth-pairs", ["--both-shift-probability", "nan"], "--both-shift-probability"),
    ("synth-pairs", ["--video-suffix", ".avi"], "--video-suffix"),
    ("synth-pairs", ["--kinds", "swap", "melt"], "--kinds"),
    ("synth-pairs", ["--box-free-kinds", "melt"], "--box-free-kinds"),
    ("synth-pairs", ["--seed", "-1"], "--seed"),
    ("synth-pairs", ["--world-seed", "-1"], "--world-seed"),
    ("demo", ["--num-people", "5"], "--num-people"),
    ("demo", ["--frame-size", "0"], "--frame-size"),
    ("demo", ["--frame-size", "40"], "--frame-size"),
    ("demo", ["--pixel-stride", "0"], "--pixel-stride"),
    ("demo", ["--pixel-stride", "16"], "--pixel-stride"),
    ("demo", ["--num-frames", "6"], "--num-frames"),
    ("demo", ["--population", "1"], "--population"),
    ("demo", ["--threads", "-1"], "--threads"),
    ("demo", ["--seed", "-1"], "--seed"),
    ("demo", ["--seed", "3000000000"], "--seed"),  # refused only at stage 4 before
    ("train-grpo", ["vace-1.3b"], "--train-csv"),  # a recipe that needs reference images
    ("demo", ["--reward-videos", "7"], "--reward-videos"),
    ("demo", ["--pairs-per-video", "0"], "--pairs-per-video"),
    ("demo", ["--reward-frames", "0"], "--reward-frames"),
    ("demo", ["--reward-patch", "0"], "--reward-patch"),
    ("demo", ["--reward-patch", "5"], "--reward-patch"),
    ("demo", ["--reward-dim", "6"], "--reward-dim"),
    ("demo", ["--reward-depth", "0"], "--reward-depth"),
    ("demo", ["--reward-epochs", "0"], "--reward-epochs"),
    ("demo", ["--reward-batch", "0"], "--reward-batch"),
    ("demo", ["--reward-lr", "0"], "--reward-lr"),
    ("demo", ["--ties-k", "0.5"], "--ties-k"),
    ("demo", ["--annotated-seeds", "1"], "--annotated-seeds"),
    ("demo", ["--annotation-tie", "-0.1"], "--annotation-tie"),
    ("demo", ["--policy-videos", "0"], "--policy-videos"),
    ("demo", ["--imperfect-fraction", "1"], "--imperfect-fraction"),
    ("demo", ["--recolour-probability", "2"], "--recolour-probability"),
    ("demo", ["--recolour-min", "-0.5"], "--recolour-min"),
    ("demo", ["--policy-patch", "0"], "--policy-patch"),
    ("demo", ["--policy-dim", "11"], "--policy-dim"),
    ("demo", ["--policy-layers", "1"], "--policy-layers"),
    ("demo", ["--pretrain-steps", "0"], "--pretrain-steps"),
    ("demo", ["--pretrain-batch", "0"], "--pretrain-batch"),
    ("demo", ["--pretrain-lr", "inf"], "--pretrain-lr"),
    ("demo", ["--shift", "0"], "--shift"),
    ("demo", ["--grpo-prompts", "0"], "--grpo-prompts"),
    ("demo", ["--grpo-epochs", "0"], "--grpo-epochs"),
    ("demo", ["--prompts-per-epoch", "0"], "--prompts-per-epoch"),
    ("demo", ["--group-size", "1"], "--group-size"),
    ("demo", ["--quick", "--group-size", "1"], "--group-size"),  # the user's flag is kept (and refused), not replaced
    ("demo", ["--num-steps", "0"], "--num-steps"),
    ("demo", ["--sde-window-size", "7"], "--sde-window-size"),
    ("demo", ["--lora-rank", "0"], "--lora-rank"),
    ("demo", ["--updates-per-epoch", "0"], "--updates-per-epoch"),
    ("demo", ["--grpo-lr", "nan"], "--grpo-lr"),
    ("demo", ["--clip-range", "-0.2"], "--clip-range"),
    ("demo", ["--kl-beta", "-1"], "--kl-beta"),
    ("demo", ["--eval-prompts", "0"], "--eval-prompts"),
    ("demo", ["--gif-videos", "-1"], "--gif-videos"),
    ("demo", ["--collective-timeout", "-1"], "--collective-timeout"),
    ("encode-prompts", ["--batch-size", "0"], "--batch-size"),
    ("encode-prompts", ["--text-len", "1"], "--text-len"),
    ("encode-prompts", ["--save-every", "0"], "--save-every"),
    ("encode-prompts", ["--dtype", "int8"], "--dtype"),
    ("encode-prompts", ["--seed", "-1"], "--seed"),
    ("encode-prompts", ["--device", "gpu"], "--device"),
    ("encode-prompts", ["--negative-prompt", " "], "--negative-prompt"),
]


def _output_args(command: str, tmp_path) -> list[str]:
    out = tmp_path / "out"
    return {"train-reward": ["--data", str(tmp_path / "pairs.jsonl"), "--out", str(out)],
            "score": ["--model", str(out / "model"), "--out", str(out / "scores.csv")],
            "synth-pairs": ["--out", str(out)],
            "demo": ["--run-dir", str(out)],
            "train-grpo": ["--run-dir", str(out)],
            "encode-prompts": ["--prompts", str(tmp_path / "prompts.txt"), "--output", str(out / "c.safetensors")],
            }[command]


def _refused(argv: list[str], capsys) -> str:
    """Run `idgrpo <argv>`; it must exit with status 2 and print one line on stderr: the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"idgrpo {argv[0]}: error: ")
    return lines[0]


@pytest.mark.parametrize("command, args, flag", BAD_FLAGS, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_in_one_line_before_any_work(command, args, flag, tmp_path, capsys):
    line = _refused([command, *args, *_output_args(command, tmp_path)], capsys)
    assert flag in line
    assert list(tmp_path.iterdir()) == []  # no folder made, nothing read or written


def test_a_cuda_device_needs_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    line = _refused(["score", "--videos", "v.mp4", "--refs", "r.png", "--device", "cuda",
                     *_output_args("score", tmp_path)], capsys)
    assert "--device cuda: no CUDA device" in line


def test_bad_data_and_missing_files_are_one_line_too(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("video_a,video_b,refs,prompt,label\na.mp4,b.mp4,r.png,p,maybe\n")
    line = _refused(["train-reward", "--data", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert "bad.csv:2: label 'maybe' is not one of A, B, same" in line
    assert not (tmp_path / "run").exists()  # the data is read before the run folder is made
    line = _refused(["score", "--model", str(tmp_path / "nope"), "--videos", str(bad), "--refs", str(bad),
                     "--out", str(tmp_path / "s.csv")], capsys)
    assert "not a reward model directory" in line
    listing = tmp_path / "videos.jsonl"
    listing.write_text('{"video": "a.mp4"\n')
    line = _refused(["score", "--csv", str(listing), "--out", str(tmp_path / "s.csv")], capsys)
    assert "videos.jsonl:1: not valid JSON" in line


def test_the_rank_prefix_only_with_several_processes(monkeypatch, tmp_path, capsys):
    # As under torchrun before the process group exists (another test may have made this process a one-rank world).
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["synth-pairs", "--fps", "0", "--out", str(tmp_path)])
    assert capsys.readouterr().err.startswith("[rank1]: idgrpo synth-pairs: error: --fps")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        main(["synth-pairs", "--fps", "0", "--out", str(tmp_path)])
    assert capsys.readouterr().err.startswith("idgrpo synth-pairs: error: --fps")


def test_an_unexpected_error_keeps_its_traceback_without_a_rank_prefix_in_one_process():
    code = ("from idgrpo.engine import init_distributed\n"
            "init_distributed()\n"
            "raise RuntimeError('not a usage error')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: not a usage error" in result.stderr
    assert "[rank" not in result.stderr


def test_usage_errors_are_value_errors_for_python_callers():
    from idgrpo.reward.train import TrainRewardConfig

    with pytest.raises(ValueError, match="--grad-clip must be > 0"):
        TrainRewardConfig(grad_clip=-1.0)
    assert issubclass(UsageError, ValueError)
    from idgrpo.reward.data import PairDataError

    assert issubclass(PairDataError, UsageError)


def test_demo_quick_only_shrinks_the_sizes_the_user_left_at_their_default():
    from idgrpo.demo import QUICK, DemoConfig

    cfg = DemoConfig(quick=True, group_size=6, reward_epochs=3)
    assert cfg.group_size == 6 and cfg.reward_epochs == 3  # given: kept
    assert cfg.reward_videos == QUICK["reward_videos"] and cfg.grpo_epochs == QUICK["grpo_epochs"]  # left: quick
    full = DemoConfig(group_size=6)
    assert full.group_size == 6 and full.reward_videos == 160  # without --quick nothing changes


def test_strict_json_replaces_and_lists_non_finite_values(tmp_path):
    from idgrpo.engine.metrics import Metrics, strict_json

    text = strict_json({"loss": float("nan"), "ok": 1.5, "history": [{"r": float("inf")}, {"r": 2.0}]})
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))
    assert record == {"loss": None, "ok": 1.5, "history": [{"r": None}, {"r": 2.0}],
                      "nonfinite": ["loss", "history[0].r"]}
    assert "nonfinite" not in json.loads(strict_json({"a": 1.0}))
    with Metrics(tmp_path, tensorboard=False) as metrics:
        metrics.add("loss", torch.tensor(float("nan")))
        metrics.add("reward", 0.5)
        logged = metrics.flush(1)
    assert math.isnan(logged["loss"])  # the caller still sees the value
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in {line}"))
    assert record["loss"] is None and record["reward"] == 0.5 and record["nonfinite"] == ["loss"]


def test_accuracy_over_zero_pairs_is_absent():
    from idgrpo.reward.data import PairTensors
    from idgrpo.reward.losses import TIE
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
    from idgrpo.reward.train import TrainRewardConfig, evaluate, format_metric

    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2, parts=2))
    frames = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)
    refs = torch.randint(0, 256, (3, 1, 16, 16, 3), dtype=torch.uint8)
    ties_only = PairTensors(frames_a=frames, frames_b=frames.flip(0), refs_a=refs, refs_b=refs,
                            ref_mask=torch.ones(3, 1, dtype=torch.bool), labels=torch.full((3,), TIE),
                            kinds=["photometric"] * 3, prompts=[""] * 3)
    metrics = evaluate(model, ties_only, TrainRewardConfig(num_frames=2).fit_config(), torch.device("cpu"))
    assert metrics["val_non_tie_pairs"] == 0 and metrics["val_acc_non_tie"] is None
    assert metrics["val_tie_acc"] is not None and 0.0 <= metrics["val_acc_with_ties"] <= 1.0
    assert format_metric(None) == "n/a" and format_metric(0.5) == "0.500"


def test_collective_timeout_flag_then_environment_then_default(monkeypatch):
    from idgrpo.engine.dist import COLLECTIVE_TIMEOUT_ENV, collective_timeout_s

    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout_s() == 600.0 and collective_timeout_s(None, 3600.0) == 3600.0
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "45")
    assert collective_timeout_s() == 45.0 and collective_timeout_s(None, 3600.0) == 45.0
    assert collective_timeout_s(7.5) == 7.5  # the command's flag wins
    for bad in ("abc", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=COLLECTIVE_TIMEOUT_ENV):
            collective_timeout_s()
    with pytest.raises(UsageError, match="--collective-timeout"):
        collective_timeout_s(0.0)


def test_extra_accepts_key_equals_value_and_key_value_pairs():
    from idgrpo.cli import split_key_value_pairs

    assert split_key_value_pairs(["tiny", "--extra", "reward_checkpoint=DIR", "k", "v=w", "x=y", "--epochs", "3"]) == [
        "tiny", "--extra", "reward_checkpoint", "DIR", "k", "v=w", "x", "y", "--epochs", "3"]
    assert split_key_value_pairs(["--extra=a=b", "--run-dir", "x=y"]) == ["--extra", "a", "b", "--run-dir", "x=y"]


def test_extra_key_equals_value_reaches_the_reward_factory(tmp_path, capsys):
    # the spelling every doc shows: the factory must see the checkpoint path (missing here -> a one-line error)
    missing = tmp_path / "no_such_reward"
    with pytest.raises(SystemExit) as e:
        main(["train-grpo", "tiny", "--run-dir", str(tmp_path / "run"), "--reward", "idgrpo.reward.factories:compact",
              "--extra", f"reward_checkpoint={missing}"])
    assert e.value.code == 2
    assert str(missing) in capsys.readouterr().err
