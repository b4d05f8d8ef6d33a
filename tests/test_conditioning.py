"""VACE context and Phantom reference latents: resize/pad rule, mask pixel-unshuffle and time resampling
(written out from docs/models.md#vace-context), per-sample equivalence of the batched builder, reference
order, bad input."""

import pytest
import torch
import torch.nn.functional as F

from idgrpo.models.conditioning import (
    fit_on_white,
    group_by_reference_count,
    load_references,
    phantom_inject,
    phantom_reference_latents,
    vace_context,
    vace_mask_channels,
)
from idgrpo.models.wan_vae import WanVAE, WanVAEConfig
from idgrpo.testing import randn

H, W, FRAMES = 16, 24, 5  # latent 2 x 2 x 3


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = WanVAE(WanVAEConfig.from_name("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _image(h, w, seed):
    return torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fit_on_white_rule():
    img = _image(8, 4, 0)  # tall image into 16 x 24: scale = min(2, 6) = 2 -> 16 x 8, left = 8
    out = fit_on_white(img, 16, 24)
    x = img.permute(2, 0, 1).float() / 127.5 - 1
    inner = F.interpolate(x[None], size=(16, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[:, :, 8:16], inner)
    assert torch.all(out[:, :, :8] == 1) and torch.all(out[:, :, 16:] == 1)  # white padding
    same = _image(16, 24, 1)
    torch.testing.assert_close(fit_on_white(same, 16, 24), same.permute(2, 0, 1).float() / 127.5 - 1)
    wide = fit_on_white(_image(5, 30, 2), 16, 24, mode="bicubic")  # scale 0.8 -> 4 x 24, top = 6
    assert torch.all(wide[:, :6] == 1) and torch.all(wide[:, 10:] == 1) and not torch.all(wide[:, 6:10] == 1)
    assert wide.min() >= -1 and wide.max() <= 1


def test_mask_channels_match_spec():
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 9, 16, 24, generator=g) > 0.5).float()
    out = vace_mask_channels(mask)
    assert out.shape == (2, 64, 3, 2, 3)
    f, f_lat = 9, 3
    for i in range(f_lat):
        src = min(int((i + 0.5) * f / f_lat), f - 1)  # nearest-exact
        for a in range(8):
            for b in range(8):
                torch.testing.assert_close(out[:, a * 8 + b, i], mask[:, 0, src, a::8, b::8])


def test_vace_context_subject_to_video(vae):
    refs = [[_image(20, 10, 4), _image(16, 24, 5)], [_image(7, 9, 6), _image(30, 30, 7)]]
    ctx = vace_context(vae, refs, FRAMES, H, W)
    assert ctx.shape == (2, 96, 2 + 2, 2, 3)
    for b in range(2):
        for j in range(2):  # reference j alone, as a 1-frame video, in list order
            alone = vae.encode(fit_on_white(refs[b][j], H, W)[None, :, None])[0, :, 0]
            torch.testing.assert_close(ctx[b, :16, j], alone, rtol=1e-4, atol=1e-5)
    assert torch.all(ctx[:, 16:32, :2] == 0)  # reference latents padded with zeros to 32 channels
    assert torch.all(ctx[:, 32:, :2] == 0)  # reference mask frames are zeros
    assert torch.all(ctx[:, 32:, 2:] == 1)  # M = 1: generate everything
    zeros_latent = vae.encode(torch.zeros(1, 3, FRAMES, H, W))[0]
    for b in range(2):  # V = 0: inactive and reactive are both VAE(zeros), not zero latents
        torch.testing.assert_close(ctx[b, :16, 2:], zeros_latent)
        torch.testing.assert_close(ctx[b, 16:32, 2:], zeros_latent)
    assert zeros_latent.abs().sum() > 0
    flipped = vace_context(vae, refs, FRAMES, H, W, diffusers_ref_order=True)
    torch.testing.assert_close(flipped[:, :, :2], ctx[:, :, :2].flip(2))
    torch.testing.assert_close(flipped[:, :, 2:], ctx[:, :, 2:])


def test_vace_context_batched_equals_per_sample(vae):
    refs = [[_image(12, 12, 8)], [_image(16, 8, 9)], [_image(9, 20, 10)]]
    video = randn(3, 3, FRAMES, H, W, seed=11).clamp(-1, 1)
    mask = torch.rand(3, 1, FRAMES, H, W, generator=torch.Generator().manual_seed(12))  # binarised inside
    batched = vace_context(vae, refs, FRAMES, H, W, video=video, mask=mask)
    assert batched.shape == (3, 96, 1 + 2, 2, 3)
    for b in range(3):
        single = vace_context(vae, refs[b : b + 1], FRAMES, H, W, video=video[b : b + 1], mask=mask[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-5)
    m = (mask[:1] > 0.5).float()
    inactive = vae.encode(video[:1] * (1 - m))[0]
    torch.testing.assert_close(batched[0, :16, 1:], inactive, rtol=1e-4, atol=1e-5)


def test_phantom(vae):
    refs = [[_image(10, 10, 13), _image(16, 24, 14)]]
    lat = phantom_reference_latents(vae, refs, H, W)
    assert lat.shape == (1, 16, 2, 2, 3)
    second = vae.encode(fit_on_white(refs[0][1], H, W, mode="bicubic")[None, :, None])[0, :, 0]
    torch.testing.assert_close(lat[0, :, 1], second, rtol=1e-4, atol=1e-5)  # list order, appended at the end
    x = randn(1, 16, 2 + 2, 2, 3, seed=15)
    injected = phantom_inject(x, lat)
    torch.testing.assert_close(injected[:, :, :2], x[:, :, :2])
    torch.testing.assert_close(injected[:, :, 2:], lat)
    assert torch.all(phantom_inject(x, torch.zeros_like(lat))[:, :, 2:] == 0)  # unconditional pass


def test_bad_input(vae, tmp_path):
    mixed = [[_image(8, 8, 0)], [_image(8, 8, 1), _image(8, 8, 2)], [_image(8, 8, 3)]]
    with pytest.raises(ValueError, match="same number of references"):
        vace_context(vae, mixed, FRAMES, H, W)
    groups = group_by_reference_count(mixed)
    assert groups == {1: [0, 2], 2: [1]}
    assert vace_context(vae, [mixed[i] for i in groups[1]], FRAMES, H, W).shape == (2, 96, 1 + 2, 2, 3)
    with pytest.raises(ValueError, match="at least one reference"):
        phantom_reference_latents(vae, [[]], H, W)
    with pytest.raises(ValueError, match="4\\*n\\+1"):
        vace_context(vae, [[_image(8, 8, 0)]], 6, H, W)
    with pytest.raises(ValueError, match="uint8"):
        fit_on_white(torch.zeros(8, 8, 3), H, W)
    with pytest.raises(FileNotFoundError, match="prompts.csv row 3.*missing.png"):
        load_references([tmp_path / "missing.png"], where="prompts.csv row 3")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_references([bad])
