"""VLMReward: the reward is transformers' final hidden state at the reward token times rm_head (with LoRA
merged, and with LoRA disabled = the base model); the published checkpoint layout (PEFT adapters +
non-LoRA state, old and new key names) loads to the same scores; training gradients reach exactly
the trainable parts."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from idgrpo.models.lora import disable_lora, lora_parameters, merge_lora, unmerge_lora
from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, save_qwen2_5_vl, to_new_hf_key
from idgrpo.models.qwen_processor import QwenProcessor
from idgrpo.models.weights import CheckpointError
from idgrpo.reward.losses import btt_loss
from idgrpo.reward.vlm import VLMReward, VLMRewardConfig, build_vlm_reward_for_training

transformers = pytest.importorskip("transformers")
from test_qwen2_5_vl import hf_config  # noqa: E402
from test_qwen_processor import smooth_image, tiny_model_config, tiny_tokenizer  # noqa: E402

# Small frames stay small (no upscaling to the 100k-pixel video minimum).
CONFIG = VLMRewardConfig(video_min_pixels=56 * 56, max_pixels=84 * 112, num_frames=5)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer()
    config = tiny_model_config(QwenProcessor(tok))
    torch.manual_seed(0)
    backbone = Qwen2_5_VL(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.8 / max(p.shape[-1], 1) ** 0.5)
    save_qwen2_5_vl(backbone, directory)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def reward(base_dir):
    model = build_vlm_reward_for_training(base_dir, CONFIG, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model.backbone):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def batch_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, 9, 56, 84, 3), dtype=torch.uint8, generator=gen)
    references = [[smooth_image(56, 56, seed)], [smooth_image(56, 84, seed + 1), smooth_image(84, 56, seed + 2)]]
    return frames, references, ["a man and a woman talk", "two friends walk in a park"]


def hf_reward(model: VLMReward, frames, references, prompts):
    """transformers' Qwen2.5-VL with the backbone's weights (LoRA as it currently acts: merged or off), read
    at the reward token, times rm_head."""
    backbone = model.backbone
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(backbone.config)).eval()
    state = {to_new_hf_key(k): v for k, v in backbone.state_dict().items() if ".lora_" not in k}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    batch = model.processor(model.conversations(frames, references, prompts))
    types = (batch.input_ids == backbone.config.image_token_id).int() \
        + 2 * (batch.input_ids == backbone.config.video_token_id).int()
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                 image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
                 video_grid_thw=batch.video_grid_thw, second_per_grid_ts=batch.second_per_grid_ts,
                 mm_token_type_ids=types, output_hidden_states=True)
    rows, cols = (batch.input_ids == model.reward_token_id).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 1]
    return out.hidden_states[-1][rows, cols] @ model.rm_head.weight[0]


def test_reward_is_rm_head_of_the_final_hidden_state_at_the_reward_token(reward):
    frames, references, prompts = batch_inputs()
    scores = reward.score(frames, references, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scores.device == frames.device
    with disable_lora(reward.backbone):
        base_scores = reward.score(frames, references, prompts)
        expected_base = hf_reward(reward, frames, references, prompts)
    assert (base_scores - expected_base).abs().max() < 1e-5
    assert (scores - base_scores).abs().max() > 1e-3  # the adapters act
    merge_lora(reward.backbone)
    try:
        expected = hf_reward(reward, frames, references, prompts)
    finally:
        unmerge_lora(reward.backbone)
    assert (scores - expected).abs().max() < 1e-5


def test_attention_switch_reaches_the_backbone_and_keeps_the_rewards(reward):
    frames, references, prompts = batch_inputs(3)
    ours = reward.score(frames, references, prompts)
    reward.set_attention_impl("sdpa")
    try:
        assert {type(m).__name__: m.attention_fn.__name__ for m in reward.modules() if hasattr(m, "attention_fn")} == {
            "VisionAttention": "sdpa_attention", "TextAttention": "sdpa_attention"}
        assert (reward.score(frames, references, prompts) - ours).abs().max() < 1e-5
    finally:
        reward.set_attention_impl("idgrpo")
    assert torch.equal(reward.score(frames, references, prompts), ours)


def test_text_after_the_reward_token_does_not_change_the_reward(reward, base_dir):
    frames, references, prompts = batch_inputs(seed=3)
    longer = dataclasses.replace(CONFIG, instruction=CONFIG.instruction + " and some more words")
    other = VLMReward(reward.backbone, reward.processor, longer)
    other.rm_head = reward.rm_head
    scores = reward.score(frames, references, prompts)
    assert (other.score(frames, references, prompts) - scores).abs().max() < 1e-6  # causal: same up to fp order
    # ... while the video does change it.
    assert (reward.score(frames.flip(1), references, prompts) - scores).abs().max() > 1e-4
    with pytest.raises(ValueError, match="reward token"):
        VLMRewardConfig(instruction="no token here")


@pytest.mark.parametrize("naming", ["checkpoint", "new"])
def test_checkpoint_directory_round_trip_in_the_published_layout(reward, base_dir, tmp_path, naming):
    frames, references, prompts = batch_inputs(seed=4)
    expected = reward.score(frames, references, prompts)
    saved = reward.save(tmp_path / "ckpt")
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "adapter_config.json").is_file()
    if naming == "new":
        # As written by PEFT on transformers >= 4.52, and the non-LoRA state as a .pth (Identity-GRPO).
        adapters = load_file(str(saved / "adapter_model.safetensors"))
        prefix = "base_model.model."
        save_file({prefix + to_new_hf_key(k[len(prefix):]): v for k, v in adapters.items()},
                  str(saved / "adapter_model.safetensors"))
        non_lora = load_file(str(saved / "non_lora_state_dict.safetensors"))
        torch.save({prefix + to_new_hf_key(k[len(prefix):]): v for k, v in non_lora.items()},
                   saved / "non_lora_state_dict.pth")
        (saved / "non_lora_state_dict.safetensors").unlink()
        assert any(".language_model." in k for k in load_file(str(saved / "adapter_model.safetensors")))
    loaded = VLMReward.from_pretrained(base_dir, saved, config=CONFIG, dtype=torch.float32)
    assert loaded.backbone.config.vocab_size == reward.backbone.config.vocab_size == 264  # resized: 263 + 1
    assert loaded.reward_token_id == 263
    assert (loaded.score(frames, references, prompts) - expected).abs().max() < 1e-6
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert adapter_config["r"] == CONFIG.lora_rank and adapter_config["lora_alpha"] == CONFIG.lora_alpha


def test_missing_non_lora_state_is_a_clear_error(reward, base_dir, tmp_path):
    reward.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "non_lora_state_dict.safetensors").unlink()
    with pytest.raises(CheckpointError, match="non_lora_state_dict"):
        VLMReward.from_pretrained(base_dir, tmp_path / "ckpt", config=CONFIG, dtype=torch.float32)


def test_training_gradients_reach_adapters_head_embeddings_and_vision_only(base_dir):
    model = build_vlm_reward_for_training(base_dir, CONFIG, seed=5, train_vision=True).train()
    frames, references, prompts = batch_inputs(seed=6)
    # Both videos of each pair in one batch: (a0, a1, b0, b1).
    rewards = model.rewards(torch.cat([frames, frames.flip(1)]), references * 2, prompts * 2)
    loss = btt_loss(rewards[:2], rewards[2:], torch.tensor([1, 0]))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert "rm_head.weight" in grads and "backbone.model.embed_tokens.weight" in grads
    assert any(".lora_A." in n for n in grads) and any(n.startswith("backbone.visual.") for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["rm_head.weight"].abs().sum() > 0 and grads["backbone.visual.merger.mlp.2.weight"].abs().sum() > 0
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "backbone.model.layers.0.self_attn.q_proj.weight" in frozen and "backbone.model.norm.weight" in frozen
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
