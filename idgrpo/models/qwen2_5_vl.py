"""Qwen2.5-VL (vision tower + language model) in plain PyTorch on `idgrpo.kernels`: the reward backbone.

    model = load_qwen2_5_vl("Qwen2.5-VL-3B-Instruct", dtype=torch.bfloat16, device="cuda")
    batch = processor(...)                                     # idgrpo.models.qwen_processor
    hidden = model(batch.input_ids, batch.position_ids, lengths=batch.lengths,
                   pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                   pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw)
    logits = model.lm_logits(hidden)                          # (B, L, vocab); the reward reads `hidden`

Facts: docs/models.md#qwen-reward-backbone. Vision: 14-px patches over pairs of frames (Conv3d without bias, run as
one matmul), 2-D rotate-half RoPE, windowed attention (112 px windows = 4x4 merged tokens) except at
`fullatt_block_indexes`, where attention spans one temporal slice of one image/video (never across
time); a 2x2 patch merger to the LLM width. All vision attention is one packed varlen call
(`cu_seqlens`). Language model: GQA causal attention with right padding through `k_lens`, M-RoPE
(sections [16, 24, 24] over the 64 frequency slots), RMSNorm, SwiGLU.

Module names equal the on-disk checkpoint names (= transformers <= 4.51 in-memory names):
`visual.*`, `model.*` (the LLM), `lm_head.weight` (absent when tied). transformers >= 4.52 names
(`model.visual.*`, `model.language_model.*`) are mapped on load.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from idgrpo.kernels.attention import attention
from idgrpo.kernels.norm import rms_norm
from idgrpo.kernels.rope import apply_rope, mrope_table
from idgrpo.models.weights import CheckpointError, check_keys, expected_shapes, materialize_, refuse_nonfinite


@dataclass
class QwenVisionConfig:
    depth: int = 32
    """Vision transformer blocks."""
    hidden_size: int = 1280
    """Vision token width."""
    num_heads: int = 16
    """Vision attention heads (head_dim = hidden_size / num_heads, must be a multiple of 4)."""
    intermediate_size: int = 3420
    """Vision SwiGLU hidden width."""
    out_hidden_size: int = 2048
    """Merger output width (= the LLM hidden size)."""
    patch_size: int = 14
    """Spatial patch side in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch (an image is repeated to this many frames)."""
    spatial_merge_size: int = 2
    """The merger concatenates spatial_merge_size^2 neighbouring patches into one LLM token."""
    window_size: int = 112
    """Window side in pixels for windowed attention (a multiple of patch_size * spatial_merge_size)."""
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    """Blocks that attend over a whole temporal slice instead of a window."""
    tokens_per_second: int = 2
    """Temporal M-RoPE positions per second of video."""
    in_channels: int = 3
    """Image channels."""
    rope_theta: float = 10000.0
    """Base of the 2-D vision RoPE."""

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a "
                             f"head_dim that is a multiple of 4 (2-D rotate-half RoPE)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} must be a multiple of patch_size * spatial_merge_size "
                             f"= {self.patch_size * self.spatial_merge_size}")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} must lie in [0, {self.depth})")
        if min(self.depth, self.patch_size, self.temporal_patch_size, self.spatial_merge_size, self.in_channels) < 1:
            raise ValueError("depth, patch sizes, spatial_merge_size and in_channels must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: (C, temporal_patch, patch, patch) flattened."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class Qwen2_5_VLConfig:
    vocab_size: int = 151936
    """Embedding rows (151,666 in the resized Identity-GRPO reward checkpoint)."""
    hidden_size: int = 2048
    """LLM width."""
    num_hidden_layers: int = 36
    """LLM decoder layers."""
    num_attention_heads: int = 16
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 11008
    """LLM SwiGLU hidden width."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon of the LLM."""
    rope_theta: float = 1_000_000.0
    """M-RoPE base."""
    mrope_section: tuple[int, ...] = (16, 24, 24)
    """Frequency slots per (t, h, w) position row; sums to head_dim / 2."""
    tie_word_embeddings: bool = True
    """lm_head shares embed_tokens' weight (and may be absent from the checkpoint)."""
    image_token_id: int = 151655
    """<|image_pad|>: replaced by image features."""
    video_token_id: int = 151656
    """<|video_pad|>: replaced by video features."""
    vision_start_token_id: int = 151652
    """<|vision_start|>."""
    vision_end_token_id: int = 151653
    """<|vision_end|>."""
    pad_token_id: int = 151643
    """Right-padding token (<|endoftext|>)."""
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    """Vision tower."""

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = QwenVisionConfig(**self.vision)
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(f"vision.out_hidden_size {self.vision.out_hidden_size} must equal hidden_size "
                             f"{self.hidden_size}")
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id,
               self.pad_token_id)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"special token ids {ids} must lie in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def from_name(name: str) -> Qwen2_5_VLConfig:
        presets = {
            # CPU tests: head_dim 16 = 2 * (2 + 3 + 3); vision head_dim 16; 56-px windows (2x2 merged tokens).
            "tiny": lambda: Qwen2_5_VLConfig(
                vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, mrope_section=(2, 3, 3), image_token_id=300, video_token_id=301,
                vision_start_token_id=302, vision_end_token_id=303, pad_token_id=0,
                vision=QwenVisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                                        window_size=56, fullatt_block_indexes=(1, 3))),
            # Qwen/Qwen2.5-VL-3B-Instruct (docs/models.md#qwen-configuration).
            "3b": lambda: Qwen2_5_VLConfig(),
        }
        if name not in presets:
            raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; choose from {sorted(presets)}")
        return presets[name]()

    @staticmethod
    def from_hf(raw: dict) -> Qwen2_5_VLConfig:
        """From a HF `config.json`: the flat transformers <= 4.51 layout (LLM fields at the top) or the
        nested >= 4.52 layout (`text_config`)."""
        text = {**raw, **raw.get("text_config", {})}
        vision = raw.get("vision_config", {})
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        ours = {f.name for f in fields(QwenVisionConfig)}
        vision_kwargs = {k: v for k, v in vision.items() if k in ours}
        if "in_chans" in vision:  # the name in the published Qwen2.5-VL config.json
            vision_kwargs.setdefault("in_channels", vision["in_chans"])
        if "theta" in vision:
            vision_kwargs["rope_theta"] = vision["theta"]
        kwargs = {k: text[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "intermediate_size", "rms_norm_eps") if k in text}
        theta = text.get("rope_theta", rope.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if "mrope_section" in rope:
            kwargs["mrope_section"] = tuple(rope["mrope_section"])
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if key in raw:
                kwargs[key] = raw[key]
        pad = text.get("pad_token_id", raw.get("pad_token_id"))
        if pad is None:
            pad = text.get("bos_token_id", 151643)
        kwargs["pad_token_id"] = pad
        kwargs["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
        return Qwen2_5_VLConfig(vision=QwenVisionConfig(**vision_kwargs), **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- attention


def sdpa_attention(q, k, v, *, causal=False, k_lens=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                   max_seqlen_k=None):
    """`idgrpo.kernels.attention.attention` semantics on torch SDPA, the way transformers runs Qwen2.5-VL with
    attn_implementation="sdpa" (varlen: one call per sequence, reading cu_seqlens on the host; dense: a boolean
    causal + padding mask). The baseline of bench/reward.py; select it with `Qwen2_5_VL.set_attention_impl("sdpa")`."""
    if cu_seqlens_q is not None:
        starts = cu_seqlens_q.tolist()
        outs = [sdpa_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(starts[:-1], starts[1:])]
        return torch.cat(outs)  # (T, H, D)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    mask = None
    if causal or k_lens is not None:
        keys = torch.arange(Lk, device=q.device)
        mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask & (keys[None, :] <= torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq))
        if k_lens is not None:
            mask = mask & (keys.view(1, 1, 1, Lk) < k_lens.view(B, 1, 1, 1))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=k.shape[2] != H)
    return out.transpose(1, 2)  # (B, Lq, H, D)


ATTENTION_IMPLS = {"idgrpo": attention, "sdpa": sdpa_attention}


# ----------------------------------------------------------------------------- vision tower


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.attention_fn = attention

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.heads, -1).unbind(1)  # each (T, H, D)
        q = apply_rope(q.unsqueeze(0), cos, sin, interleaved=False)[0]
        k = apply_rope(k.unsqueeze(0), cos, sin, interleaved=False)[0]
        out = self.attention_fn(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)  # (T, H, D)
        return self.proj(out.reshape(tokens, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class VisionBlock(nn.Module):
    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size)
        self.norm2 = RMSNorm(config.hidden_size)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        self.group = config.spatial_merge_size ** 2
        width = config.hidden_size * self.group
        self.ln_q = RMSNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.out_hidden_size))

    def forward(self, x):  # (N, C) with each merge group's patches contiguous
        return self.mlp(self.ln_q(x).view(x.shape[0] // self.group, -1))  # (N / group, out)


@dataclass(frozen=True)
class VisionLayout:
    """Host-computed index tensors for one set of grids (Note [vision layout on the host])."""

    window_index: torch.Tensor
    """(N / merge^2,) merge-group order that makes every window contiguous."""
    restore_index: torch.Tensor
    """argsort(window_index): back to the processor's order after the merger."""
    positions: torch.Tensor
    """(N, 2) (h, w) patch coordinates in window order."""
    cu_window_seqlens: torch.Tensor
    """int32 window boundaries (empty windows dropped)."""
    cu_slice_seqlens: torch.Tensor
    """int32 boundaries of every temporal slice of every image/video (full-attention blocks)."""
    max_window: int
    max_slice: int


# Note [vision layout on the host]: grids come from the processor on the host, so the window
# permutation and the cu_seqlens are built there with Python loops (as the reference does) and moved
# to the device once: no device value is read back, and identical grids reuse the cached layout.
@functools.lru_cache(maxsize=64)
def vision_layout(grids: tuple[tuple[int, int, int], ...], spatial_merge_size: int, window_size: int,
                  patch_size: int) -> VisionLayout:
    merge = spatial_merge_size
    group = merge * merge
    window = window_size // merge // patch_size  # merged tokens per window side
    window_index, cu_window, positions, slice_lens = [], [0], [], []
    offset = 0
    for t, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) must have h and w divisible by {merge}")
        mh, mw = h // merge, w // merge
        index = torch.arange(t * mh * mw).view(t, mh, mw)
        pad_h, pad_w = -mh % window, -mw % window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (mh + pad_h) // window, (mw + pad_w) // window
        padded = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
        valid = padded >= 0
        window_index.append(padded[valid] + offset)
        for n in valid.sum(-1).flatten().tolist():
            if n:
                cu_window.append(cu_window[-1] + n * group)
        # (h, w) per patch in the processor's (h/m, w/m, m, m) order, repeated per temporal slice.
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        hh = hh.view(mh, merge, mw, merge).transpose(1, 2).flatten()
        ww = ww.view(mh, merge, mw, merge).transpose(1, 2).flatten()
        positions.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
        slice_lens += [h * w] * t
        offset += t * mh * mw
    window_index = torch.cat(window_index)
    positions = torch.cat(positions).view(-1, group, 2)[window_index].view(-1, 2)
    cu_window = torch.tensor(cu_window, dtype=torch.int32)
    cu_slice = torch.tensor([0, *torch.tensor(slice_lens).cumsum(0).tolist()], dtype=torch.int32)
    return VisionLayout(window_index, torch.argsort(window_index), positions, cu_window, cu_slice,
                        max_window=int((cu_window[1:] - cu_window[:-1]).max()), max_slice=max(slice_lens))


def _grid_tuple(grid_thw) -> tuple[tuple[int, int, int], ...]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


class VisionTower(nn.Module):
    def __init__(self, config: QwenVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Module()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.patch_embed.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """pixel_values (N, C*tp*p*p) in the processor's patch order, grid_thw (n, 3) host ints (CPU tensor
        or list) -> merged tokens (N / merge^2, out_hidden_size) in the same order."""
        c = self.config
        layout = vision_layout(_grid_tuple(grid_thw), c.spatial_merge_size, c.window_size, c.patch_size)
        device = pixel_values.device
        group = c.spatial_merge_size ** 2
        weight = self.patch_embed.proj.weight
        # A kernel = stride Conv3d over one patch is a dot product with the flattened kernel.
        x = F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))  # (N, C)
        n = x.shape[0]
        window_index = layout.window_index.to(device, non_blocking=True)
        x = x.view(n // group, group, -1)[window_index].view(n, -1)  # window order

        rotary_dim = c.head_dim // 2  # half the head for h, half for w: rotary_dim / 2 frequencies each
        slots = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / c.rope_theta ** (slots / rotary_dim)
        angles = layout.positions.to(device, torch.float32)[..., None] * inv_freq  # (N, 2, rotary_dim / 2)
        angles = angles.flatten(1)  # (N, head_dim / 2): h frequencies then w frequencies
        cos, sin = angles.cos(), angles.sin()
        cu_window = layout.cu_window_seqlens.to(device, non_blocking=True)
        cu_slice = layout.cu_slice_seqlens.to(device, non_blocking=True)
        for i, block in enumerate(self.blocks):
            full = i in c.fullatt_block_indexes
            x = block(x, cos, sin, cu_slice if full else cu_window, layout.max_slice if full else layout.max_window)
        merged = self.merger(x)  # (N / group, out)
        return merged[layout.restore_index.to(device, non_blocking=True)]


# ----------------------------------------------------------------------------- language model


class TextAttention(nn.Module):
    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.attention_fn = attention

    def forward(self, x, cos, sin, lengths):
        B, L, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, L, self.heads, self.head_dim), cos, sin, interleaved=False)
        k = apply_rope(self.k_proj(x).view(B, L, self.kv_heads, self.head_dim), cos, sin, interleaved=False)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim)
        out = self.attention_fn(q, k, v, causal=True, k_lens=lengths)  # (B, L, H, D)
        return self.o_proj(out.reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TextAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x, cos, sin, lengths):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2_5_VL(nn.Module):
    """Vision tower (`.visual`) + language model (`.model`); `.visual.blocks` and `.model.layers` are the
    FSDP units. forward returns the final-normed hidden states; `lm_logits` applies the LM head."""

    def __init__(self, config: Qwen2_5_VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.model = TextModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image/video pad tokens replaced, in order, by the vision features.
        The processor guarantees one pad token per merged vision token (not re-checked here: that
        would read device values back)."""
        x = self.model.embed_tokens(input_ids)  # (B, L, C)
        for pixels, grids, token in ((pixel_values, image_grid_thw, self.config.image_token_id),
                                     (pixel_values_videos, video_grid_thw, self.config.video_token_id)):
            if pixels is None:
                continue
            features = self.visual(pixels, grids).to(x.dtype)  # (n_tokens, C)
            x = x.masked_scatter((input_ids == token).unsqueeze(-1), features)
        return x

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                lengths: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw=None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw=None) -> torch.Tensor:
        """input_ids (B, L) right-padded; position_ids (3, B, L) M-RoPE positions (required with vision
        inputs; text-only defaults to 0..L-1); lengths (B,) valid tokens per row (None: all). Returns the
        hidden states after the final norm (B, L, hidden)."""
        B, L = input_ids.shape
        if position_ids is None:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("position_ids are required with image/video inputs (see qwen_processor.rope_index)")
            position_ids = torch.arange(L, device=input_ids.device).view(1, 1, L).expand(3, B, L)
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        cos, sin = mrope_table(position_ids, self.config.head_dim, self.config.mrope_section,
                               self.config.rope_theta)  # (B, L, D/2) fp32
        for layer in self.model.layers:
            x = layer(x, cos, sin, lengths)
        return self.model.norm(x)

    def set_attention_impl(self, impl: str) -> None:
        """Route every attention through "idgrpo" (the project's kernel, default) or "sdpa" (torch SDPA as
        transformers runs it: the benchmarks' baseline) from now on."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}: expected one of {tuple(ATTENTION_IMPLS)}")
        for module in self.modules():
            if isinstance(module, (VisionAttention, TextAttention)):
                module.attention_fn = ATTENTION_IMPLS[impl]


    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding matrix (an Embedding, which LoRA does not wrap)
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)  # the module call, so a LoRA adapter on lm_head acts


# ----------------------------------------------------------------------------- checkpoints


def to_checkpoint_key(key: str) -> str:
    """transformers >= 4.52 in-memory names -> checkpoint (<= 4.51) names; other keys unchanged."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def to_new_hf_key(key: str) -> str:
    """Checkpoint names -> transformers >= 4.52 names (for tests and exports); names already new are unchanged."""
    if key.startswith(("model.language_model.", "model.visual.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def _safetensors_files(directory: Path) -> list[Path]:
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def read_checkpoint_shapes(directory: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """checkpoint name -> (file, key in the file, shape), for either key naming."""
    from safetensors import safe_open

    files = _safetensors_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights (or model.safetensors.index.json)")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = to_checkpoint_key(key)
                if name in where:
                    raise CheckpointError(f"{directory}: tensor {name!r} appears twice ({where[name][0].name}, "
                                          f"{file.name})")
                where[name] = (file, key, tuple(f.get_slice(key).get_shape()))
    return where


def load_qwen2_5_vl(path: str | Path, config: Qwen2_5_VLConfig | str | None = None, *,
                    dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                    extra_keys: tuple[str, ...] = ()) -> Qwen2_5_VL:
    """Build Qwen2.5-VL on the meta device and fill it from a HF-layout directory (config.json +
    safetensors, either key naming). A missing `lm_head.weight` is fine when the embeddings are tied; a
    present one is ignored then. `extra_keys`: checkpoint tensors the caller reads itself (e.g. rm_head)
    and that may be present without error. A tensor holding a NaN/Inf is refused (CheckpointError naming the file
    and the tensor)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a HF Qwen2.5-VL model directory)")
    if config is None:
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing; pass config= (a Qwen2_5_VLConfig or preset name)")
        config = Qwen2_5_VLConfig.from_hf(json.loads(config_file.read_text()))
    elif isinstance(config, str):
        config = Qwen2_5_VLConfig.from_name(config)
    where = read_checkpoint_shapes(directory)
    with torch.device("meta"):
        model = Qwen2_5_VL(config)
    found = {k: s for k, (_, _, s) in where.items() if k not in extra_keys}
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    vocab = found.get("model.embed_tokens.weight", (None,))[0]
    hint = (f"the checkpoint's vocabulary has {vocab} rows, the config {config.vocab_size}"
            if vocab is not None and vocab != config.vocab_size else "")
    check_keys(expected_shapes(model), found, source=f"checkpoint {directory} ({len(found)} tensors)",
               target=f"Qwen2_5_VL(hidden={config.hidden_size}, layers={config.num_hidden_layers}, "
                      f"vision depth={config.vision.depth})", hint=hint)
    materialize_(model, _iter_tensors(where, set(found)), dtype=dtype, device=device)
    return model


def _iter_tensors(where, names):
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name][0], []).append(name)
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in group:
                yield name, refuse_nonfinite(file, where[name][1], f.get_tensor(where[name][1]))


def save_qwen2_5_vl(model: Qwen2_5_VL, directory: str | Path, *, naming: str = "checkpoint") -> Path:
    """Write config.json (flat <= 4.51 layout) + model.safetensors under checkpoint names or, with
    naming="new", transformers >= 4.52 names. LoRA adapters are not included."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rename = to_new_hf_key if naming == "new" else (lambda k: k)
    state = {rename(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" not in k}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2) + "\n")
    return directory


def hf_config_dict(config: Qwen2_5_VLConfig) -> dict:
    """The flat (transformers 4.51) config.json layout of the published checkpoints."""
    v = config.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(config.mrope_section)},
        "tie_word_embeddings": config.tie_word_embeddings, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id, "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id, "pad_token_id": config.pad_token_id,
        "max_position_embeddings": 128000, "use_sliding_window": False,
        "vision_config": {
            "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads, "hidden_act": "silu",
            "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second,
            "in_channels": v.in_channels,
        },
    }


__all__ = ["ATTENTION_IMPLS", "Qwen2_5_VL", "Qwen2_5_VLConfig", "QwenVisionConfig", "VisionTower",
           "hf_config_dict", "load_qwen2_5_vl", "save_qwen2_5_vl", "sdpa_attention", "to_checkpoint_key",
           "to_new_hf_key", "vision_layout"]
