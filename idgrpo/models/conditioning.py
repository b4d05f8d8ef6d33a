"""Reference-image conditioning for VACE (96-channel context, docs/models.md#vace-context) and Phantom
(appended clean reference latents, docs/models.md#phantom), built per sample and batched.

References arrive as the reward interface has them: a list (one entry per sample) of lists of uint8
(h, w, 3) images of any size; each sample may have 1 or 2 (or more) references.

Resize/pad rules (both models): a reference is fitted inside the video's (H, W) keeping its aspect
ratio, scale = min(H/h, W/w), new size (int(h*scale), int(w*scale)), and pasted centred (top/left =
floor of half the slack) on a white canvas (+1 in [-1, 1]).
- VACE: bilinear, align_corners=False, no antialias (the Wan/VACE code; an image that already has
  the video's size is used as is).
- Phantom: the original uses PIL LANCZOS; here bicubic with antialias (the closest torch filter),
  so Phantom references differ from the original by resampling noise only.

Batching: all references of a batch go through the VAE as one batch of 1-frame videos; the VACE
source video halves (inactive, reactive) of all samples as one batch; in subject-to-video (no source
video) both halves are VAE(zeros), encoded once and broadcast. A batch must have the same number of
references per sample, because that count sets the latent length (group prompts by it); a mismatch
is a ValueError naming the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from idgrpo.models.wan_vae import WanVAE, latent_frames


def fit_on_white(image: torch.Tensor, height: int, width: int, *, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, height, width) in [-1, 1]: aspect-preserving fit, centred on white."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"reference must be a uint8 (h, w, 3) image, got {image.dtype} {tuple(image.shape)}")
    x = image.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, h, w)
    h, w = x.shape[1:]
    if (h, w) == (height, width):
        return x
    scale = min(height / h, width / w)
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    if mode == "bilinear":
        resized = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    elif mode == "bicubic":
        resized = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
        resized = resized.clamp_(-1.0, 1.0)
    else:
        raise ValueError(f"unknown resize mode {mode!r} (bilinear for VACE, bicubic for Phantom)")
    canvas = torch.ones(3, height, width, dtype=x.dtype, device=x.device)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = resized
    return canvas


def load_references(paths: Sequence[str | Path], *, where: str = "") -> list[torch.Tensor]:
    """Read reference images (uint8 (h, w, 3)); a missing or unreadable file raises naming it and `where`
    (e.g. "prompts.csv row 7")."""
    from idgrpo.media import read_image

    images = []
    for p in paths:
        try:
            images.append(read_image(p))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: reference image: {e}" if where else str(e)) from e
    return images


def group_by_reference_count(references: Sequence[Sequence[object]]) -> dict[int, list[int]]:
    """Sample indices per reference count ({1: [0, 3], 2: [1, 2]}): the batches `vace_context` and
    `phantom_reference_latents` accept, since the count sets the latent length."""
    groups: dict[int, list[int]] = {}
    for i, refs in enumerate(references):
        groups.setdefault(len(refs), []).append(i)
    return groups


def _reference_count(references: Sequence[Sequence[torch.Tensor]]) -> int:
    counts = [len(r) for r in references]
    if not counts:
        raise ValueError("empty batch of references")
    if min(counts) < 1:
        raise ValueError(f"every sample needs at least one reference image, got counts {counts}")
    if len(set(counts)) != 1:
        raise ValueError(
            f"samples in one batch must have the same number of references (it sets the latent length), "
            f"got {counts}; group samples by reference count"
        )
    return counts[0]


def encode_references(vae: WanVAE, references: Sequence[Sequence[torch.Tensor]], height: int, width: int,
                      *, mode: str) -> torch.Tensor:  # fmt: skip
    """Each reference encoded alone as a 1-frame video -> normalised latents (B, n_ref, 16, h, w)."""
    n_ref = _reference_count(references)
    device = vae.latents_mean.device
    pixels = torch.stack([fit_on_white(img.to(device), height, width, mode=mode) for refs in references
                          for img in refs])  # fmt: skip  # (B*n_ref, 3, H, W)
    latents = vae.encode(pixels[:, :, None])[:, :, 0]  # (B*n_ref, 16, h, w)
    return latents.reshape(len(references), n_ref, *latents.shape[1:])


def vace_mask_channels(mask: torch.Tensor, stride: int = 8, temporal_factor: int = 4) -> torch.Tensor:
    """(B, 1, F, H, W) {0,1} -> (B, stride*stride, F_lat, H/stride, W/stride): pixel-unshuffle with the
    (row, col) offset as the outer channel index a*8+b, then nearest-exact resampling in time."""
    b, _, f, h, w = mask.shape
    m = mask[:, 0].reshape(b, f, h // stride, stride, w // stride, stride)
    m = m.permute(0, 3, 5, 1, 2, 4).reshape(b, stride * stride, f, h // stride, w // stride)
    f_lat = latent_frames(f, temporal_factor)
    return F.interpolate(m, size=(f_lat, h // stride, w // stride), mode="nearest-exact")


def vace_context(vae: WanVAE, references: Sequence[Sequence[torch.Tensor]], num_frames: int, height: int,
                 width: int, *, video: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 diffusers_ref_order: bool = False) -> torch.Tensor:  # fmt: skip
    """The 96-channel VACE context (B, 96, n_ref + F_lat, H/8, W/8) = [inactive16 | reactive16 | mask64].

    video: optional source (B, 3, F, H, W) in [-1, 1] (default zeros: subject-to-video);
    mask: optional (B, 1, F, H, W), 1 = generate, binarised at 0.5 (default ones).
    References are prepended in time in list order (Wan/VACE); diffusers_ref_order=True reverses them
    as diffusers does. The denoised latent must have the same n_ref + F_lat frames (drop the first n_ref
    before decoding)."""
    cfg = vae.config
    s = cfg.spatial_factor
    if height % s or width % s:
        raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
    if (num_frames - 1) % cfg.temporal_factor:
        raise ValueError(f"num_frames must be {cfg.temporal_factor}*n+1, got {num_frames}")
    batch = len(references)
    device, dtype = vae.latents_mean.device, vae.dtype
    shape = (batch, 1, num_frames, height, width)
    if mask is None:
        mask = torch.ones(shape, device=device)
    elif tuple(mask.shape) != shape:
        raise ValueError(f"mask must be {shape}, got {tuple(mask.shape)}")
    mask = (mask.to(device).float() > 0.5).float()
    if video is None:
        # V = 0: inactive = reactive = VAE(zeros), encoded once for the whole batch.
        zeros = vae.encode(torch.zeros(1, 3, num_frames, height, width, device=device, dtype=dtype))
        inactive = reactive = zeros.expand(batch, -1, -1, -1, -1)
    else:
        if tuple(video.shape) != (batch, 3, num_frames, height, width):
            raise ValueError(f"video must be {(batch, 3, num_frames, height, width)}, got {tuple(video.shape)}")
        video = video.to(device=device, dtype=torch.float32)
        halves = vae.encode(torch.cat([video * (1 - mask), video * mask]))  # (2B, 16, F_lat, h, w)
        inactive, reactive = halves[:batch], halves[batch:]
    refs = encode_references(vae, references, height, width, mode="bilinear")  # (B, n_ref, 16, h, w)
    if diffusers_ref_order:
        refs = refs.flip(1)
    n_ref = refs.shape[1]
    ref_frames = torch.cat([refs, torch.zeros_like(refs)], dim=2).permute(0, 2, 1, 3, 4)  # (B, 32, n_ref, h, w)
    video_latent = torch.cat([inactive, reactive], dim=1)  # (B, 32, F_lat, h, w)
    latent = torch.cat([ref_frames, video_latent.to(ref_frames.dtype)], dim=2)
    mask64 = vace_mask_channels(mask, s, cfg.temporal_factor).to(latent.dtype)  # (B, 64, F_lat, h, w)
    mask64 = torch.cat([mask64.new_zeros(batch, mask64.shape[1], n_ref, *mask64.shape[3:]), mask64], dim=2)
    return torch.cat([latent, mask64], dim=1)


def phantom_reference_latents(vae: WanVAE, references: Sequence[Sequence[torch.Tensor]], height: int,
                              width: int) -> torch.Tensor:  # fmt: skip
    """Clean reference latents (B, 16, n_ref, H/8, W/8), in list order, to append after the video latent."""
    return encode_references(vae, references, height, width, mode="bicubic").permute(0, 2, 1, 3, 4)


def phantom_inject(latents: torch.Tensor, ref_latents: torch.Tensor) -> torch.Tensor:
    """Model input at every step: the video frames of `latents` (B, 16, F_lat + n_ref, h, w) followed by the
    clean references (zeros for Phantom's unconditional pass); the last n_ref frames are replaced."""
    n_ref = ref_latents.shape[2]
    return torch.cat([latents[:, :, : latents.shape[2] - n_ref], ref_latents.to(latents.dtype)], dim=2)
