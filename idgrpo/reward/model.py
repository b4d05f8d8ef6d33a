"""A compact identity reward model: does every person of the reference images keep their identity
through the video?

    frames (B, T, S, S, 3) ─┐                       references (B, P, S, S, 3)
                            ├── shared small ViT ──┤
       frame tokens (B, T, L, D)          reference tokens (B, P, L, D) -> K learned parts (B, P, K, D)
                            └── cross-attention: each reference part looks for itself in each frame
                  per reference part: [ref, found, ref*found, |ref-found|] -> match feature
                  weighted pool over the reference's parts -> per-person, per-frame feature
       + presence: the reference's fine 4x4-pixel patch descriptors looked up in each frame (best cosine
         match: how well, how evenly, and where), so a missing, replaced or swapped person shows up
                  temporal self-attention over the frames of one person -> consistency s[b, p, t]
                  per person: mix of mean and soft-min over frames; per video: mean over people

The reward is a scalar per video (higher = identities kept better); `forward` also returns the
per-person, per-frame scores. The prompt is not used by this model (the interface accepts it so
that text-aware rewards plug in the same way). All attention goes through
`idgrpo.kernels.attention.attention` (Triton on GPU, PyTorch reference on CPU), or torch SDPA after
`set_attention_impl("sdpa")` (the benchmarks' baseline).

Presets: `tiny` (CPU, trains in minutes on 32x32 frames), `small`, `base` (GPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from idgrpo.errors import UsageError, above, at_least
from idgrpo.kernels.attention import attention
from idgrpo.models.qwen2_5_vl import ATTENTION_IMPLS, sdpa_attention


@dataclass
class RewardModelConfig:
    image_size: int = 32
    """Frames and references are resized to image_size x image_size."""
    patch_size: int = 8
    """ViT patch side (image_size must be a multiple)."""
    dim: int = 64
    """Token width."""
    depth: int = 2
    """Self-attention blocks of the shared image encoder."""
    heads: int = 4
    """Attention heads (dim must be a multiple)."""
    mlp_ratio: float = 2.0
    """MLP hidden width / dim."""
    temporal_depth: int = 1
    """Self-attention blocks across the frames of one person."""
    max_frames: int = 32
    """Longest frame sequence (size of the learned temporal position table)."""
    parts: int = 8
    """Tokens each reference is summarised into (learned queries) before searching the frames."""
    presence_patch: int = 4
    """Side of the fine pixel patches the presence lookup compares (image_size must be a multiple)."""
    presence_dim: int = 32
    """Width of the fine patch descriptors."""

    def __post_init__(self):
        # Messages name the flags of `idgrpo train-reward`, where this config is `--model.*`.
        at_least(self, 1, "image_size", "patch_size", "dim", "depth", "heads", "max_frames", "parts", "presence_patch",
                 "presence_dim", prefix="model")
        at_least(self, 0, "temporal_depth", prefix="model")
        above(self, 0.0, "mlp_ratio", prefix="model")
        if self.image_size % self.patch_size:
            raise UsageError(f"--model.image-size {self.image_size} is not a multiple of --model.patch-size "
                             f"{self.patch_size}")
        if self.image_size % self.presence_patch:
            raise UsageError(f"--model.image-size {self.image_size} is not a multiple of --model.presence-patch "
                             f"{self.presence_patch}")
        if self.dim % self.heads:
            raise UsageError(f"--model.dim {self.dim} is not a multiple of --model.heads {self.heads}")
        if int(self.dim * self.mlp_ratio) < 1:
            raise UsageError(f"--model.mlp-ratio {self.mlp_ratio} leaves no MLP width at --model.dim {self.dim}")

    @staticmethod
    def from_name(name: str) -> RewardModelConfig:
        presets = {
            "tiny": RewardModelConfig(),
            "small": RewardModelConfig(image_size=64, patch_size=8, dim=192, depth=4, heads=6),
            "base": RewardModelConfig(image_size=112, patch_size=8, dim=384, depth=8, heads=6, temporal_depth=2),
        }
        if name not in presets:
            raise ValueError(f"unknown reward model preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """q (N, Lq, H, D), k/v (N, Lk, H, D) -> (N, Lq, H, D) through our kernel ("idgrpo") or torch SDPA ("sdpa")."""
    return attention(q, k, v) if impl == "idgrpo" else sdpa_attention(q, k, v)


class Block(nn.Module):
    """Pre-norm transformer block; `context` switches self-attention to cross-attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool = False):
        super().__init__()
        self.heads = heads
        self.attention_impl = "idgrpo"  # set by IdentityRewardModel.set_attention_impl
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, Lq, D), context (N, Lk, D) or None -> attention output (N, Lq, D) (no residual)."""
        n, lq, d = x.shape
        q = self.q(self.norm_q(x)).view(n, lq, self.heads, d // self.heads)  # (N, Lq, H, Dh)
        source = self.norm_kv(context) if context is not None else self.norm_q(x)
        k, v = self.kv(source).view(n, source.shape[1], 2, self.heads, d // self.heads).unbind(2)  # (N, Lk, H, Dh)
        return self.out(_attend(q, k, v, self.attention_impl).reshape(n, lq, d))

    def attend_grid(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Every query set against every context: x (B, P, Lq, D), context (B, T, Lk, D) ->
        (B, P, T, Lq, D). Projections run once per set (not once per (p, t) combination)."""
        b, p, lq, d = x.shape
        t, lk = context.shape[1:3]
        h = self.heads
        q = self.q(self.norm_q(x)).view(b, p, 1, lq, h, d // h).expand(b, p, t, lq, h, d // h)
        k, v = self.kv(self.norm_kv(context)).view(b, 1, t, lk, 2, h, d // h).expand(
            b, p, t, lk, 2, h, d // h).unbind(4)
        out = _attend(q.reshape(b * p * t, lq, h, d // h), k.reshape(b * p * t, lk, h, d // h),
                      v.reshape(b * p * t, lk, h, d // h), self.attention_impl)  # (B*P*T, Lq, H, Dh)
        return self.out(out.reshape(b, p, t, lq, d))

    def pool(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Learned queries (K, D) read a token set: context (N, L, D) -> (N, K, D)."""
        x = queries.expand(context.shape[0], *queries.shape)
        x = x + self.attend(x, context)
        return x + self.mlp(self.norm_mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(x)
        return x + self.mlp(self.norm_mlp(x))


class IdentityRewardModel(nn.Module):
    def __init__(self, config: RewardModelConfig):
        super().__init__()
        self.config = c = config
        num_patches = (c.image_size // c.patch_size) ** 2
        self.patch = nn.Conv2d(3, c.dim, c.patch_size, stride=c.patch_size)
        self.position = nn.Parameter(torch.randn(num_patches, c.dim) * 0.02)
        self.is_reference = nn.Parameter(torch.randn(2, c.dim) * 0.02)  # (frame, reference) type embedding
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.part_queries = nn.Parameter(torch.randn(c.parts, c.dim) * 0.02)
        self.summarise = Block(c.dim, c.heads, c.mlp_ratio, cross=True)  # reference tokens -> `parts` tokens
        self.find = Block(c.dim, c.heads, c.mlp_ratio, cross=True)  # reference parts -> frame tokens
        self.match = nn.Sequential(nn.Linear(4 * c.dim, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.token_weight = nn.Linear(c.dim, 1)
        # Presence: fine pixel-patch descriptors (stride presence_patch) of the reference, each looked
        # up in every frame: how well the best match fits, and where it is (for swaps over time).
        pd = c.presence_dim
        self.pixel_embed = nn.Sequential(nn.Conv2d(3, pd, c.presence_patch, stride=c.presence_patch), nn.GELU(),
                                         nn.Conv2d(pd, pd, 1))
        self.pixel_weight = nn.Linear(pd, 1)
        self.presence_scale = nn.Parameter(torch.tensor(10.0))
        self.presence = nn.Linear(4, c.dim)
        self.time = nn.Parameter(torch.randn(c.max_frames, c.dim) * 0.02)
        self.temporal = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.temporal_depth))
        self.score_head = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, 1))
        self.min_mix = nn.Parameter(torch.zeros(()))  # sigmoid -> weight of the soft-min over frames
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def set_attention_impl(self, impl: str) -> None:
        """Route every attention through "idgrpo" (our kernel, default) or "sdpa" (torch SDPA) from now on."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r}: expected one of {tuple(ATTENTION_IMPLS)}")
        for module in self.modules():
            if isinstance(module, Block):
                module.attention_impl = impl

    def encode(self, images: torch.Tensor, kind: int) -> torch.Tensor:
        """images uint8 or float in 0..255, (N, S, S, 3) -> tokens (N, L, D)."""
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean).to(self.patch.weight.dtype)  # (N, 3, S, S)
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, D)
        x = x + self.position + self.is_reference[kind]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, frames: torch.Tensor, references: torch.Tensor, ref_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """frames (B, T, S, S, 3), references (B, P, S, S, 3) (uint8 or float 0..255, already resized),
        ref_mask (B, P) bool (False = padding). Returns {"reward": (B,), "per_frame": (B, P, T)}."""
        b, t = frames.shape[:2]
        p = references.shape[1]
        size = self.config.image_size
        if frames.shape[2:4] != (size, size) or references.shape[2:4] != (size, size):
            raise ValueError(f"frames {tuple(frames.shape)} / references {tuple(references.shape)} must be "
                             f"{size}x{size}: resize first (score() does)")
        if t > self.config.max_frames:
            raise ValueError(f"{t} frames > max_frames {self.config.max_frames}")
        if ref_mask is None:
            ref_mask = torch.ones(b, p, dtype=torch.bool, device=frames.device)
        frame_tokens = self.encode(frames.flatten(0, 1), 0)  # (B*T, L, D)
        ref_tokens = self.encode(references.flatten(0, 1), 1)  # (B*P, L, D)
        n_tok, d = frame_tokens.shape[1:]
        k = self.config.parts
        parts = self.summarise.pool(self.part_queries, ref_tokens).view(b, p, k, d)  # (B, P, K, D)
        # Every (person, frame) combination: the reference's parts search that frame.
        found = self.find.attend_grid(parts, frame_tokens.view(b, t, n_tok, d))  # (B, P, T, K, D)
        found = found + self.find.mlp(self.find.norm_mlp(found))
        ref_n = F.layer_norm(parts, (d,)).unsqueeze(2).expand_as(found)
        found_n = F.layer_norm(found, (d,))
        match = self.match(torch.cat([ref_n, found_n, ref_n * found_n, (ref_n - found_n).abs()], -1))
        weights = torch.softmax(self.token_weight(parts).squeeze(-1), dim=-1)  # (B, P, K)
        per_frame = torch.einsum("bpk,bptkd->bptd", weights, match)  # (B, P, T, D)
        per_frame = (per_frame + self.presence(self.find_pixels(frames, references))).reshape(b * p, t, d)
        per_frame = per_frame + self.time[:t]
        for block in self.temporal:
            per_frame = block(per_frame)
        scores = self.score_head(per_frame).view(b, p, t).float()  # (B, P, T)
        soft_min = -torch.logsumexp(-scores, dim=-1) + torch.log(torch.tensor(float(t)))
        mix = torch.sigmoid(self.min_mix.float())
        per_person = (1 - mix) * scores.mean(-1) + mix * soft_min  # (B, P)
        mask = ref_mask.to(per_person.dtype)
        reward = (per_person * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return {"reward": reward, "per_frame": scores, "per_person": per_person}

    def find_pixels(self, frames: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Look up each reference's fine patches in every frame: (B, P, T, 4) features = weighted mean
        and weighted spread of the best cosine match, and the mean (x, y) of the matches in [-1, 1]."""
        b, t = frames.shape[:2]
        p = references.shape[1]

        def embed(images):  # (N, S, S, 3) -> (N, G*G, Dp)
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean).to(self.patch.weight.dtype)
            return self.pixel_embed(x).flatten(2).transpose(1, 2)

        ref = embed(references.flatten(0, 1))  # (B*P, G2, Dp)
        frame = embed(frames.flatten(0, 1))  # (B*T, G2, Dp)
        g2, pd = ref.shape[1:]
        grid = int(round(g2 ** 0.5))
        weight = torch.softmax(self.pixel_weight(ref).squeeze(-1), -1).view(b, p, 1, g2)  # (B, P, 1, G2)
        sim = torch.einsum("bpid,btjd->bptij", F.normalize(ref, dim=-1).view(b, p, g2, pd),
                           F.normalize(frame, dim=-1).view(b, t, g2, pd))  # (B, P, T, G2 ref, G2 frame)
        best = sim.amax(-1)  # (B, P, T, G2)
        mean = (best * weight).sum(-1)
        spread = ((best - mean[..., None]).abs() * weight).sum(-1)
        where = torch.softmax(sim * self.presence_scale, -1)  # (B, P, T, G2, G2)
        coords = torch.linspace(-1, 1, grid, device=sim.device, dtype=sim.dtype)
        xy = torch.stack([coords.repeat(grid), coords.repeat_interleave(grid)], -1)  # (G2, 2) as (x, y)
        position = torch.einsum("bptij,jc,bpi->bptc", where, xy, weight.squeeze(2))  # (B, P, T, 2)
        return torch.cat([mean[..., None], spread[..., None], position], -1)

    @torch.no_grad()
    def score(self, frames: torch.Tensor, references: list[list[torch.Tensor]], prompts: list[str] | None = None,
              num_frames: int = 5) -> torch.Tensor:
        """The reward interface: frames uint8 (B, T, H, W, 3) on device, references (len B) lists of
        uint8 (h, w, 3), prompts (ignored). Samples `num_frames` uniformly, resizes, returns (B,) fp32."""
        if frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (B, T, H, W, 3), got {tuple(frames.shape)}")
        if len(references) != frames.shape[0] or any(len(r) == 0 for r in references):
            raise ValueError("references must hold one non-empty list of images per video")
        device = frames.device
        total = frames.shape[1]
        index = torch.linspace(0, total - 1, min(num_frames, total)).round().long().to(device)
        frames = _resize(frames.index_select(1, index), self.config.image_size)
        people = max(len(r) for r in references)
        refs = torch.zeros(len(references), people, self.config.image_size, self.config.image_size, 3,
                           device=device)
        ref_mask = torch.zeros(len(references), people, dtype=torch.bool, device=device)
        for i, images in enumerate(references):
            for j, image in enumerate(images):
                refs[i, j] = _resize(image.to(device)[None], self.config.image_size)[0]
                ref_mask[i, j] = True
        return self(frames, refs, ref_mask)["reward"]

    def save(self, directory: str | Path) -> Path:
        """Write `reward_model.safetensors` + `reward_model.json` (the config) into `directory`, each file whole or
        not at all; refused (NonFiniteError, nothing written) when a weight holds a NaN/Inf."""
        from idgrpo.engine.checkpoint import save_safetensors_atomic, write_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                                directory / "reward_model.safetensors")
        write_atomic(directory / "reward_model.json", json.dumps(asdict(self.config), indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> IdentityRewardModel:
        from safetensors.torch import load_file

        from idgrpo.engine.optim import nonfinite_summary

        directory = Path(directory)
        for name in ("reward_model.json", "reward_model.safetensors"):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory / name} not found: not a reward model directory "
                                        "(train-reward writes one under <out>/final)")
        config = RewardModelConfig(**json.loads((directory / "reward_model.json").read_text()))
        model = cls(config)
        state = load_file(str(directory / "reward_model.safetensors"))
        for key, tensor in state.items():
            problem = nonfinite_summary(tensor)
            if problem:
                raise UsageError(f"{directory / 'reward_model.safetensors'}: tensor {key!r} holds non-finite values "
                                 f"({problem}); a reward model with NaN/Inf weights is not loaded")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
        return model.to(device).eval()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., size, size, 3) in 0..255 (bilinear, antialiased)."""
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(*lead, size, size, 3)
