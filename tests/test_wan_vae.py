"""Wan VAE: parity with diffusers AutoencoderKLWan at a tiny random config (encode and decode), the
temporal quirks of docs/models.md#vae-temporal-processing written out independently, chunked ==
whole-sequence, original-key loading."""

import pytest
import torch
import torch.nn.functional as F

from idgrpo.models.wan_vae import (
    WAN_LATENTS_MEAN,
    WanVAE,
    WanVAEConfig,
    diffusers_to_original_key,
)
from idgrpo.testing import randn


def _perturb(model, seed=0, scale=0.1):
    """Random weights beyond the default init (gammas of 1 and zero biases hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    cfg = WanVAEConfig.from_name("tiny")
    ref = diffusers.AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                                     num_res_blocks=cfg.num_res_blocks).eval()  # fmt: skip
    _perturb(ref)
    ours = WanVAE(cfg).eval()
    ours.load_state_dict_any(ref.state_dict())
    return ref, ours


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    video = randn(2, 3, 9, 32, 32, seed=1).clamp(-1, 1)
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
    z = ours.encode(video)
    assert z.shape == (2, 16, 3, 4, 4)
    mean, std = ours.latents_mean, ours.latents_std
    torch.testing.assert_close(z, (mu - mean) / std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.encode(video, normalize=False), mu, rtol=1e-4, atol=1e-5)
    # chunked encode (1, 4, 4 frames: the reference's own chunking; or 1, 8) is the same computation
    for chunk in (4, None):
        torch.testing.assert_close(ours.encode(video, chunk_frames=chunk), z, rtol=1e-5, atol=1e-6)


def test_decode_matches_diffusers_in_any_chunking(pair):
    ref, ours = pair
    z = randn(2, 16, 3, 4, 4, seed=2)
    with torch.no_grad():
        expected = ref.decode(z * ours.latents_std + ours.latents_mean).sample
    for chunk in (1, 2, None):
        out = ours.decode(z, chunk_frames=chunk)
        assert out.shape == (2, 3, 9, 32, 32)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.abs().max() <= 1.0  # clamped


def test_single_frame_image_round_trip_shapes(pair):
    _, ours = pair
    image = randn(3, 3, 1, 16, 24, seed=3).clamp(-1, 1)
    z = ours.encode(image)
    assert z.shape == (3, 16, 1, 2, 3)
    assert ours.decode(z).shape == (3, 3, 1, 16, 24)


def _reference_time_ops(x, conv_weight, conv_bias):
    """The whole-sequence formulas of docs/models.md#vae-temporal-processing, written out with plain conv3d
    (independent of the module)."""
    # downsample3d: [y0] + valid stride-2 windows (y0,y1,y2), (y2,y3,y4), ...
    down = torch.cat([x[:, :, :1], F.conv3d(x, conv_weight, conv_bias, stride=(2, 1, 1))], dim=2)
    return down


def test_downsample3d_first_frame_skips_time_conv():
    from idgrpo.models.wan_vae import Resample

    torch.manual_seed(0)
    block = _perturb(Resample(4, "downsample3d"), seed=4)
    x = randn(1, 4, 5, 6, 6, seed=5)
    spatial = block._per_frame(x)  # (1, 4, 5, 3, 3)
    expected = _reference_time_ops(spatial, block.time_conv.weight, block.time_conv.bias)
    out = block(x, {})
    assert out.shape[2] == 3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_upsample3d_zeroes_frame0_for_time_conv():
    from idgrpo.models.wan_vae import Resample

    block = _perturb(Resample(4, "upsample3d"), seed=6)
    x = randn(1, 4, 3, 5, 5, seed=7)
    # docs/models.md#vae-temporal-processing: x0 replaced by zero for the time conv, causal (2 zero frames),
    # split [0:C] then [C:2C]
    tc_in = F.pad(torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:]], dim=2), (0, 0, 0, 0, 2, 0))
    y = F.conv3d(tc_in, block.time_conv.weight, block.time_conv.bias)  # (1, 8, 3, 5, 5)
    frames = [x[:, :, 0]]
    for j in range(1, 3):
        frames += [y[:, :4, j], y[:, 4:, j]]
    expected = block._per_frame(torch.stack(frames, dim=2))
    out = block(x, {})
    assert out.shape == (1, 2, 5, 10, 10)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_original_key_layout_loads(tmp_path, pair):
    ref, ours = pair
    original = {diffusers_to_original_key(k, ours.config): v for k, v in ref.state_dict().items()}
    assert set(original) == set(ours.state_dict())  # the renamed keys are exactly our (original) names
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    loaded = WanVAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth", WanVAEConfig.from_name("tiny"))
    z = randn(1, 16, 2, 2, 2, seed=8)
    torch.testing.assert_close(loaded.decode(z), ours.decode(z), rtol=0, atol=0)
    # diffusers layout from a directory of safetensors
    from safetensors.torch import save_file

    (tmp_path / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    loaded2 = WanVAE.from_pretrained(tmp_path / "vae", WanVAEConfig.from_name("tiny"))
    torch.testing.assert_close(loaded2.decode(z), ours.decode(z), rtol=0, atol=0)


def test_full_size_key_map_matches_appendix_a():
    """The 194 diffusers keys of the real config map onto our module names with the shapes
    diffusers gives (docs/models.md#vae-key-layouts)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
        ours = WanVAE(WanVAEConfig())
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert len(ref_sd) == len(ours_sd) == 194
    for key, value in ref_sd.items():
        name = diffusers_to_original_key(key)
        assert ours_sd[name].shape == value.shape, key
    # the example rows of docs/models.md#vae-key-layouts
    rows = {
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.2.upsamplers.0.resample.1.bias": "decoder.upsamples.11.resample.1.bias",
        "encoder.mid_block.resnets.1.norm2.gamma": "encoder.middle.2.residual.3.gamma",
        "encoder.mid_block.attentions.0.to_qkv.weight": "encoder.middle.1.to_qkv.weight",
        "encoder.norm_out.gamma": "encoder.head.0.gamma",
        "quant_conv.bias": "conv1.bias",
        "post_quant_conv.weight": "conv2.weight",
    }
    for diffusers_key, original_key in rows.items():
        assert diffusers_to_original_key(diffusers_key) == original_key
    assert sum(p.numel() for p in ours.parameters()) == 126_892_531


def test_bad_input(tmp_path):
    vae = WanVAE(WanVAEConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="4\\*n\\+1"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="missing"):
        vae.load_state_dict_any({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3)}, source="x.pth")
    with pytest.raises(FileNotFoundError):
        WanVAE.from_pretrained(tmp_path / "none.pth")
    with pytest.raises(ValueError):
        WanVAEConfig(latents_mean=WAN_LATENTS_MEAN[:3])


def test_chunked_decode_keeps_activations_bounded():
    """With chunk_frames=1 no conv ever sees more than one chunk (+ its 2 cached frames), however long
    the latent: peak activation memory is independent of the video length."""
    from idgrpo.models.wan_vae import CausalConv3d

    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
             for m in vae.decoder.modules() if isinstance(m, CausalConv3d)]  # fmt: skip
    z = randn(1, 16, 6, 2, 2, seed=9)
    out = vae.decode(z, chunk_frames=1)
    assert out.shape[2] == 21 and max(seen) <= 4  # 1 latent frame -> at most 4 frames per conv input
    seen.clear()
    vae.decode(z, chunk_frames=None)
    assert max(seen) == 21  # whole-sequence decode: the last stage sees every frame at once
    for h in hooks:
        h.remove()


def test_diffusers_config_json_gives_the_shape_and_latent_statistics(tmp_path):
    """A non-default AutoencoderKLWan (other widths, 4 latent channels, time halved once, its own latents_mean /
    latents_std) saved by diffusers loads from its folder alone, and encodes / decodes as diffusers does."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 0.5, 2.0, 1.0]).eval()  # fmt: skip
    _perturb(ref, seed=10)
    ref.save_pretrained(tmp_path / "vae")
    ours = WanVAE.from_pretrained(tmp_path / "vae")
    assert ours.config.temporal_factor == 2 and ours.config.latents_std == (1.5, 0.5, 2.0, 1.0)
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    video = randn(1, 3, 5, 16, 16, seed=11).clamp(-1, 1)
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
        decoded = ref.decode(mu).sample
    z = ours.encode(video)
    assert z.shape == (1, 4, 3, 2, 2)
    torch.testing.assert_close(z, (mu - mean) / std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.decode(z), decoded, rtol=1e-4, atol=1e-5)


def test_unsupported_or_mismatched_vae_configs_name_the_file(tmp_path):
    from idgrpo.models.weights import CheckpointError

    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    ref.save_pretrained(tmp_path / "vae")
    config = tmp_path / "vae" / "config.json"
    raw = config.read_text()
    config.write_text(raw.replace('"is_residual": false', '"is_residual": true'))
    with pytest.raises(CheckpointError, match=r"vae/config.json: AutoencoderKLWan settings .*'is_residual': True"):
        WanVAE.from_pretrained(tmp_path / "vae")
    config.write_text(raw.replace('"z_dim": 16', '"z_dim": 15'))
    with pytest.raises(CheckpointError, match=r"vae/config.json: latents_mean/latents_std need z_dim=15"):
        WanVAE.from_pretrained(tmp_path / "vae")
    # A bare .pth carries no config: a config of another shape does not fit, and the error says what to pass.
    torch.save(ref.state_dict(), tmp_path / "small_vae.pth")
    with pytest.raises(CheckpointError, match=r"(?s)small_vae.pth does not fit WanVAE.*mis-shaped.*config=WanVAEC"):
        WanVAE.from_pretrained(tmp_path / "small_vae.pth", WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2, 2)))
