"""The train-grpo reward factories resolve a trained reward model into a score callable; the VLM reward scores with
its checkpoint's own settings, or, for the published Identity-GRPO reward, as the official GRPO loop does."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from idgrpo.reward import factories
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
from idgrpo.reward.vlm import SUBJECT_ALIGNMENT_INSTRUCTION, VLMRewardConfig, read_instruction


def test_compact_factory_scores_like_the_saved_model(tmp_path):
    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig.from_name("tiny")).eval()
    model.save(tmp_path / "final")
    score = factories.compact(SimpleNamespace(extra={"reward_checkpoint": str(tmp_path / "final")}), "cpu")
    size = model.config.image_size
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 5, size, size, 3), generator=gen, dtype=torch.uint8)
    refs = [[torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)] for _ in range(2)]
    got = score(frames, refs, ["a", "b"])
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, model.score(frames, refs, ["a", "b"]))


def test_factories_name_the_missing_setting():
    with pytest.raises(ValueError, match="reward_checkpoint"):
        factories.compact(SimpleNamespace(extra={}), "cpu")
    with pytest.raises(ValueError, match="reward_base"):
        factories.vlm(SimpleNamespace(extra={}), "cpu")


# ------------------------------------------------------------------------------------ how the VLM reward scores

RUBRIC = "\nRate how well every face matches the references: <|SA_reward|>\nEND\n"


def template_file(tmp_path):
    """A stand-in for the official vace_reward/prompt_template.py: constants, a commented-out variant and code."""
    path = tmp_path / "prompt_template.py"
    path.write_text(f'OTHER = "x"\nSUBJECT_ALIGNMENT_PROMPT_WITH_SPECIAL_TOKEN = """{RUBRIC}"""\n'
                    f'# SUBJECT_ALIGNMENT_PROMPT_WITH_SPECIAL_TOKEN = """old"""\n'
                    f'SHORT = "Score: <|SA_reward|>"\n\ndef build_prompt(prompt):\n    return OTHER\n')
    return path


def published_checkpoint(tmp_path, **data_config):
    """The published layout: identity_reward/model_config.json next to identity_reward/checkpoint-N/."""
    root = tmp_path / "identity_reward"
    (root / "checkpoint-7").mkdir(parents=True)
    data = {"max_frame_pixels": 200_704, "num_frames": 5.0, "fps": None, "eval_dim": ["SA"],
            "prompt_template_type": "subject_alignment_special", "sample_type": "uniform", **data_config}
    (root / "model_config.json").write_text(json.dumps({"data_config": data, "model_config": {}}))
    return root / "checkpoint-7"


def scoring(**extra):
    return factories.vlm_scoring_config(SimpleNamespace(extra={k: str(v) for k, v in extra.items()}))


def test_read_instruction_takes_the_template_verbatim_without_running_the_file(tmp_path):
    path = template_file(tmp_path)
    assert read_instruction(path) == RUBRIC  # leading/trailing newlines kept: they are tokenized
    assert read_instruction(f"{path}:SHORT") == "Score: <|SA_reward|>"
    text = tmp_path / "rubric.txt"
    text.write_text(RUBRIC)
    assert read_instruction(text) == RUBRIC
    with pytest.raises(ValueError, match="MISSING"):
        read_instruction(f"{path}:MISSING")
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        read_instruction(tmp_path / "nowhere.py")


def test_published_checkpoint_is_scored_as_the_official_grpo_loop(tmp_path):
    checkpoint = published_checkpoint(tmp_path)
    config = scoring(reward_checkpoint=checkpoint, reward_template=template_file(tmp_path))
    assert config == VLMRewardConfig(instruction=RUBRIC, num_frames=5, fps=10.0, max_pixels=200_704)
    assert scoring(reward_checkpoint=checkpoint, reward_template="idgrpo").instruction == SUBJECT_ALIGNMENT_INSTRUCTION
    overridden = scoring(reward_checkpoint=checkpoint, reward_template=template_file(tmp_path), reward_fps=16,
                         reward_num_frames=8, reward_max_pixels=100_352)
    assert (overridden.fps, overridden.num_frames, overridden.max_pixels) == (16.0, 8, 100_352)
    with pytest.raises(ValueError, match="reward_template"):
        scoring(reward_checkpoint=checkpoint)
    with pytest.raises(ValueError, match="reward_fps"):
        scoring(reward_checkpoint=checkpoint, reward_template="idgrpo", reward_fps="fast")


def test_published_config_files_that_idgrpo_cannot_follow_are_named(tmp_path):
    checkpoint = published_checkpoint(tmp_path / "a", prompt_template_type="detailed_special")
    with pytest.raises(ValueError, match="model_config.json.*detailed_special"):
        scoring(reward_checkpoint=checkpoint, reward_template="idgrpo")
    checkpoint = published_checkpoint(tmp_path / "b", num_frames=None, fps=2.0)
    with pytest.raises(ValueError, match="num_frames is null"):
        scoring(reward_checkpoint=checkpoint, reward_template="idgrpo")


def test_idgrpo_checkpoint_brings_its_own_scoring_settings(tmp_path):
    saved = VLMRewardConfig(fps=12.0, num_frames=7, max_pixels=50_176, video_min_pixels=3136)
    saved.save(tmp_path / "reward_config.json")
    assert VLMRewardConfig.load(tmp_path / "reward_config.json") == saved
    assert scoring(reward_checkpoint=tmp_path) == saved
    assert scoring(reward_checkpoint=tmp_path, reward_fps=10).fps == 10.0
    assert scoring() == VLMRewardConfig()  # no checkpoint: the defaults
    (tmp_path / "reward_config.json").write_text(json.dumps({"fps": 10.0, "frames": 4}))
    with pytest.raises(ValueError, match="reward_config.json.*frames"):
        scoring(reward_checkpoint=tmp_path)
    (tmp_path / "reward_config.json").write_text(json.dumps({"fps": "10"}))
    with pytest.raises(ValueError, match="'fps' must be float"):
        scoring(reward_checkpoint=tmp_path)


@pytest.fixture
def trained_vlm_reward(tmp_path):
    """A tiny Qwen2.5-VL reward as `train-reward --model vlm` leaves it: base directory + saved checkpoint, with
    settings far from the defaults (small frames)."""
    pytest.importorskip("transformers")
    from test_qwen_processor import tiny_model_config, tiny_tokenizer

    from idgrpo.models.lora import lora_parameters
    from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, save_qwen2_5_vl
    from idgrpo.models.qwen_processor import QwenProcessor
    from idgrpo.reward.vlm import build_vlm_reward_for_training

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    save_qwen2_5_vl(Qwen2_5_VL(tiny_model_config(QwenProcessor(tok))), tmp_path / "base")
    tok.save(str(tmp_path / "base" / "tokenizer.json"))
    config = VLMRewardConfig(video_min_pixels=56 * 56, max_pixels=84 * 112, num_frames=5, fps=12.0)
    model = build_vlm_reward_for_training(tmp_path / "base", config, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*lora_parameters(model.backbone), model.rm_head.weight]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    checkpoint = model.save(tmp_path / "identity_reward" / "checkpoint-3")
    gen = torch.Generator().manual_seed(3)
    # 33 frames (a training rollout's length), 4 of them scored: at 10 fps their temporal positions are 0 and 3, at
    # 16 fps 0 and 2.
    frames = torch.randint(0, 256, (2, 33, 56, 84, 3), dtype=torch.uint8, generator=gen)
    references = [[torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=gen)] for _ in range(2)]
    return model.eval(), tmp_path / "base", checkpoint, (frames, references, ["a", "b"])


def test_vlm_factory_scores_with_the_checkpoints_own_settings(trained_vlm_reward):
    model, base, checkpoint, batch = trained_vlm_reward
    extra = {"reward_base": str(base), "reward_checkpoint": str(checkpoint)}
    score = factories.vlm(SimpleNamespace(extra=extra), "cpu")
    assert score.__self__.config == model.config != VLMRewardConfig()
    torch.testing.assert_close(score(*batch), model.score(*batch), rtol=0, atol=1e-6)


def test_vlm_factory_scores_a_published_checkpoint_as_the_official_loop(trained_vlm_reward, tmp_path):
    from idgrpo.reward.vlm import VLMReward

    _, base, checkpoint, batch = trained_vlm_reward
    (checkpoint / "reward_config.json").unlink()  # the published layout: model_config.json one level up instead
    data = {"max_frame_pixels": 84 * 112, "num_frames": 5.0, "fps": None,
            "prompt_template_type": "subject_alignment_special"}
    (checkpoint.parent / "model_config.json").write_text(json.dumps({"data_config": data}))
    extra = {"reward_base": str(base), "reward_checkpoint": str(checkpoint),
             "reward_template": str(template_file(tmp_path))}
    got = factories.vlm(SimpleNamespace(extra=extra), "cpu")(*batch)
    official = VLMRewardConfig(instruction=RUBRIC, fps=10.0, num_frames=5, max_pixels=84 * 112)
    expected = VLMReward.from_pretrained(base, checkpoint, config=official, dtype=torch.float32).score(*batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    at_16_fps = VLMReward.from_pretrained(base, checkpoint, config=dataclasses.replace(official, fps=16.0),
                                          dtype=torch.float32).score(*batch)
    assert (got - at_16_fps).abs().max() > 1e-4  # the frame rate moves the temporal positions, hence the score
