"""Qwen2.5-VL input pipeline: smart-resize and image patches against transformers' Qwen2VL image processor
(its PIL backend: torchvision is not installed here); video patches against the reference patch formula
written out below (transformers' video processor needs torchvision); M-RoPE position ids against
transformers' `get_rope_index`; the chat template and token ids against the published Jinja template
rendered by transformers' tokenizer."""

import numpy as np
import pytest
import torch

from idgrpo.models.qwen2_5_vl import Qwen2_5_VLConfig
from idgrpo.models.qwen_processor import (
    CLIP_MEAN,
    CLIP_STD,
    QwenProcessor,
    QwenProcessorConfig,
    preprocess_image,
    preprocess_video,
    render_chat,
    rope_index,
    sample_frame_indices,
    smart_resize,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL-Instruct's chat_template.json (the oracle for our template).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(extra=()):
    """Byte-level BPE over the 256 byte symbols (no merges) plus Qwen's special tokens: a stand-in for the
    151k-token Qwen tokenizer.json with the same structure."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*QWEN_SPECIAL_TOKENS, *extra]])
    return tok


def tiny_model_config(processor: QwenProcessor) -> Qwen2_5_VLConfig:
    """The tiny preset with the tiny tokenizer's special-token ids."""
    import dataclasses

    return dataclasses.replace(Qwen2_5_VLConfig.from_name("tiny"), image_token_id=processor.image_token_id,
                               video_token_id=processor.video_token_id,
                               vision_start_token_id=processor.ids["<|vision_start|>"],
                               vision_end_token_id=processor.ids["<|vision_end|>"],
                               pad_token_id=processor.pad_token_id)


def smooth_image(h, w, seed):
    """Natural-image-like content (low-frequency), where resizers agree to a level or two."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=gen) * 255
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).contiguous()


def test_smart_resize_matches_reference_and_the_spec_examples():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h, w in [(61, 97), (240, 416), (480, 832), (13, 300), (1000, 37), (56, 84), (721, 1279)]:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 399_360), (128 * 28 * 28, 399_360)]:
            assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi), (h, w, lo, hi)
    video = QwenProcessorConfig()
    assert smart_resize(240, 416, 28, video.video_min_pixels, video.video_max_pixels) == (252, 420)
    assert smart_resize(480, 832, 28, video.video_min_pixels, video.video_max_pixels) == (476, 812)


def reference_image_processor(config: QwenProcessorConfig):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=config.image_min_pixels, max_pixels=config.image_max_pixels)


def test_image_patches_equal_the_reference_processor_when_no_resize_is_needed():
    config = QwenProcessorConfig()
    ref = reference_image_processor(config)
    for i, (h, w) in enumerate([(56, 84), (84, 140), (112, 56)]):
        img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        expected = ref(images=[img.numpy()], return_tensors="pt")
        patches, grid = preprocess_image(img, config)
        assert [list(grid)] == expected["image_grid_thw"].tolist()
        assert patches.shape == expected["pixel_values"].shape
        assert (patches - expected["pixel_values"]).abs().max() < 1e-5


def test_image_patches_of_odd_sizes_match_the_reference_grid_and_pixels_to_a_resize_level():
    config = QwenProcessorConfig(image_min_pixels=56 * 56, image_max_pixels=140 * 140)
    ref = reference_image_processor(config)
    level = 1 / 255 / min(CLIP_STD)  # one uint8 level after normalisation
    for i, (h, w) in enumerate([(61, 97), (75, 50), (130, 45), (300, 170)]):  # the last one shrinks to the budget
        img = smooth_image(h, w, seed=10 + i)
        expected = ref(images=[img.numpy()], return_tensors="pt")
        patches, grid = preprocess_image(img, config)
        assert [list(grid)] == expected["image_grid_thw"].tolist()
        diff = (patches - expected["pixel_values"]).abs()
        # Note [resize] in qwen_processor: torch's anti-aliased bicubic vs PIL's fixed-point two-pass one.
        assert diff.max() <= 2 * level + 1e-5 and diff.mean() <= 0.3 * level, (h, w, diff.max() / level)


def reference_video_patches(frames_uint8: np.ndarray, height, width, patch=14, temporal=2, merge=2):
    """The reference video pipeline written out (resize done by the caller): rescale, normalise, pad the
    frame count with the last frame, reshape (gt, tp, C, gh/m, m, p, gw/m, m, p), permute to
    (gt, gh/m, gw/m, m, m, C, tp, p, p)."""
    x = frames_uint8.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)) / np.array(CLIP_STD, np.float32).reshape(1, 3, 1, 1)
    if x.shape[0] % temporal:
        x = np.concatenate([x, np.repeat(x[-1:], temporal - x.shape[0] % temporal, axis=0)])
    gt, gh, gw = x.shape[0] // temporal, height // patch, width // patch
    x = x.reshape(gt, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * temporal * patch * patch), (gt, gh, gw)


def test_video_patches_match_the_reference_formula_with_sampling_and_odd_frame_counts():
    config = QwenProcessorConfig(video_min_pixels=56 * 56, video_max_pixels=112 * 168)
    assert sample_frame_indices(33, 5) == [0, 11, 21, 32]  # 5 requested -> 4 used (Python round)
    frames = torch.randint(0, 256, (33, 84, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    patches, grid, spg = preprocess_video(frames, config, fps=16.0)
    expected, expected_grid = reference_video_patches(frames[[0, 11, 21, 32]].numpy(), 84, 112)
    assert grid == expected_grid == (2, 6, 8)
    assert np.abs(patches.numpy() - expected).max() < 1e-5
    assert spg == pytest.approx(2 / (4 / 33 * 16.0))  # temporal_patch / sampled fps
    # Three frames taken as they are: the last one is repeated to fill the temporal patch.
    three = frames[:3, :56, :84]
    patches, grid, spg = preprocess_video(three, config, fps=8.0, sample=False)
    expected, expected_grid = reference_video_patches(three.numpy(), 56, 84)
    assert grid == expected_grid == (2, 4, 6) and spg == 0.25
    assert np.abs(patches.numpy() - expected).max() < 1e-5
    # An odd size is resized onto the grid (torch bicubic + antialias, as torchvision on tensors).
    odd = frames[:4, :61, :97]
    patches, grid, _ = preprocess_video(odd, config, sample=False)
    assert grid == (2, *(s // 14 for s in smart_resize(61, 97, 28, 56 * 56, 112 * 168)))
    assert patches.shape == (grid[0] * grid[1] * grid[2], 1176) and torch.isfinite(patches).all()


def hf_rope_model(config: Qwen2_5_VLConfig):
    from test_qwen2_5_vl import hf_config

    return transformers.Qwen2_5_VLModel(hf_config(config)).eval()


def test_position_ids_equal_reference_get_rope_index_for_images_videos_and_padding():
    processor = QwenProcessor(tiny_tokenizer())
    config = tiny_model_config(processor)
    img_a, img_b = smooth_image(56, 84, 1), smooth_image(84, 140, 2)
    video = torch.randint(0, 256, (9, 84, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    processor.config = QwenProcessorConfig(video_min_pixels=56 * 56, video_max_pixels=112 * 168)
    batch = processor([
        [{"type": "image", "image": img_a}, {"type": "image", "image": img_b},
         {"type": "video", "video": video, "fps": 8.0}, {"type": "text", "text": "two people walk"}],
        [{"type": "text", "text": "before "}, {"type": "image", "image": img_a}, {"type": "text", "text": "after"}],
        [{"type": "video", "video": video[:4], "fps": 4.0, "sample": False}, {"type": "text", "text": "x"}],
    ])
    assert batch.image_grid_thw.tolist() == [[1, 4, 6], [1, 6, 10], [1, 4, 6]]
    assert batch.video_grid_thw.tolist() == [[2, 6, 8], [2, 6, 8]]
    hf = hf_rope_model(config)
    types = (batch.input_ids == config.image_token_id).int() + 2 * (batch.input_ids == config.video_token_id).int()
    expected, _ = hf.get_rope_index(batch.input_ids, types, image_grid_thw=batch.image_grid_thw,
                                    video_grid_thw=batch.video_grid_thw,
                                    second_per_grid_ts=batch.second_per_grid_ts, attention_mask=batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], expected[:, valid])
    assert batch.lengths.tolist() == batch.attention_mask.sum(-1).tolist() and len(set(batch.lengths.tolist())) > 1


def test_text_after_a_long_video_resumes_after_its_largest_temporal_position():
    # transformers 4.51 (the reward model's version, and docs/models.md#language-model-and-m-rope) resumes
    # text at max position + 1;
    # transformers >= 5 resumes at start + max(h, w) / 2, which differs only when the temporal positions
    # outrun the spatial ones, as here: 4 temporal patches 2 positions apart on a 2x2 merged grid.
    ids = torch.tensor([[7, 8] + [301] * 16 + [9]])
    positions, deltas = rope_index(ids, None, None, torch.tensor([[4, 4, 4]]), torch.tensor([1.0]),
                                   image_token_id=300, video_token_id=301)
    assert positions[0, 0, 2:18].tolist() == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4
    assert positions[1, 0, 2:6].tolist() == [2, 2, 3, 3] and positions[2, 0, 2:6].tolist() == [2, 3, 2, 3]
    assert positions[:, 0, 18].tolist() == [9, 9, 9]
    assert deltas.tolist() == [10 - 19]
    with pytest.raises(ValueError, match="fewer than 16 pad tokens"):
        rope_index(ids[:, :10], None, None, torch.tensor([[4, 4, 4]]), None, image_token_id=300, video_token_id=301)


def test_chat_template_and_token_ids_equal_the_reference_template_and_tokenizer():
    tok = tiny_tokenizer(extra=["<|SA_reward|>"])
    processor = QwenProcessor(tok, extra_special_tokens=["<|SA_reward|>"])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "Rate the identity. Please provide the rating of subject alignment: <|SA_reward|>\nEND"
    img = smooth_image(56, 84, 5)
    video = torch.randint(0, 256, (5, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    processor.config = QwenProcessorConfig(video_min_pixels=56 * 56)
    content = [{"type": "image", "image": img}, {"type": "image", "image": img},
               {"type": "video", "video": video, "fps": 16.0}, {"type": "text", "text": text}]
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": content}], chat_template=QWEN_CHAT_TEMPLATE,
                                          add_generation_prompt=True, add_vision_id=True, tokenize=False)
    assert render_chat(content) == rendered
    batch = processor([content])
    # The reference processor expands each pad string to t*h*w/4 copies, then tokenizes the whole text.
    counts = iter([6, 6, 2 * 4 * 4 // 4])  # two 56x84 images, 4 sampled 56x56 frames
    pieces = rendered.replace("<|video_pad|>", "<|image_pad|>").split("<|image_pad|>")
    pads = ["<|image_pad|>"] * 2 + ["<|video_pad|>"]
    expanded = pieces[0] + "".join(p * next(counts) + rest for p, rest in zip(pads, pieces[1:]))
    assert batch.input_ids[0].tolist() == hf_tok(expanded, add_special_tokens=False)["input_ids"]
    assert (batch.input_ids == processor.token_id("<|SA_reward|>")).sum() == 1
    assert processor.token_id("<|SA_reward|>") == len(tok.get_vocab()) - 1
