"""Wan2.1 diffusion transformer (T2V 1.3B / 14B), its VACE variant and Phantom's reference frames.

One implementation in plain PyTorch on top of `idgrpo.kernels`. Facts: docs/models.md
(#dit-forward-pass, #vace, #phantom, #parameterisation-and-timesteps for the velocity and timestep, #pitfalls).

    from idgrpo.models.wan_dit import WanConfig, WanDiT
    model = WanDiT(WanConfig.from_name("tiny"))
    v = model(latents, timestep, context)           # (B, 16, F, H, W) fp32 velocity
    v = model.cfg_forward(latents, timestep, context, neg_context, guidance=4.5)   # one batched call

Module and parameter names follow diffusers (`blocks.{i}.attn1.to_q`, `condition_embedder.*`,
`vace_blocks.{j}.proj_out`, ...), so a diffusers checkpoint or a PEFT LoRA written against diffusers
loads by name; `idgrpo.models.weights` renames the original Wan2.1 keys.

Precision (docs/models.md#dit-numerics-and-precision): parameters may be bf16 (the original's
`param_dtype`); the time embedding,
the modulation tables, all norms, the gated residual adds, the residual stream itself and the head
run in fp32, as the original does under autocast. Matmuls run in the parameters' dtype.

The FSDP units are the entries of `model.blocks` and `model.vace_blocks`; their forwards take only
tensors, so per-block activation checkpointing wraps them as they are.

`model.set_sequence_parallel(layout.sp)` splits the token sequence over a group of ranks (Ulysses; the same
full inputs and outputs on every rank of the group): docs/sequence-parallel.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from idgrpo.kernels.attention import attention
from idgrpo.kernels.norm import gated_residual, layer_norm, layer_norm_modulate, rms_norm
from idgrpo.kernels.rope import apply_rope, wan_rope_table
from idgrpo.models.lora import LoRALinear

if TYPE_CHECKING:
    from idgrpo.engine.sequence_parallel import SequenceParallel

ATTENTION_IMPLS = ("idgrpo", "sdpa")
REFERENCE_MODES = ("none", "vace", "phantom")


@dataclass
class WanConfig:
    """Shape of a Wan2.1 DiT. Field names follow the original `WanModel` config."""

    dim: int = 1536
    """Model width (num_heads x head_dim)."""
    ffn_dim: int = 8960
    """Hidden width of the feed-forward network."""
    num_heads: int = 12
    """Attention heads; head_dim = dim / num_heads must be even and >= 6 (3-D RoPE split)."""
    num_layers: int = 30
    """Main transformer blocks."""
    in_dim: int = 16
    """Latent channels in (16; I2V's 36 is not supported)."""
    out_dim: int = 16
    """Velocity channels out."""
    text_dim: int = 4096
    """Width of the text encoder output (umT5-XXL: 4096)."""
    text_len: int = 512
    """Text rows the cross-attention always sees: shorter contexts are zero-padded to it
    (docs/models.md#pitfall-text-padding-is-attended)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch (t, h, w) of the Conv3d patch embedding."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    vace_layers: tuple[int, ...] = ()
    """Main blocks after which a VACE hint is added (empty: no VACE). Sorted, must contain 0."""
    vace_in_dim: int = 96
    """Channels of the VACE context (16 inactive + 16 reactive + 64 mask)."""
    reference_mode: str = "none"
    """How reference images enter: "none" (T2V), "vace" (context blocks), "phantom" (extra latent frames)."""
    attention_impl: str = "idgrpo"
    """"idgrpo" (idgrpo.kernels.attention: Triton on CUDA) or "sdpa" (torch SDPA, the benchmark baseline)."""

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.vace_layers = tuple(int(i) for i in self.vace_layers)
        if self.dim <= 0 or self.num_heads <= 0 or self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a positive multiple of num_heads={self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim={head_dim} must be even and >= 6 for the 3-D RoPE split")
        for name in ("ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "text_len", "vace_in_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.freq_dim <= 0 or self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be positive and even")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"patch_size={self.patch_size} must be three positive ints")
        if self.vace_layers:
            v = self.vace_layers
            if list(v) != sorted(set(v)) or v[0] != 0 or v[-1] >= self.num_layers:
                raise ValueError(f"vace_layers={v} must be sorted, unique, contain 0 and be < num_layers="
                                 f"{self.num_layers}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode={self.reference_mode!r}: expected one of {REFERENCE_MODES}")
        if (self.reference_mode == "vace") != bool(self.vace_layers):
            raise ValueError(f"reference_mode={self.reference_mode!r} with vace_layers={self.vace_layers}: "
                             "'vace' needs vace_layers and vace_layers need 'vace'")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> WanConfig:
        """Named preset (`WanConfig.PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown Wan preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_T2V_1_3B = WanConfig()
_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# Tiny shapes for tests and demos: the same graph, text padded to the real 512 rows.
_TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)
PRESETS: dict[str, WanConfig] = {
    "tiny": _TINY,
    "tiny-vace": dataclasses.replace(_TINY, num_layers=4, vace_layers=(0, 1, 3), reference_mode="vace"),
    "t2v-1.3b": _T2V_1_3B,
    "t2v-14b": _T2V_14B,
    "vace-1.3b": dataclasses.replace(_T2V_1_3B, vace_layers=tuple(range(0, 30, 2)), reference_mode="vace"),
    # Wan2.1-VACE-14B: a hint after every 5th block (diffusers' WanVACETransformer3DModel config, vace_layers).
    "vace-14b": dataclasses.replace(_T2V_14B, vace_layers=tuple(range(0, 40, 5)), reference_mode="vace"),
    # Phantom-Wan-1.3B / -14B are the plain T2V networks; their references are extra latent frames
    # (docs/models.md#phantom). The 14B checkpoint is sharded safetensors with original Wan key names.
    "phantom-1.3b": dataclasses.replace(_T2V_1_3B, reference_mode="phantom"),
    "phantom-14b": dataclasses.replace(_T2V_14B, reference_mode="phantom"),
}


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight over the full width (Wan's q/k norm spans all heads,
    docs/models.md#pitfall-qk-rmsnorm-spans-all-heads)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias before the cross-attention (original `norm3`, diffusers `norm2`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
            k_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(D). q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D);
    keys at and beyond k_lens (B,) (when given) are masked."""
    if impl == "sdpa":
        mask = None
        if k_lens is not None:
            keys = torch.arange(k.shape[1], device=k.device)
            mask = (keys[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)
    return attention(q, k, v, k_lens=k_lens)


class WanAttention(nn.Module):
    """Self- or cross-attention: q/k/v/o with bias, full-width RMSNorm on q and k, RoPE on self-attention.

    With `sequence_parallel` set (self-attention only, by `WanDiT.set_sequence_parallel`), x holds this rank's
    chunk of the tokens and the rope tables that chunk's rows; all-to-alls around the kernel give it every
    token of H / size heads (docs/sequence-parallel.md)."""

    def __init__(self, dim: int, num_heads: int, eps: float, attention_impl: str = "idgrpo"):
        super().__init__()
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0: diffusers' `to_out.0`
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.sequence_parallel: SequenceParallel | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                k_lens: torch.Tensor | None = None) -> torch.Tensor:
        B, L, C = x.shape  # (B, L, C)
        source = x if context is None else context  # (B, Lk, C)
        heads = (self.num_heads, C // self.num_heads)
        q = self.norm_q(self.to_q(x)).unflatten(-1, heads)  # (B, L, H, D)
        k = self.norm_k(self.to_k(source)).unflatten(-1, heads)  # (B, Lk, H, D)
        v = self.to_v(source).unflatten(-1, heads)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        sp = self.sequence_parallel
        if sp is not None:
            q, k, v = (sp.sequence_to_heads(t) for t in (q, k, v))  # (B, L * size, H / size, D)
        out = _attend(q, k, v, self.attention_impl, k_lens)
        if sp is not None:
            out = sp.heads_to_sequence(out)  # (B, L, H, D)
        return self.to_out[0](out.reshape(B, L, C))


class _GeluProjection(nn.Module):
    """Linear then GELU(tanh); a module of its own so the key reads `ffn.net.0.proj` as in diffusers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Note: diffusers has a Dropout at index 1; a ModuleDict keeps the key indices without it.
        self.net = nn.ModuleDict({"0": _GeluProjection(dim, hidden), "2": nn.Linear(hidden, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class WanBlock(nn.Module):
    """One Wan block (docs/models.md#transformer-block): modulated self-attention, plain cross-attention,
    modulated FFN."""

    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.attn1 = WanAttention(dim, config.num_heads, config.eps, config.attention_impl)
        self.norm2 = AffineLayerNorm(dim, config.eps)
        self.attn2 = WanAttention(dim, config.num_heads, config.eps, config.attention_impl)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor, k_lens: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C) fp32 residual stream; e0 (B, 6, C) fp32; context (B, Lc, C) embedded text;
        k_lens (B,) self-attention keys at and beyond it are padding (sequence parallelism)."""
        dtype = self.attn1.to_q.weight.dtype  # matmul dtype; everything around it stays fp32
        modulation = self.scale_shift_table.float() + e0  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.unbind(1)  # (B, C) each
        h = layer_norm_modulate(x, shift_msa, scale_msa, self.eps, out_dtype=dtype)
        x = gated_residual(x, self.attn1(h, rope=(rope_cos, rope_sin), k_lens=k_lens), gate_msa)
        h = self.norm2(x).to(dtype)
        x = x + self.attn2(h, context.to(dtype)).to(x.dtype)  # no gate, no modulation
        h = layer_norm_modulate(x, shift_ffn, scale_ffn, self.eps, out_dtype=dtype)
        return gated_residual(x, self.ffn(h), gate_ffn)


class VaceBlock(WanBlock):
    """A VACE context block (docs/models.md#vace-architecture): a Wan block on the context stream, plus
    `proj_in` (block 0 only, adds the patch-embedded video tokens) and `proj_out` (the hint for the main stack)."""

    def __init__(self, config: WanConfig, first: bool):
        super().__init__(config)
        self.proj_in = nn.Linear(config.dim, config.dim) if first else None
        self.proj_out = nn.Linear(config.dim, config.dim)

    def forward(self, c: torch.Tensor, x0: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                k_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """c (B, L, C) context stream; x0 (B, L, C) patch-embedded video tokens -> (next c, hint)."""
        if self.proj_in is not None:
            c = self.proj_in(c.to(self.proj_in.weight.dtype)).float() + x0
        c = super().forward(c, e0, context, rope_cos, rope_sin, k_lens)
        return c, self.proj_out(c.to(self.proj_out.weight.dtype))


class _TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class _TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class ConditionEmbedder(nn.Module):
    """Time embedding (fp32, as the original) and the text projection (diffusers `condition_embedder`)."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.freq_dim = config.freq_dim
        self.time_embedder = _TimestepEmbedder(config.freq_dim, config.dim)
        self.time_proj = nn.Linear(config.dim, 6 * config.dim)
        self.text_embedder = _TextEmbedder(config.text_dim, config.dim)

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) in [0, 1000) -> e (B, C) and e0 (B, 6, C), both fp32."""
        half = self.freq_dim // 2
        # Sinusoid in float64, cos half first, omega_k = 10000^(-k/half)
        # (docs/models.md#pitfall-integer-timestep-float-sigma).
        omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
        angle = timestep.to(torch.float64)[:, None] * omega  # (B, half)
        sinusoid = torch.cat([angle.cos(), angle.sin()], dim=-1).float()  # (B, freq_dim)
        te, tp = self.time_embedder, self.time_proj
        e = _linear_fp32(F.silu(_linear_fp32(sinusoid, te.linear_1)), te.linear_2)  # (B, C)
        e0 = _linear_fp32(F.silu(e), tp).unflatten(1, (6, -1))  # (B, 6, C)
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, text_len, text_dim), already zero-padded -> (B, text_len, C) in the weights' dtype."""
        lin1, lin2 = self.text_embedder.linear_1, self.text_embedder.linear_2
        return lin2(F.gelu(lin1(context.to(lin1.weight.dtype)), approximate="tanh"))


def _linear_fp32(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever its parameters' dtype (the original's fp32 autocast regions); a LoRA
    adapter on it adds its term in fp32 too, so these layers act the same unmerged as merged (docs/lora.md)."""
    bias = None if linear.bias is None else linear.bias.float()
    out = F.linear(x.float(), linear.weight.float(), bias)
    delta = linear.adapter_output(x, torch.float32) if isinstance(linear, LoRALinear) else None
    return out if delta is None else out + delta


# ----------------------------------------------------------------------------- the model


class WanDiT(nn.Module):
    """Wan2.1 DiT; with `config.vace_layers` also the VACE context branch.

    forward(latents (B, 16, F, H, W), timestep (B,), context (B, n <= text_len, text_dim),
            vace_context (B, 96, F, H, W) | None, vace_scale) -> velocity (B, 16, F, H, W) fp32.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim, patch = config.dim, config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.proj_out = nn.Linear(dim, config.out_dim * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        if config.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(config.vace_in_dim, dim, kernel_size=patch, stride=patch)
            self.vace_blocks = nn.ModuleList([VaceBlock(config, first=j == 0)
                                              for j in range(len(config.vace_layers))])
        # main block index -> hint index
        self._hint_of_layer = {layer: j for j, layer in enumerate(config.vace_layers)}
        self._rope_cache: dict = {}
        self.sequence_parallel: SequenceParallel | None = None

    # -- knobs ---------------------------------------------------------------

    def set_attention_impl(self, impl: str) -> None:
        """Route every attention through "idgrpo" (our kernel) or "sdpa" (torch) from now on."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
        self.config = dataclasses.replace(self.config, attention_impl=impl)
        for module in self.modules():
            if isinstance(module, WanAttention):
                module.attention_impl = impl

    def set_sequence_parallel(self, sp: SequenceParallel | None) -> None:
        """Split the token sequence over the ranks of `sp` from now on (Ulysses, docs/sequence-parallel.md):
        every rank of the group passes the same full inputs and gets the full velocity back. None, or a group
        of one rank, restores the plain single-rank path."""
        if sp is not None and sp.size == 1:
            sp = None
        if sp is not None and self.config.num_heads % sp.size:
            raise ValueError(f"sequence parallelism over {sp.size} ranks needs num_heads={self.config.num_heads} "
                             f"to be a multiple of {sp.size}: each rank attends with num_heads / {sp.size} heads")
        self.sequence_parallel = sp
        for block in self.units:
            block.attn1.sequence_parallel = sp  # cross-attention (attn2) stays local

    @property
    def units(self) -> list[nn.Module]:
        """The FSDP / activation-checkpointing units: every main and VACE block."""
        return [*self.blocks, *getattr(self, "vace_blocks", [])]

    @torch.no_grad()
    def init_weights(self) -> WanDiT:
        """(Re-)initialise every parameter in place, in its current dtype and device (e.g. after
        `to_empty` from the meta device), like diffusers' constructor: PyTorch's Linear/Conv defaults,
        unit norms, randn/sqrt(dim) modulation tables. Uses the global RNG (seed it for repeatability)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                module.reset_parameters()
            elif isinstance(module, (RMSNorm, AffineLayerNorm)):
                module.weight.fill_(1.0)
                if isinstance(module, AffineLayerNorm):
                    module.bias.zero_()
        for name, p in self.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, device=p.device) / self.config.dim**0.5)
        return self

    # -- pieces ----------------------------------------------------------------

    def rope_table(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin fp32 (L, head_dim/2) for a token grid, cached per (grid, device)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = wan_rope_table(grid, self.config.head_dim, self.config.rope_theta, device=device)
        return self._rope_cache[key]

    def pad_text(self, context: torch.Tensor, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Zero rows at and beyond `context_lens` (when given) and zero-pad to `text_len` rows (the padded
        rows are attended to, so their content must be exactly zero:
        docs/models.md#pitfall-text-padding-is-attended)."""
        B, n, width = context.shape  # (B, n, text_dim)
        if width != self.config.text_dim:
            raise ValueError(f"context width {width} != text_dim {self.config.text_dim}")
        if n > self.config.text_len:
            raise ValueError(f"context has {n} rows, more than text_len={self.config.text_len}")
        if context_lens is not None:
            keep = torch.arange(n, device=context.device)[None, :] < context_lens.to(context.device)[:, None]
            context = context * keep[..., None].to(context.dtype)
        if n < self.config.text_len:
            context = F.pad(context, (0, 0, 0, self.config.text_len - n))
        return context

    def patchify(self, latents: torch.Tensor, conv: nn.Conv3d) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, F, H, W) -> fp32 tokens (B, L, dim) in row-major (f, h, w) order, and the grid."""
        pt, ph, pw = self.config.patch_size
        B, _, frames, height, width = latents.shape
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent (F, H, W)=({frames}, {height}, {width}) is not divisible by the "
                             f"patch {self.config.patch_size}")
        x = conv(latents.to(conv.weight.dtype))  # (B, dim, F', H', W')
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float().contiguous(), grid

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, pt*ph*pw*C) with the channel fastest -> (B, C, F, H, W)
        (docs/models.md#pitfall-unpatchify-channel-order)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        B = tokens.shape[0]
        x = tokens.reshape(B, f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(B, -1, f * pt, h * ph, w * pw)

    def vace_tokens(self, vace_context: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """vace_context (B, vace_in_dim, F, H, W) -> fp32 tokens (B, num_tokens, C), the latents' token count."""
        c, _ = self.patchify(vace_context, self.vace_patch_embedding)  # (B, Lc, C)
        if c.shape[1] > num_tokens:
            raise ValueError(f"vace_context has {c.shape[1]} tokens, the latents {num_tokens}")
        return F.pad(c, (0, 0, 0, num_tokens - c.shape[1]))  # a shorter context is zero-padded, as diffusers

    def vace_hints(self, x0: torch.Tensor, c: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                   rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                   k_lens: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All hints from the VACE context tokens c (`vace_tokens`) and the patch-embedded video x0, computed
        before any main block
        (docs/models.md#pitfall-vace-details)."""
        hints = []
        for block in self.vace_blocks:
            c, hint = block(c, x0, e0, context, rope_cos, rope_sin, k_lens)
            hints.append(hint)
        return hints

    # -- forward ---------------------------------------------------------------

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                vace_context: torch.Tensor | None = None, vace_scale: float | torch.Tensor = 1.0,
                context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v = eps - x0 (docs/models.md#parameterisation-and-timesteps), fp32 (B, out_dim, F, H, W).

        latents (B, in_dim, F, H, W); timestep (B,) (or scalar) the scheduler's t in [0, 1000), not sigma;
        context (B, n, text_dim) text-encoder output, n <= text_len, padded here with zero rows
        (`context_lens` (B,) zeroes the rows of each sample at and beyond its length first);
        vace_context (B, vace_in_dim, F, H, W) or None (no hints); vace_scale a float or
        (len(vace_layers),) tensor multiplying each hint.
        """
        B = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        x, grid = self.patchify(latents, self.patch_embedding)  # (B, L, C) fp32
        num_tokens = x.shape[1]
        rope_cos, rope_sin = self.rope_table(grid, latents.device)  # (L, D/2)
        e, e0 = self.condition_embedder.embed_time(timestep)  # (B, C), (B, 6, C)
        context = self.condition_embedder.embed_text(self.pad_text(context, context_lens))  # (B, text_len, C)
        c = None
        if vace_context is not None:
            if not self.config.vace_layers:
                raise ValueError("vace_context given to a model without vace_layers")
            c = self.vace_tokens(vace_context, num_tokens)

        # Sequence parallelism: from here to the head this rank holds its chunk of the (padded) tokens.
        sp, k_lens = self.sequence_parallel, None
        if sp is not None:
            x, rope_cos, rope_sin = sp.shard(x, 1), sp.shard(rope_cos, 0), sp.shard(rope_sin, 0)
            c = None if c is None else sp.shard(c, 1)
            if sp.padded_length(num_tokens) != num_tokens:
                k_lens = torch.full((B,), num_tokens, dtype=torch.int32, device=x.device)

        hints = None if c is None else self.vace_hints(x, c, e0, context, rope_cos, rope_sin, k_lens)
        for i, block in enumerate(self.blocks):
            x = block(x, e0, context, rope_cos, rope_sin, k_lens)
            if hints is not None and i in self._hint_of_layer:
                j = self._hint_of_layer[i]
                scale = vace_scale[j] if isinstance(vace_scale, torch.Tensor) and vace_scale.dim() else vace_scale
                x = x + hints[j].to(x.dtype) * scale  # added after block i's full update

        shift, scale = (self.scale_shift_table.float() + e.unsqueeze(1)).unbind(1)  # head uses e, not e0
        h = layer_norm_modulate(x, shift, scale, self.config.eps, out_dtype=torch.float32)
        out = _linear_fp32(h, self.proj_out)  # (B, L, prod(patch) * out_dim)
        if sp is not None:
            out = sp.gather(out, num_tokens, dim=1)
        return self.unpatchify(out, grid)

    def cfg_forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                    neg_context: torch.Tensor, guidance: float | torch.Tensor,
                    vace_context: torch.Tensor | None = None, vace_scale: float | torch.Tensor = 1.0,
                    context_lens: torch.Tensor | None = None,
                    neg_context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance in ONE batched forward over (conditional, unconditional):
        v = v_uncond + g * (v_cond - v_uncond); `guidance` a float or (B,) tensor."""
        B = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device)
        timestep = timestep.expand(B) if timestep.dim() == 0 else timestep
        text = torch.cat([self.pad_text(context, context_lens), self.pad_text(neg_context, neg_context_lens)])
        vace = None if vace_context is None else torch.cat([vace_context, vace_context])
        velocity = self(torch.cat([latents, latents]), torch.cat([timestep, timestep]), text, vace, vace_scale)
        cond, uncond = velocity.chunk(2)
        return uncond + _per_sample(guidance, cond) * (cond - uncond)

    def phantom_cfg_forward(self, latents: torch.Tensor, ref_latents: torch.Tensor, timestep: torch.Tensor,
                            context: torch.Tensor, neg_context: torch.Tensor,
                            guidance_img: float | torch.Tensor = 5.0,
                            guidance_text: float | torch.Tensor = 7.5) -> torch.Tensor:
        """Phantom's three-pass guidance (docs/models.md#phantom) as ONE batched forward:
        pos_it (refs, text), pos_i (refs, negative text), neg (zero refs, negative text);
        v = neg + g_img (pos_i - neg) + g_text (pos_it - pos_i).

        latents (B, 16, F_lat + n_ref, H, W): the full latent, its last n_ref frames are replaced by
        the clean `ref_latents` (B, 16, n_ref, H, W) (by zeros in the negative pass). Returns the
        velocity of the full latent (the scheduler steps all frames; drop the last n_ref at the end).
        """
        with_refs = phantom_model_input(latents, ref_latents)
        without_refs = phantom_model_input(latents, torch.zeros_like(ref_latents))
        B = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device)
        timestep = timestep.expand(B) if timestep.dim() == 0 else timestep
        pos, neg = self.pad_text(context), self.pad_text(neg_context)
        velocity = self(torch.cat([with_refs, with_refs, without_refs]), timestep.repeat(3),
                        torch.cat([pos, neg, neg]))
        pos_it, pos_i, neg_v = velocity.chunk(3)
        return (neg_v + _per_sample(guidance_img, neg_v) * (pos_i - neg_v)
                + _per_sample(guidance_text, neg_v) * (pos_it - pos_i))


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float, or a (B,) tensor viewed to broadcast over (B, C, F, H, W)."""
    if isinstance(value, torch.Tensor) and value.dim():
        return value.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return value


# -------------------------------------------------------- Phantom (docs/models.md#phantom)


def phantom_model_input(latents: torch.Tensor, ref_latents: torch.Tensor) -> torch.Tensor:
    """Replace the last n_ref latent frames by the clean reference latents (every step,
    docs/models.md#phantom).
    latents (B, 16, F_lat + n_ref, H, W); ref_latents (B, 16, n_ref, H, W)."""
    n_ref = ref_latents.shape[2]
    if latents.shape[2] <= n_ref:
        raise ValueError(f"latents have {latents.shape[2]} frames, not more than the {n_ref} references")
    return torch.cat([latents[:, :, : latents.shape[2] - n_ref], ref_latents.to(latents.dtype)], dim=2)


def phantom_latent_frames(num_frames: int, n_ref: int) -> int:
    """Latent frames of a Phantom sample: (F - 1) / 4 + 1 video frames plus n_ref reference frames."""
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames} must be 4k + 1")
    return (num_frames - 1) // 4 + 1 + n_ref


# -------------------------------------------------------- VACE context (docs/models.md#vace-context)


def vace_mask_latent(mask: torch.Tensor, spatial_stride: int = 8) -> torch.Tensor:
    """Mask (B, 1, F, H, W) in {0, 1} (1 = generate) -> (B, 64, (F + 3) // 4, H / 8, W / 8):
    pixel-unshuffle with the 8x8 offset as the OUTER channel index (a * 8 + b), then nearest-exact
    resampling in time."""
    B, _, frames, height, width = mask.shape
    s = spatial_stride
    if height % s or width % s:
        raise ValueError(f"mask size {height}x{width} is not divisible by {s}")
    m = mask[:, 0].reshape(B, frames, height // s, s, width // s, s)
    m = m.permute(0, 3, 5, 1, 2, 4).reshape(B, s * s, frames, height // s, width // s)  # (B, 64, F, h, w)
    return F.interpolate(m, size=((frames + 3) // 4, height // s, width // s), mode="nearest-exact")


def vace_reference_canvas(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reference image (3, h, w) in [-1, 1] -> (3, height, width): bilinear resize keeping the aspect
    ratio, centred on a white (+1) canvas; unchanged when the size already matches."""
    _, h, w = image.shape
    if (h, w) == (height, width):
        return image
    s = min(height / h, width / w)
    new_h, new_w = int(h * s), int(w * s)
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = image.new_ones(3, height, width, dtype=torch.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top: top + new_h, left: left + new_w] = resized
    return canvas.to(image.dtype)


def build_vace_context(encode, video: torch.Tensor, mask: torch.Tensor,
                       references: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The 96-channel VACE context (docs/models.md#vace-context), in the original's reference order.

    encode: VAE encoder, (B, 3, F, H, W) in [-1, 1] -> normalised latent mean (B, 16, (F+3)//4, H/8, W/8);
    video (B, 3, F, H, W) in [-1, 1] (zeros for subject-to-video); mask (B, 1, F, H, W) in {0, 1}
    (ones for subject-to-video); references: per reference a (B, 3, H, W) image in [-1, 1] already
    on the video's canvas (`vace_reference_canvas`).
    Returns (B, 96, n_ref + F_lat, H/8, W/8); the noise latent must have the same n_ref + F_lat frames.
    """
    inactive = encode(video * (1 - mask))  # (B, 16, F_lat, h, w)
    reactive = encode(video * mask)
    latent = torch.cat([inactive, reactive], dim=1)  # (B, 32, F_lat, h, w)
    mask_latent = vace_mask_latent(mask).to(latent.dtype)  # (B, 64, F_lat, h, w)
    references = references or []
    if references:
        refs = [encode(r[:, :, None]) for r in references]  # each (B, 16, 1, h, w)
        refs = [torch.cat([r, torch.zeros_like(r)], dim=1) for r in refs]  # padded to 32 channels
        latent = torch.cat([*refs, latent], dim=2)
        zeros = mask_latent.new_zeros(*mask_latent.shape[:2], len(references), *mask_latent.shape[3:])
        mask_latent = torch.cat([zeros, mask_latent], dim=2)
    return torch.cat([latent, mask_latent], dim=1)


__all__ = [
    "PRESETS", "WanConfig", "WanDiT", "WanBlock", "VaceBlock", "WanAttention", "build_vace_context",
    "phantom_latent_frames", "phantom_model_input", "vace_mask_latent", "vace_reference_canvas",
]
