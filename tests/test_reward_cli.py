"""The reward CLI end to end at a tiny size: synth-pairs -> train-reward (+ resume) -> score."""

import csv
import json
import re

import pytest
import torch

from idgrpo.cli import COMMANDS, main
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

TINY = ["--model.image-size", "16", "--model.patch-size", "8", "--model.dim", "16", "--model.depth", "1",
        "--model.heads", "2", "--model.parts", "2"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    main(["synth-pairs", "--out", str(out), "--num-videos", "6", "--pairs-per-video", "4", "--num-frames", "9",
          "--seed", "3"])
    return out


def test_commands_registered():
    for name in ("synth-pairs", "train-reward", "score"):
        assert name in COMMANDS


def test_synth_pairs_writes_files_and_manifest(pairs_dir):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    manifest = [json.loads(line) for line in (pairs_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 == len(manifest)
    assert all(m["distortion"] == r["kind"] and "strength" in m and "params" in m for r, m in zip(rows, manifest))
    for r in rows:
        assert (pairs_dir / r["video_a"]).exists() and (pairs_dir / r["video_b"]).exists()
        assert all((pairs_dir / p).exists() for p in r["refs_a"].split(";"))
    with (pairs_dir / "pairs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 24
    boxes = json.loads((pairs_dir / "boxes.json").read_text())
    assert len(boxes) == 6 and torch.tensor(boxes["s00000"]).shape == (2, 9, 4)


def test_train_resume_and_score(pairs_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-reward", "--data", str(pairs_dir / "pairs.jsonl"), "--out", str(run), "--held-out-fraction",
            "0.34", "--batch-size", "8", "--threads", "1", *TINY]
    main([*args, "--epochs", "1"])
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 1
    for key in ("val_loss", "val_acc_non_tie", "val_acc_with_ties", "val_ece", "train_loss"):
        assert key in evals[0] and evals[0][key] == evals[0][key]  # present and not NaN
    main([*args, "--epochs", "2"])  # resumes after epoch 1
    assert "resumed after epoch 1" in capsys.readouterr().out
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [1, 2]
    model = IdentityRewardModel.load(run / "final")
    assert model.config == RewardModelConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2, parts=2)

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:3]
    listing = tmp_path / "videos.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "refs", "prompt"])
        for r in rows:
            writer.writerow([str(pairs_dir / r["video_a"]),
                             ";".join(str(pairs_dir / p) for p in r["refs_a"].split(";")), r["prompt"]])
    scores = tmp_path / "scores.csv"
    main(["score", "--model", str(run / "final"), "--csv", str(listing), "--out", str(scores)])
    with scores.open() as f:
        out = list(csv.DictReader(f))
    assert len(out) == 3 and all(float(r["reward"]) == float(r["reward"]) for r in out)


def _usage_error(argv: list[str], capsys) -> str:
    """`idgrpo <argv>` must refuse with exit status 2 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"idgrpo {argv[0]}: error: ")
    return lines[0]


def test_bad_inputs_fail_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("video_a,video_b,refs,prompt,label\nnope.mp4,nope2.mp4,r.png,p,A\n")
    line = _usage_error(["train-reward", "--data", str(bad), "--out", str(tmp_path / "r"), *TINY], capsys)
    assert re.search(r"bad.csv:2: video_a .*nope.mp4 does not exist", line)
    line = _usage_error(["score", "--model", str(tmp_path), "--videos", str(bad), "--refs", str(bad),
                         "--out", str(tmp_path / "s.csv")], capsys)
    assert "not a reward model directory" in line


def test_synth_pairs_from_own_videos_with_and_without_boxes(tmp_path, capsys):
    from idgrpo import media
    from idgrpo.synth import World, WorldConfig

    world = World(WorldConfig(frame_size=32, num_frames=9, population=12, seed=4))
    lines = []
    for i in range(3):
        scene = world.scene(i)
        media.write_video(tmp_path / f"v{i}.mp4", scene.frames, fps=8)
        refs = []
        for p, ref in enumerate(scene.references):
            media.write_image(tmp_path / f"v{i}_r{p}.png", ref)
            refs.append(f"v{i}_r{p}.png")
        row = {"video": f"v{i}.mp4", "refs": refs, "prompt": scene.prompt}
        if i < 2:  # the last video has no boxes: only box-free and label-preserving kinds apply
            (tmp_path / f"v{i}_boxes.json").write_text(json.dumps(scene.boxes.tolist()))
            row["boxes"] = f"v{i}_boxes.json"
        lines.append(json.dumps(row))
    source = tmp_path / "good.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs"
    main(["synth-pairs", "--source", str(source), "--out", str(out), "--pairs-per-video", "3", "--kinds", "remove",
          "mismatch", "--box-free-kinds", "shuffle", "flicker", "photometric"])
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    kinds_by_group = {}
    for r in rows:
        kinds_by_group.setdefault(r["group"], set()).add(r["kind"])
    assert len(rows) == 9
    boxed = [k for g, k in kinds_by_group.items() if not g.startswith("v3_")]
    assert all(k <= {"remove", "mismatch"} for k in boxed)
    assert kinds_by_group["v3_v2"] <= {"shuffle", "flicker", "photometric"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "v0.mp4", "refs": ["v0_r0.png"], "boxes": "v0_boxes.json"}) + "\n")
    capsys.readouterr()
    line = _usage_error(["synth-pairs", "--source", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert "bad.jsonl:1: boxes must be (people=1, frames=9, 4)" in line


def _train_on_two_ranks(rank, world_size, data, out):
    from idgrpo.reward.train import TrainRewardConfig, train_reward

    config = TrainRewardConfig(data=data, out=out, held_out_fraction=0.34, batch_size=8, epochs=1, threads=1,
                               model=RewardModelConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2, parts=2))
    train_reward(config)
    return json.loads((out / "eval.jsonl").read_text().splitlines()[-1]) if rank == 0 else None


def test_train_reward_under_two_gloo_ranks(pairs_dir, tmp_path):
    from idgrpo.testing import run_distributed

    result = run_distributed(_train_on_two_ranks, 2, pairs_dir / "pairs.jsonl", tmp_path / "run2", timeout_s=120)
    assert result[0]["epoch"] == 1 and result[0]["val_pairs"] > 0
    assert IdentityRewardModel.load(tmp_path / "run2" / "final").config.dim == 16


def test_lora_fine_tune_from_a_trained_model(pairs_dir, tmp_path):
    from safetensors.torch import load_file

    base_args = ["train-reward", "--data", str(pairs_dir / "pairs.jsonl"), "--held-out-fraction", "0.34",
                 "--batch-size", "8", "--threads", "1", "--epochs", "1"]
    main([*base_args, "--out", str(tmp_path / "full"), *TINY])
    main([*base_args, "--out", str(tmp_path / "lora"), "--init-from", str(tmp_path / "full" / "final"),
          "--lora-rank", "2", "--lr", "1e-2"])
    before = load_file(str(tmp_path / "full" / "final" / "reward_model.safetensors"))
    after = load_file(str(tmp_path / "lora" / "final" / "reward_model.safetensors"))
    assert before.keys() == after.keys()
    assert torch.equal(before["patch.weight"], after["patch.weight"])  # frozen, not a LoRA target
    assert not torch.equal(before["blocks.0.q.weight"], after["blocks.0.q.weight"])  # LoRA merged in
    assert not torch.equal(before["score_head.1.weight"], after["score_head.1.weight"])  # head trained
    assert (tmp_path / "lora" / "final_lora" / "adapter_model.safetensors").exists()
    IdentityRewardModel.load(tmp_path / "lora" / "final")


def test_bf16_compute_runs(pairs_dir, tmp_path):
    main(["train-reward", "--data", str(pairs_dir / "pairs.jsonl"), "--held-out-fraction", "0.34", "--batch-size", "8",
          "--threads", "1", "--epochs", "1", "--precision", "bf16", "--out", str(tmp_path / "bf16"), *TINY])
    record = json.loads((tmp_path / "bf16" / "eval.jsonl").read_text().splitlines()[-1])
    assert record["val_loss"] == record["val_loss"] and record["skipped_steps"] == 0.0
