"""Wan2.1 VAE: causal 3-D conv autoencoder, 4x temporal / 8x spatial compression, 16 latent channels.

Facts: docs/models.md#wan-vae (key map: #vae-key-layouts). Parameter names follow the original
`Wan2.1_VAE.pth` layout, so that checkpoint loads as is; the diffusers `AutoencoderKLWan` layout is
renamed on load (`diffusers_to_original_key`).

Note [streaming state]: every causal module takes a `state` dict shared by the whole pass. A
CausalConv3d stores the last frames it saw there, so feeding a video in time chunks is exactly the
same as feeding it whole; the resample time convs use it to know whether they are on the first chunk
(docs/models.md#vae-temporal-processing: the encoder's stride-2 time conv lets frame 0 through, the
decoder's upsampling time conv
sees frame 0 as zeros). Encoding and decoding are therefore one code path: `encode`/`decode` with
`chunk_frames=None` run the sequence as a single chunk (after the special first frame), and a finite
`chunk_frames` bounds activation memory (decode of 81 frames at 480x832 holds only one chunk).

Usage:
    vae = WanVAE.from_pretrained("Wan2.1_VAE.pth")          # or a diffusers vae/ folder, or a pipeline root
    z = vae.encode(video)          # (B, 3, 1+4k, H, W) in [-1, 1] -> normalised (B, 16, 1+k, H/8, W/8)
    video = vae.decode(z)          # -> (B, 3, 1+4k, H, W) in [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

_PRESETS = {
    "wan2.1": dict(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2),
    # Same topology at a few thousand parameters: tests and the CPU demo.
    "tiny": dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


@dataclass
class WanVAEConfig:
    base_dim: int = 96
    """Channels of the first encoder stage (and last decoder stage)."""
    z_dim: int = 16
    """Latent channels (the encoder emits 2*z_dim: mean and log-variance)."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per stage; 4 stages give 8x spatial compression."""
    num_res_blocks: int = 2
    """Residual blocks per encoder stage (the decoder uses one more)."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Which encoder downsamplers also halve time (the decoder mirrors it reversed)."""
    latents_mean: tuple[float, ...] = field(default=WAN_LATENTS_MEAN)
    """Per-channel mean of the raw latent; z = (mu - mean) / std."""
    latents_std: tuple[float, ...] = field(default=WAN_LATENTS_STD)
    """Per-channel std of the raw latent."""

    def __post_init__(self):
        self.dim_mult = tuple(self.dim_mult)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        self.latents_mean = tuple(float(v) for v in self.latents_mean)
        self.latents_std = tuple(float(v) for v in self.latents_std)
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(f"base_dim, z_dim, num_res_blocks must be >= 1, got {self}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs len(dim_mult)-1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need z_dim={self.z_dim} entries")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("latents_std must be positive")

    @classmethod
    def from_diffusers(cls, raw: dict) -> WanVAEConfig:
        """The config of a diffusers `AutoencoderKLWan` config.json; refuses what this Wan2.1 VAE does not build
        (Wan2.2's residual, patched VAE; attention outside the middle blocks)."""
        built = {"attn_scales": [], "is_residual": False, "patch_size": None, "in_channels": 3, "out_channels": 3,
                 "decoder_base_dim": raw.get("base_dim", 96)}  # what this VAE builds; absent or null is fine too
        unsupported = {k: raw[k] for k, value in built.items() if raw.get(k) not in (value, None)}
        if unsupported:
            raise ValueError(f"AutoencoderKLWan settings this Wan2.1 VAE does not support: {unsupported}")
        names = {"base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
                 "temporal_downsample": "temperal_downsample",  # sic: the diffusers spelling
                 "latents_mean": "latents_mean", "latents_std": "latents_std"}
        return cls(**{ours: raw[theirs] for ours, theirs in names.items() if raw.get(theirs) is not None})

    @classmethod
    def from_name(cls, name: str) -> WanVAEConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**_PRESETS[name])

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ---------------------------------------------------------------------------------------------
# building blocks (docs/models.md#vae-building-blocks)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2*pt frames in front, none behind), symmetric in space."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_context = 2 * pt  # frames of history each output needs
        self.spatial_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_context:
            history = state.get(self)
            if history is None:  # first chunk: zero history
                history = x.new_zeros(x.shape[0], x.shape[1], self.time_context, *x.shape[3:])
            x = torch.cat([history, x], dim=2)
            # clone: a view would keep this chunk's whole input alive until the next chunk
            state[self] = x[:, :, -self.time_context :].detach().clone()
        if any(self.spatial_pad):
            x = F.pad(x, self.spatial_pad)
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) * gamma (F.normalize, not an eps-RMS;
    docs/models.md#pitfall-vae-quirks)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...)
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices 0, 2, 3, 6 are the original checkpoint's `residual.N` names.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), state)
        h = conv2(F.silu(norm2(h)), state)
        return h + (self.shortcut(x, state) if self.shortcut is not None else x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3, c, h * w).transpose(-1, -2)  # (BT, 3, HW, C)
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (BT, HW, C); scale 1/sqrt(C)
        out = self.proj(out.transpose(-1, -2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class _NearestExactUp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upsampled in fp32 like the reference, then back to the working dtype.
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, optionally with the causal time conv
    (docs/models.md#vae-building-blocks, #vae-temporal-processing)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_NearestExactUp(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            # Asymmetric zero pad: right and bottom only (docs/models.md#pitfall-vae-quirks).
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)
        else:
            self.time_conv = None

    def _per_frame(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, state)
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, state)
        return x

    def _upsample_time(self, x: torch.Tensor, state: dict) -> torch.Tensor:  # (B, C, T, H, W) -> 2T (or 2T-1)
        first_chunk = self not in state
        state[self] = True
        conv_in = x
        if first_chunk:  # the time conv sees frame 0 as zeros and frame 0 passes through untouched
            conv_in = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:]], dim=2)
        y = self.time_conv(conv_in, state)  # (B, 2C, T, H, W)
        b, c2, t, h, w = y.shape
        # Channels [0:C] then [C:2C] become two consecutive output frames.
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        if first_chunk:
            y = torch.cat([x[:, :, :1], y[:, :, 2:]], dim=2)
        return y

    def _downsample_time(self, y: torch.Tensor, state: dict) -> torch.Tensor:  # (B, C, T, H, W) -> ~T/2
        # Windows (y0,y1,y2), (y2,y3,y4), ...: each chunk is prefixed by the last frame of the previous one;
        # on the first chunk frame 0 itself is emitted unchanged (it skips the time conv).
        last = state.get(self)
        if last is None:
            if y.shape[2] % 2 != 1:
                raise ValueError(f"first encoder chunk must have an odd frame count here, got {y.shape[2]}")
            head, windows = y[:, :, :1], y
        else:
            if y.shape[2] % 2 != 0:
                raise ValueError(f"later encoder chunks must have an even frame count here, got {y.shape[2]}")
            head, windows = None, torch.cat([last, y], dim=2)
        state[self] = windows[:, :, -1:].detach().clone()
        if windows.shape[2] >= 3:
            # The conv has no time padding: call the plain Conv3d to bypass the causal history.
            out = nn.Conv3d.forward(self.time_conv, windows)
            return out if head is None else torch.cat([head, out], dim=2)
        return head if head is not None else y[:, :, :0]


# ---------------------------------------------------------------------------------------------
# encoder / decoder


def _run(modules, x: torch.Tensor, state: dict) -> torch.Tensor:
    for m in modules:
        x = m(x, state)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = nn.ModuleList([ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                     ResidualBlock(dims[-1], dims[-1])])  # fmt: skip
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        x = self.conv1(x, state)
        x = _run(self.middle, _run(self.downsamples, x, state), state)
        return self.head[2](F.silu(self.head[0](x)), state)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * u for u in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])  # fmt: skip
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous stage's upsampler halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor, state: dict) -> torch.Tensor:
        x = self.conv1(z, state)
        x = _run(self.upsamples, _run(self.middle, x, state), state)
        return self.head[2](F.silu(self.head[0](x)), state)


class WanVAE(nn.Module):
    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or WanVAEConfig()
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # diffusers: quant_conv
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # diffusers: post_quant_conv
        self.decoder = Decoder3d(cfg)
        shape = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _frame_count_check(self, frames: int, what: str):
        k = self.config.temporal_factor
        if frames < 1 or (frames - 1) % k:
            raise ValueError(f"{what}: frame count must be {k}*n+1 (1, {k + 1}, {2 * k + 1}, ...), got {frames}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk_frames: int | None = 16, normalize: bool = True) -> torch.Tensor:
        """(B, 3, 1+4k, H, W) in [-1, 1] -> latent mean (B, z_dim, 1+k, H/8, W/8), normalised by default.

        Frame 0 goes alone, then chunks of `chunk_frames` (a multiple of 4; None = all remaining frames at
        once); the result does not depend on the chunking, only peak memory does. Only the mean is used
        (deterministic encode)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video (B, 3, T, H, W), got {tuple(video.shape)}")
        self._frame_count_check(video.shape[2], "encode")
        s = self.config.spatial_factor
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"encode: H and W must be multiples of {s}, got {tuple(video.shape[3:])}")
        k = self.config.temporal_factor
        step = video.shape[2] - 1 if chunk_frames is None else chunk_frames
        if chunk_frames is not None and (chunk_frames < 1 or chunk_frames % k):
            raise ValueError(f"chunk_frames must be a positive multiple of {k}, got {chunk_frames}")
        video = video.to(self.dtype)
        state: dict = {}
        outs = [self.encoder(video[:, :, :1], state)]
        for t in range(1, video.shape[2], max(step, 1)):
            outs.append(self.encoder(video[:, :, t : t + step], state))
        mu = self.conv1(torch.cat(outs, dim=2), state)[:, : self.config.z_dim]
        if normalize:
            mu = (mu - self.latents_mean.to(mu.dtype)) / self.latents_std.to(mu.dtype)
        return mu

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, chunk_frames: int | None = 1, normalized: bool = True,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Latent (B, z_dim, L, h, w) -> video (B, 3, 1+4(L-1), 8h, 8w) clamped to [-1, 1].

        Latent frames are decoded `chunk_frames` at a time (None = all at once) with the causal cache, so
        peak activation memory is that of one chunk; each chunk is written into `out` (allocated here,
        in the VAE dtype, unless given)."""
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected latent (B, {self.config.z_dim}, L, h, w), got {tuple(z.shape)}")
        z = z.to(self.dtype)
        if normalized:
            z = z * self.latents_std.to(z.dtype) + self.latents_mean.to(z.dtype)
        b, _, frames, h, w = z.shape
        k, s = self.config.temporal_factor, self.config.spatial_factor
        shape = (b, 3, 1 + k * (frames - 1), h * s, w * s)
        if out is None:
            out = torch.empty(shape, dtype=z.dtype, device=z.device)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        state: dict = {}
        step = frames if chunk_frames is None else chunk_frames
        if step < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        written = 0
        for t in range(0, frames, step):
            x = self.decoder(self.conv2(z[:, :, t : t + step], state), state)
            out[:, :, written : written + x.shape[2]] = x.clamp_(-1.0, 1.0)
            written += x.shape[2]
        assert written == shape[2], (written, shape)
        return out

    def decode_frames(self, z: torch.Tensor, *, chunk_frames: int | None = 1, normalized: bool = True) -> torch.Tensor:
        """Latent -> uint8 frames (B, T, H, W, 3), the layout of the reward interface and `media.write_video`."""
        video = self.decode(z, chunk_frames=chunk_frames, normalized=normalized)  # (B, 3, T, H, W)
        frames = video.float().add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
        return frames.permute(0, 2, 3, 4, 1).contiguous()

    # -- weights ---------------------------------------------------------------------------------

    def load_state_dict_any(self, state_dict: dict[str, torch.Tensor], *, source: str = "state dict"):
        """Load original (`Wan2.1_VAE.pth`) or diffusers (`AutoencoderKLWan`) keys, strictly."""
        if any(k.startswith(("encoder.conv_in.", "quant_conv.")) for k in state_dict):
            state_dict = {diffusers_to_original_key(k, self.config): v for k, v in state_dict.items()}
        from idgrpo.models.weights import check_keys

        check_keys({k: tuple(v.shape) for k, v in self.state_dict().items()},
                   {k: tuple(v.shape) for k, v in state_dict.items()}, source=source,
                   target=f"WanVAE({self.config})", hint="the model's shapes come from its config: a diffusers vae/ "
                   "folder carries it in config.json; for a bare .pth of another shape pass config=WanVAEConfig(...)")
        self.load_state_dict(state_dict, strict=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: WanVAEConfig | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WanVAE:  # fmt: skip
        """Load `Wan2.1_VAE.pth` (weights_only) or the original Wan2.1 folder holding it, a .safetensors file, a
        diffusers `vae/` folder (its config.json, latents_mean/latents_std included, gives the config unless
        `config` is passed) or a diffusers pipeline root. `dtype` None: the checkpoint's own
        (docs/data-and-checkpoints.md)."""
        from idgrpo.models.weights import WeightFiles, locate

        source = locate(path, "vae", what="Wan VAE", is_config=is_diffusers_vae_config, own_file="*VAE*.pth")
        if config is None:
            config = source.parse_config(WanVAEConfig.from_diffusers) if source.config else WanVAEConfig()
        tensors = WeightFiles(source.files)
        model = cls(config)
        model.load_state_dict_any(dict(tensors.items()), source=str(source.path))
        return model.to(device=device, dtype=tensors.default_dtype() if dtype is None else dtype).eval()


def is_diffusers_vae_config(raw: dict) -> bool:
    name = raw.get("_class_name")
    return name == "AutoencoderKLWan" if name else "base_dim" in raw


def diffusers_to_original_key(key: str, config: WanVAEConfig | None = None) -> str:
    """Rename one diffusers `AutoencoderKLWan` key to the original Wan layout (docs/models.md#vae-key-layouts)."""
    cfg = config or WanVAEConfig()
    residual = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                "conv_shortcut": "shortcut"}  # fmt: skip

    def inner(parts: list[str]) -> list[str]:
        if parts and parts[0] in residual:
            return residual[parts[0]].split(".") + parts[1:]
        return parts

    p = key.split(".")
    if p[0] == "quant_conv":
        return ".".join(["conv1", *p[1:]])
    if p[0] == "post_quant_conv":
        return ".".join(["conv2", *p[1:]])
    side, rest = p[0], p[1:]
    if side not in ("encoder", "decoder"):
        return key
    head = {"conv_in": ["conv1"], "norm_out": ["head", "0"], "conv_out": ["head", "2"]}
    if rest[0] in head:
        return ".".join([side, *head[rest[0]], *rest[1:]])
    if rest[0] == "down_blocks":
        return ".".join([side, "downsamples", rest[1], *inner(rest[2:])])
    if rest[0] == "mid_block":
        index = {"resnets": {"0": "0", "1": "2"}, "attentions": {"0": "1"}}[rest[1]][rest[2]]
        return ".".join([side, "middle", index, *inner(rest[3:])])
    if rest[0] == "up_blocks":
        per_block = cfg.num_res_blocks + 2  # resnets + one upsampler
        block = int(rest[1])
        if rest[2] == "resnets":
            flat = block * per_block + int(rest[3])
        else:  # upsamplers.0
            flat = block * per_block + cfg.num_res_blocks + 1
        return ".".join([side, "upsamples", str(flat), *inner(rest[4:])])
    return key


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames for a 1 + 4k frame video."""
    return (num_frames - 1) // temporal_factor + 1
