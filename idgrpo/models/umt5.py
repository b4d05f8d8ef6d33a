"""umT5 encoder (the Wan2.1 text encoder) and its tokenizer, loaded from local files.

Facts: docs/models.md#umt5-text-encoder. Parameter names follow Wan's `models_t5_umt5-xxl-enc-bf16.pth`; HF
`UMT5EncoderModel` safetensors (google/umt5-xxl layout) are renamed on load (`hf_to_wan_key`).

What differs from a textbook transformer encoder (docs/models.md#pitfall-umt5-attention-is-unscaled): no
1/sqrt(d) attention scaling; every
layer has its own relative-position bias table (32 bidirectional log buckets, max distance 128); the
FFN is gated GELU(tanh) (`gate` = HF wi_0, `fc1` = wi_1); T5 RMSNorm with fp32 statistics and no bias.

Usage:
    encoder = UMT5Encoder.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16, device="cuda")
    tokenizer = UMT5Tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer/tokenizer.json")
    batch = tokenizer(["a cat", "two people talking"])
    context, lengths = encoder.encode(batch.ids.cuda(), batch.mask.cuda())  # (B, 512, 4096), zero past lengths
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_PRESETS = {
    "umt5-xxl": dict(vocab_size=256_384, dim=4096, num_heads=64, head_dim=64, ffn_dim=10_240, num_layers=24),
    "tiny": dict(vocab_size=384, dim=32, num_heads=4, head_dim=8, ffn_dim=48, num_layers=2),
}


@dataclass
class UMT5Config:
    vocab_size: int = 256_384
    """Token embedding rows."""
    dim: int = 4096
    """Model width (d_model)."""
    num_heads: int = 64
    """Attention heads."""
    head_dim: int = 64
    """Per-head width (d_kv); num_heads * head_dim need not equal dim."""
    ffn_dim: int = 10_240
    """Gated FFN hidden width (d_ff)."""
    num_layers: int = 24
    """Encoder layers."""
    num_buckets: int = 32
    """Relative-position buckets (half per direction)."""
    max_distance: int = 128
    """Distance at which the log-spaced buckets saturate."""
    eps: float = 1e-6
    """RMSNorm epsilon."""
    text_len: int = 512
    """Context rows the DiT expects: outputs are zero-padded (and inputs truncated) to this length."""

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"UMT5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be an even number >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError("max_distance must exceed the exact-bucket range num_buckets // 4")

    @classmethod
    def from_name(cls, name: str, **overrides) -> UMT5Config:
        if name not in _PRESETS:
            raise ValueError(f"unknown umT5 preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **overrides) -> UMT5Config:
        """Shapes read off Wan-layout weights (max_distance and eps keep their defaults)."""
        try:
            vocab_size, dim = state_dict["token_embedding.weight"].shape
            num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
            inner = state_dict["blocks.0.attn.q.weight"].shape[0]
            ffn_dim = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not umT5 encoder weights: no {e} tensor") from e
        num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        return cls(vocab_size=vocab_size, dim=dim, num_heads=num_heads, head_dim=inner // num_heads, ffn_dim=ffn_dim,
                   num_layers=num_layers, num_buckets=num_buckets, **overrides)  # fmt: skip

    @classmethod
    def from_hf_config(cls, c: dict, **overrides) -> UMT5Config:
        """The config of a transformers `UMT5EncoderModel` / `T5EncoderModel` config.json."""
        if c.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError(f"feed_forward_proj={c['feed_forward_proj']!r}: the umT5 encoder is gated-gelu")
        return cls(
            vocab_size=c["vocab_size"], dim=c["d_model"], num_heads=c["num_heads"], head_dim=c["d_kv"],
            ffn_dim=c["d_ff"], num_layers=c["num_layers"],
            num_buckets=c.get("relative_attention_num_buckets", 32),
            max_distance=c.get("relative_attention_max_distance", 128),
            eps=c.get("layer_norm_epsilon", 1e-6), **overrides,
        )  # fmt: skip


def is_hf_t5_config(raw: dict) -> bool:
    return raw.get("model_type") in ("umt5", "t5", "mt5") or ("d_model" in raw and "_class_name" not in raw)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of rel = key_pos - query_pos (docs/models.md#umt5-text-encoder)."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(n < exact, n, large.clamp(max=half - 1))


class T5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class RelativeBias(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, length: int) -> torch.Tensor:  # -> (1, H, L, L)
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)  # (B, H, L, L); unscaled: docs/models.md#pitfall-umt5-attention-is-unscaled
        probs = torch.softmax(scores.float() + bias, dim=-1).type_as(q)  # bias carries position + key mask
        return self.o((probs @ v).transpose(1, 2).reshape(b, l, -1))


class GatedGELU(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim, bias=False))  # `gate.0` in the Wan checkpoint
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * F.gelu(self.gate(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedGELU(cfg)
        self.pos_embedding = RelativeBias(cfg)  # one table per layer: the "u" of umT5

    def forward(self, x: torch.Tensor, key_mask_bias: torch.Tensor) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1]).float() + key_mask_bias
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    def __init__(self, config: UMT5Config | None = None):
        super().__init__()
        self.config = cfg = config or UMT5Config()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> hidden states (B, L, dim); rows past each sample's length are not meaningful."""
        key_mask_bias = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        key_mask_bias = key_mask_bias.masked_fill(~mask.bool(), float("-inf"))[:, None, None, :]  # (B, 1, 1, L)
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, key_mask_bias)
        return self.norm(x)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DiT's text context: (B, text_len, dim) with rows >= length zeroed, and lengths (B,).
        The zeros are attended to by the DiT: docs/models.md#pitfall-text-padding-is-attended.

        Inputs longer than text_len must be truncated by the tokenizer first."""
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(f"ids and mask must both be (B, L), got {tuple(ids.shape)} and {tuple(mask.shape)}")
        text_len = self.config.text_len
        if ids.shape[1] > text_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds text_len={text_len}; truncate first")
        lengths = mask.long().sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence needs at least one token (the tokenizer appends </s>)")
        hidden = self(ids, mask)  # (B, L, dim)
        keep = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        out = hidden.new_zeros(ids.shape[0], text_len, hidden.shape[-1])
        out[:, : ids.shape[1]] = hidden * keep[..., None].to(hidden.dtype)
        return out, lengths

    # -- weights ---------------------------------------------------------------------------------

    def load_state_dict_any(self, state_dict: dict[str, torch.Tensor], *, source: str = "state dict"):
        """Load the Wan T5 layout or HF `UMT5EncoderModel` keys (strict; HF decoder keys are ignored)."""
        state_dict = to_wan_layout(state_dict)
        from idgrpo.models.weights import check_keys

        check_keys({k: tuple(v.shape) for k, v in self.state_dict().items()},
                   {k: tuple(v.shape) for k, v in state_dict.items()}, source=source,
                   target=f"UMT5Encoder({self.config})")
        self.load_state_dict(state_dict, strict=True, assign=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: UMT5Config | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> UMT5Encoder:
        """Load a transformers `text_encoder/` folder (config.json + safetensors, sharded or not), a diffusers
        pipeline root, a Wan `models_t5_*.pth` (weights_only) or the original Wan2.1 folder holding it, or any
        single weights file. The config comes from
        `config`, else config.json, else the weight shapes. `dtype` None: the checkpoint's own
        (docs/data-and-checkpoints.md).

        The module is built on the meta device and the weights are assigned, so 5.7B parameters are
        never materialised twice."""
        from idgrpo.models.weights import CheckpointError, WeightFiles, locate

        source = locate(path, "text_encoder", what="umT5", is_config=is_hf_t5_config, own_file="models_t5_*.pth")
        tensors = WeightFiles(source.files)
        if dtype is None:
            dtype = tensors.default_dtype()
        stored = to_wan_layout({key: key for key in tensors})  # Wan name -> stored name; HF decoder keys dropped
        state_dict = {name: tensors[key].to(device=device, dtype=dtype) for name, key in stored.items()}
        if config is None and source.config is not None:
            config = source.parse_config(UMT5Config.from_hf_config)
        elif config is None:
            try:
                config = UMT5Config.from_state_dict(state_dict)
            except ValueError as e:
                raise CheckpointError(f"{source.path}: {e}") from e
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict_any(state_dict, source=str(source.path))
        return model.eval()


def to_wan_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `UMT5EncoderModel` / `UMT5Model` keys -> Wan keys (decoder and tied copies dropped); Wan keys as is."""
    if not any(k.startswith(("encoder.block.", "shared.")) for k in state_dict):
        return state_dict
    return {hf_to_wan_key(k): v for k, v in state_dict.items()
            if not k.startswith(("decoder.", "lm_head.", "encoder.embed_tokens."))}  # fmt: skip


def hf_to_wan_key(key: str) -> str:
    """Rename one HF `UMT5EncoderModel` key to the Wan T5 layout (docs/models.md#umt5-text-encoder)."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.layer\.([01])\.(.+)", key)
    if not m:
        return key
    i, sub, rest = m.groups()
    renames = {
        "layer_norm.weight": "norm1.weight" if sub == "0" else "norm2.weight",
        "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    for p in "qkvo":
        renames[f"SelfAttention.{p}.weight"] = f"attn.{p}.weight"
    return f"blocks.{i}.{renames.get(rest, rest)}"


# ---------------------------------------------------------------------------------------------
# tokenizer


def clean_prompt(text: str) -> str:
    """Wan/diffusers prompt cleaning: ftfy (when installed), double HTML unescape, strip, collapse spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TokenizedBatch(NamedTuple):
    ids: torch.Tensor
    """(B, text_len) int64 token ids, padded with the pad id."""
    mask: torch.Tensor
    """(B, text_len) bool, True on real tokens (including </s>)."""
    truncated: list[bool]
    """Per prompt: was it longer than text_len tokens (and cut)?"""


class UMT5Tokenizer:
    """The umT5 SentencePiece tokenizer from a local HF `tokenizer.json` (the `tokenizers` package).

    Appends `</s>` through the file's post-processor, truncates to `text_len` (keeping `</s>`), pads with
    `<pad>`; `clean=True` applies `clean_prompt` first (diffusers does, Identity-GRPO's encoder does not)."""

    def __init__(self, path, text_len: int = 512, *, clean: bool = True):
        """path: a tokenizer.json, a directory holding one, or an already built `tokenizers.Tokenizer`."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError('the umT5 tokenizer needs `tokenizers`: pip install "idgrpo[vlm]"') from e
        if isinstance(path, Tokenizer):
            self.path, tok = None, Tokenizer.from_str(path.to_str())  # a copy: truncation is set below
        else:
            path = Path(path)
            if path.is_dir():
                path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: tokenizer.json not found")
            self.path, tok = path, Tokenizer.from_file(str(path))
        self.text_len, self.clean = text_len, clean
        pad_id = tok.token_to_id("<pad>")
        if pad_id is None:
            raise ValueError(f"{self.path or 'tokenizer'}: has no <pad> token")
        self.pad_id = pad_id
        tok.no_padding()
        tok.enable_truncation(max_length=text_len)
        self._tok = tok

    def __call__(self, prompts: list[str]) -> TokenizedBatch:
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.bool)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = torch.tensor(enc.ids, dtype=torch.long)
            mask[row, :n] = True
        return TokenizedBatch(ids, mask, [bool(enc.overflowing) for enc in encodings])


def byte_tokenizer():
    """A tokenizer.json-compatible byte-level tokenizer (<pad>=0, </s>=1, <unk>=2, then one token per byte)
    for the tiny random-weight preset: any text encodes, so tests and the CPU demo need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok
