"""`idgrpo train-reward --model vlm` end to end at a tiny size: a tiny Qwen2.5-VL base directory, a tiny
synthetic pair set, two epochs of BTT training on the engine (FSDP with the vision blocks and decoder layers
as units), evaluation each epoch, and a final model in the published layout that `VLMReward.from_pretrained`
loads and scores with."""

import json

import pytest
import torch
from safetensors.torch import load_file

from idgrpo.cli import main
from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, load_qwen2_5_vl, save_qwen2_5_vl
from idgrpo.models.qwen_processor import QwenProcessor
from idgrpo.reward.train import TrainRewardConfig
from idgrpo.reward.vlm import PEFT_PREFIX, VLMReward, VLMRewardConfig, build_vlm_reward_for_training

pytest.importorskip("tokenizers")
from test_qwen_processor import tiny_model_config, tiny_tokenizer  # noqa: E402

PIXELS = 56 * 56  # frames and references stay 56x56: 4 merged tokens per image / frame pair
SCORE_CONFIG = VLMRewardConfig(max_pixels=PIXELS, video_min_pixels=PIXELS, num_frames=5)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vlm_base")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    save_qwen2_5_vl(Qwen2_5_VL(tiny_model_config(QwenProcessor(tok))), directory)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_pairs")
    main(["synth-pairs", "--out", str(out), "--num-videos", "4", "--pairs-per-video", "2", "--num-frames", "5",
          "--frame-size", "32", "--seed", "1"])
    return out / "pairs.jsonl"


def train_args(base_dir, pairs_file, run, *extra):
    return ["train-reward", "--model", "vlm", "--vlm-base", str(base_dir), "--data", str(pairs_file),
            "--out", str(run), "--held-out-fraction", "0.25", "--batch-size", "4", "--epochs", "2",
            "--lr", "3e-3", "--vlm-lora-rank", "4", "--vlm-lora-alpha", "8", "--vlm-image-size", "56",
            "--vlm-max-pixels", str(PIXELS), "--vlm-video-min-pixels", str(PIXELS), "--threads", "1", *extra]


def test_train_reward_vlm_trains_evaluates_and_writes_a_loadable_checkpoint(base_dir, pairs_file, tmp_path, capsys):
    run = tmp_path / "run"
    main(train_args(base_dir, pairs_file, run))
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [1, 2]
    for e in evals:
        for key in ("train_loss", "val_loss", "val_acc_non_tie", "val_acc_with_ties", "val_ece"):
            assert torch.isfinite(torch.tensor(float(e[key]))), (key, e)
        assert e["skipped_steps"] == 0 and e["grad_norm"] > 0
    main([*train_args(base_dir, pairs_file, run), "--epochs", "3"])  # resumes after epoch 2
    assert "resumed after epoch 2" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (run / "eval.jsonl").read_text().splitlines()] == [1, 2, 3]

    final = run / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_state_dict.safetensors",
                 "tokenizer.json", "reward_config.json"):
        assert (final / name).is_file(), name
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8

    # Trained where trainable: the adapters (B starts at zero), rm_head, the vision tower; the frozen base
    # is untouched (the checkpoint holds no frozen LLM weight, and the loaded model's are the base's).
    untrained = build_vlm_reward_for_training(base_dir, SCORE_CONFIG, seed=0).eval()  # the run's start
    adapters = load_file(str(final / "adapter_model.safetensors"))
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapters.items())
    non_lora = {k[len(PEFT_PREFIX):]: v for k, v in load_file(str(final / "non_lora_state_dict.safetensors")).items()}
    assert not (non_lora["rm_head.weight"] - untrained.rm_head.weight).abs().max() < 1e-7
    base = load_qwen2_5_vl(base_dir, dtype=torch.float32)
    assert (non_lora["visual.merger.mlp.2.weight"] - base.visual.merger.mlp[2].weight).abs().max() > 0
    assert not any(k.startswith("model.layers.") for k in non_lora)

    loaded = VLMReward.from_pretrained(base_dir, final, config=SCORE_CONFIG, dtype=torch.float32)
    assert torch.equal(loaded.backbone.model.layers[0].self_attn.q_proj.weight,
                       base.model.layers[0].self_attn.q_proj.weight)
    gen = torch.Generator().manual_seed(7)
    frames = torch.randint(0, 256, (2, 5, 56, 56, 3), dtype=torch.uint8, generator=gen)
    references = [[torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=gen)] for _ in range(2)]
    scores = loaded.score(frames, references, ["two people", "a person"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert (scores - untrained.score(frames, references, ["two people", "a person"])).abs().max() > 1e-6


def test_frozen_vision_tower_is_not_saved(base_dir, pairs_file, tmp_path):
    run = tmp_path / "run"
    main([*train_args(base_dir, pairs_file, run, "--no-train-vision"), "--epochs", "1"])
    non_lora = load_file(str(run / "final" / "non_lora_state_dict.safetensors"))
    assert not any(k.startswith(PEFT_PREFIX + "visual.") for k in non_lora)
    assert {PEFT_PREFIX + "rm_head.weight", PEFT_PREFIX + "model.embed_tokens.weight"} <= set(non_lora)


def test_vlm_options_are_validated():
    with pytest.raises(ValueError, match="vlm-tokenizer"):
        TrainRewardConfig(architecture="vlm")
    with pytest.raises(ValueError, match="compact-model options"):
        TrainRewardConfig(architecture="vlm", vlm_tokenizer="tok.json", lora_rank=4)


def test_fsdp_wrapped_vlm_reward_learns_a_batch_and_changes_only_trainable_weights(base_dir):
    from idgrpo.engine import FSDP, build_optimizer
    from idgrpo.reward.losses import btt_loss
    from idgrpo.reward.train import _build_vlm

    config = TrainRewardConfig(architecture="vlm", vlm_base=base_dir, vlm_lora_rank=4, vlm_lora_alpha=8,
                               vlm_max_pixels=PIXELS, vlm_video_min_pixels=PIXELS)
    module = _build_vlm(config, "cpu").train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    model = FSDP(module, units=[*module.backbone.visual.blocks, *module.backbone.model.layers], device="cpu")
    before = model.full_state_dict()
    optimizer = build_optimizer(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (4, 5, 56, 56, 3), dtype=torch.uint8, generator=gen)  # A0, A1, B0, B1
    references = [[torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=gen)]] * 4
    labels = torch.tensor([1, -1])
    losses = []
    for _ in range(4):
        reward = model.rewards(frames, references, ["two people walk"] * 4)
        loss = btt_loss(reward[:2], reward[2:], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1e-3, losses
    after = model.full_state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable and "rm_head.weight" in changed and any(".lora_B." in n for n in changed)
    assert "backbone.model.layers.0.self_attn.q_proj.weight" not in trainable


def _train_vlm_on_two_ranks(rank, world_size, base_dir, data, out):
    from idgrpo.reward.train import train_reward

    train_reward(TrainRewardConfig(
        architecture="vlm", vlm_base=base_dir, data=data, out=out, held_out_fraction=0.25, batch_size=4, epochs=1,
        threads=1, vlm_lora_rank=4, vlm_lora_alpha=8, vlm_image_size=56, vlm_max_pixels=PIXELS,
        vlm_video_min_pixels=PIXELS, precision="bf16"))
    return json.loads((out / "eval.jsonl").read_text().splitlines()[-1]) if rank == 0 else None


def test_train_reward_vlm_under_two_gloo_ranks_in_bf16(base_dir, pairs_file, tmp_path):
    from idgrpo.testing import run_distributed

    result = run_distributed(_train_vlm_on_two_ranks, 2, base_dir, pairs_file, tmp_path / "run2", timeout_s=120)
    assert result[0]["epoch"] == 1 and result[0]["skipped_steps"] == 0 and result[0]["val_pairs"] > 0
    assert torch.isfinite(torch.tensor(result[0]["val_loss"]))
    loaded = VLMReward.from_pretrained(base_dir, tmp_path / "run2" / "final", config=SCORE_CONFIG, dtype=torch.float32)
    frames = torch.randint(0, 256, (1, 5, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loaded.score(frames, [[frames[0, 0]]], ["a person"])).all()
