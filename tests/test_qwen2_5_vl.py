"""Qwen2.5-VL: parity with transformers' implementation (the oracle) at a tiny random config, fp32 on CPU,
for text-only, image+text and video+text inputs (right padding, partial windows, several images), and
checkpoint loading under both key namings."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from idgrpo.models.qwen2_5_vl import (
    Qwen2_5_VL,
    Qwen2_5_VLConfig,
    hf_config_dict,
    load_qwen2_5_vl,
    to_checkpoint_key,
    to_new_hf_key,
    vision_layout,
)
from idgrpo.models.weights import CheckpointError

transformers = pytest.importorskip("transformers")


def hf_config(c: Qwen2_5_VLConfig):
    v = c.vision
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                         num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                         intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
                         rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta,
                                              mrope_section=list(c.mrope_section)),
                         pad_token_id=c.pad_token_id, bos_token_id=c.pad_token_id, eos_token_id=c.pad_token_id),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                           intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                           tokens_per_second=v.tokens_per_second),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
        tie_word_embeddings=c.tie_word_embeddings)


def hf_oracle(config: Qwen2_5_VLConfig, seed: int = 0):
    """transformers' model with every tensor randomised (norm weights and biases too), and ours with the same
    weights mapped from the >= 4.52 names."""
    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(config)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name \
                    or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.8 / max(p.shape[-1], 1) ** 0.5)
    ours = Qwen2_5_VL(config).eval()
    state = {to_checkpoint_key(k): v for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    ours.load_state_dict(state, strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def models():
    return hf_oracle(Qwen2_5_VLConfig.from_name("tiny"))


def vision_sequence(config, blocks, text_before=(5, 6), between=(9,), after=(7, 8, 10)):
    """Token ids: text, then each (token, n) vision block as <start> pad*n <end> separated by `between`."""
    ids = list(text_before)
    for i, (token, n) in enumerate(blocks):
        if i:
            ids += list(between)
        ids += [config.vision_start_token_id] + [token] * n + [config.vision_end_token_id]
    return ids + list(after)


def pad_rows(rows, pad):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def token_types(ids, config):
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


def assert_valid_close(ref, ours, mask, atol):
    valid = mask.bool()
    err = (ref[valid] - ours[valid]).abs().max().item()
    assert err <= atol, f"max |diff| {err:.3g} > {atol:.1g}"
    return err


def test_text_only_hidden_states_and_logits_match_transformers(models):
    hf, ours = models
    c = ours.config
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 290, (n,), generator=gen).tolist() for n in (13, 8)]
    ids, mask = pad_rows(rows, c.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = ours(ids, lengths=mask.sum(-1))
        logits = ours.lm_logits(hidden)
    assert hidden.abs().mean() > 0.1  # not a degenerate comparison
    assert_valid_close(ref.hidden_states[-1], hidden, mask, 1e-5)
    assert_valid_close(ref.logits, logits, mask, 1e-5)


def test_image_text_matches_transformers_with_two_images_partial_windows_and_padding(models):
    hf, ours = models
    c = ours.config
    # 56x84 -> grid (1, 4, 6); 98x126 -> (1, 7, 9) is not mergeable, so use 84x140 -> (1, 6, 10):
    # 3x5 merged tokens in 2x2-token windows leaves partial windows on the right and bottom.
    grids = torch.tensor([[1, 4, 6], [1, 6, 10], [1, 4, 6]])
    n_tokens = (grids.prod(-1) // 4).tolist()
    rows = [vision_sequence(c, [(c.image_token_id, n_tokens[0]), (c.image_token_id, n_tokens[1])]),
            vision_sequence(c, [(c.image_token_id, n_tokens[2])], after=(7,))]
    ids, mask = pad_rows(rows, c.pad_token_id)
    pixels = torch.randn(int(grids.prod(-1).sum()), c.vision.patch_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        types = token_types(ids, c)
        position_ids, _ = hf.model.get_rope_index(ids, types, image_grid_thw=grids, attention_mask=mask)
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids,
                 mm_token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, position_ids, lengths=mask.sum(-1), pixel_values=pixels, image_grid_thw=grids)
        # The vision tower alone, before scattering into the sequence.
        ref_features = torch.cat(hf.model.get_image_features(pixels, grids).pooler_output)
        features = ours.visual(pixels, grids)
    assert (features - ref_features).abs().max() < 1e-5
    assert_valid_close(ref.hidden_states[-1], hidden, mask, 1e-5)
    assert_valid_close(ref.logits, ours.lm_logits(hidden), mask, 1e-5)


def test_video_text_matches_transformers(models):
    hf, ours = models
    c = ours.config
    # 4 frames of 84x112 -> grid (2, 6, 8); 2 frames of 56x56 -> (1, 4, 4); temporal interval 2 positions.
    grids = torch.tensor([[2, 6, 8], [1, 4, 4]])
    n_tokens = (grids.prod(-1) // 4).tolist()
    rows = [vision_sequence(c, [(c.video_token_id, n_tokens[0])]),
            vision_sequence(c, [(c.video_token_id, n_tokens[1])], after=(7, 8, 10, 11, 12))]
    ids, mask = pad_rows(rows, c.pad_token_id)
    pixels = torch.randn(int(grids.prod(-1).sum()), c.vision.patch_dim, generator=torch.Generator().manual_seed(5))
    seconds = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        types = token_types(ids, c)
        position_ids, _ = hf.model.get_rope_index(ids, types, video_grid_thw=grids, second_per_grid_ts=seconds,
                                                  attention_mask=mask)
        assert position_ids[0, 0].max() > position_ids[1, 0].max() - 40  # temporal row was used
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grids,
                 second_per_grid_ts=seconds, mm_token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, position_ids, lengths=mask.sum(-1), pixel_values_videos=pixels, video_grid_thw=grids)
    assert_valid_close(ref.hidden_states[-1], hidden, mask, 1e-5)


def test_vision_never_attends_across_time(models):
    _, ours = models
    c = ours.config
    grid = [(2, 4, 4)]
    pixels = torch.randn(32, c.vision.patch_dim, generator=torch.Generator().manual_seed(6))
    changed = pixels.clone()
    changed[16:] += 1.0  # the second temporal slice only
    with torch.no_grad():
        a, b = ours.visual(pixels, grid), ours.visual(changed, grid)
    assert torch.equal(a[:4], b[:4]) and not torch.allclose(a[4:], b[4:])
    layout = vision_layout(((2, 6, 10),), 2, c.vision.window_size, 14)
    assert layout.cu_slice_seqlens.tolist() == [0, 60, 120]
    # 3x5 merged tokens, 2x2 windows: per slice windows of 4,4,2 / 2,2,1 merged tokens, 4 patches each.
    sizes = (layout.cu_window_seqlens[1:] - layout.cu_window_seqlens[:-1]).tolist()
    assert sizes == [16, 16, 8, 8, 8, 4] * 2


def test_config_from_transformers_config_json_both_layouts():
    c = Qwen2_5_VLConfig.from_name("tiny")
    nested = hf_config(c).to_dict()
    assert "text_config" in nested
    assert Qwen2_5_VLConfig.from_hf(nested) == c
    assert Qwen2_5_VLConfig.from_hf(hf_config_dict(c)) == c
    three_b = Qwen2_5_VLConfig.from_name("3b")
    assert three_b.head_dim == 128 and three_b.vision.head_dim == 80
    # The reward checkpoint's config.json (flat 4.51 layout, docs/models.md#qwen-configuration), vocabulary
    # resized to 151,666.
    published = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151666,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "image_token_id": 151655, "video_token_id": 151656,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}}
    assert Qwen2_5_VLConfig.from_hf(published) == dataclasses.replace(three_b, vocab_size=151666)
    with torch.device("meta"):
        params = sum(p.numel() for p in Qwen2_5_VL(three_b).parameters())
    assert abs(params / 1e9 - 3.75) < 0.01  # docs/models.md#qwen-configuration: about 3.75B unique
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2_5_VLConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("naming", ["checkpoint", "new"])
def test_load_checkpoint_under_both_namings_without_tied_lm_head(models, tmp_path, naming):
    hf, ours = models
    c = ours.config
    rename = to_new_hf_key if naming == "new" else (lambda k: k)
    state = {rename(k): v.contiguous() for k, v in ours.state_dict().items()}  # no lm_head: tied
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(c)))
    loaded = load_qwen2_5_vl(tmp_path, dtype=torch.float32)
    ids = torch.randint(1, 290, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ours(ids))
    assert loaded.config == c and loaded.lm_head is None


def test_load_reports_every_mismatch_with_a_vocabulary_hint(models, tmp_path):
    _, ours = models
    state = {k: v.contiguous() for k, v in ours.state_dict().items() if "blocks.1." not in k}
    state["model.embed_tokens.weight"] = torch.zeros(300, ours.config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_qwen2_5_vl(tmp_path, "tiny", dtype=torch.float32)
    text = str(err.value)
    assert "missing" in text and "visual.blocks.1.attn.qkv.weight" in text
    assert "vocabulary has 300 rows" in text


def test_triton_kernel_path_matches_the_reference_path_with_gradients(monkeypatch):
    # Rope, RMSNorm and attention (varlen windows, full slices, causal GQA with right padding) through the
    # Triton kernels (the interpreter on CPU) against the same model on the PyTorch references.
    config = Qwen2_5_VLConfig.from_name("tiny")
    torch.manual_seed(0)
    model = Qwen2_5_VL(config)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 290, (2, 20), generator=gen)
    ids[0, 3:18] = config.image_token_id
    position_ids = torch.arange(20).view(1, 1, 20).expand(3, 2, 20)
    inputs = dict(lengths=torch.tensor([20, 13]), pixel_values=torch.randn(60, 1176, generator=gen),
                  image_grid_thw=[(1, 6, 10)])

    def run():
        model.zero_grad()
        out = model(ids, position_ids, **inputs)
        (out[0].sum() + out[1, :13].square().sum()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setenv("IDGRPO_KERNELS", "reference")
    expected, expected_grads = run()
    monkeypatch.setenv("IDGRPO_KERNELS", "triton")
    out, grads = run()
    assert (out - expected).abs().max() < 1e-5
    for name, grad in expected_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-5 * (1 + grad.abs().max()), name


def test_sdpa_baseline_attention_gives_the_same_model(models):
    _, ours = models
    c = ours.config
    ids = torch.randint(1, 290, (2, 20), generator=torch.Generator().manual_seed(9))
    ids[0, 3:18] = c.image_token_id
    position_ids = torch.arange(20).view(1, 1, 20).expand(3, 2, 20)
    inputs = dict(lengths=torch.tensor([20, 13]), pixel_values=torch.randn(60, 1176), image_grid_thw=[(1, 6, 10)])
    with torch.no_grad():
        expected = ours(ids, position_ids, **inputs)
        ours.set_attention_impl("sdpa")
        try:
            out = ours(ids, position_ids, **inputs)
        finally:
            ours.set_attention_impl("idgrpo")
    valid = torch.arange(20)[None] < inputs["lengths"][:, None]
    assert (out[valid] - expected[valid]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        ours.set_attention_impl("flash")
    assert not hasattr(ours, "set_attention")  # one name for the switch: set_attention_impl
