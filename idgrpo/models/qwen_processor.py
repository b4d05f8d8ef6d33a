"""Qwen2.5-VL input pipeline without transformers / qwen_vl_utils: pixels -> patches, the chat template,
tokens (from a local `tokenizer.json` through `tokenizers`) and M-RoPE position ids.

    processor = QwenProcessor.from_pretrained("Qwen2.5-VL-3B-Instruct", extra_special_tokens=["<|SA_reward|>"])
    batch = processor([[{"type": "image", "image": ref},                  # uint8 (h, w, 3)
                        {"type": "video", "video": frames, "fps": 16.0},  # uint8 (T, H, W, 3)
                        {"type": "text", "text": "..."}]])
    hidden = model(batch.input_ids, batch.position_ids, lengths=batch.lengths, ...)

Facts: docs/models.md#vision-tower, #language-model-and-m-rope, #qwen-input-pipeline and
#reward-head-and-reward-token (input layout). What the reference does, step by step:
- `smart_resize`: H and W rounded to multiples of patch*merge (28) with the pixel count kept in
  [min_pixels, max_pixels]; bicubic anti-aliased resize (Note [resize]); rescale 1/255; CLIP mean/std.
- videos: `nframes` rounded to a multiple of the temporal patch with Python `round` (5 -> 4), sampled with
  `linspace(0, T - 1, n).round()`; the sampled fps `n / T * fps` gives `second_per_grid_t = 2 / fps`
  for the temporal M-RoPE positions. An image is one frame repeated to the temporal patch.
- patches in the order (t, h/2, w/2, 2, 2) so that every 2x2 merge group is contiguous, each patch
  flattened as (C, temporal, 14, 14).
- chat template (`add_generation_prompt=True, add_vision_id=True`), each pad placeholder expanded to
  t*h*w/4 tokens; right padding with <|endoftext|>.
- `rope_index`: transformers 4.51's `get_rope_index` (text resumes at the largest vision position + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_PROMPT = "You are a helpful assistant."


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(H, W) -> multiples of `factor` close to the input aspect ratio, with H*W in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class QwenProcessorConfig:
    patch_size: int = 14
    """Vision patch side."""
    temporal_patch_size: int = 2
    """Frames per patch."""
    merge_size: int = 2
    """Spatial merge of the vision tower (the resize factor is patch_size * merge_size)."""
    image_min_pixels: int = 4 * 28 * 28
    """Lower pixel budget of images (qwen_vl_utils MIN_PIXELS)."""
    image_max_pixels: int = 399_360
    """Upper pixel budget of images (Identity-GRPO: 399,360)."""
    video_min_pixels: int = 128 * 28 * 28
    """Lower pixel budget per video frame (qwen_vl_utils VIDEO_MIN_PIXELS)."""
    video_max_pixels: int = 399_360
    """Upper pixel budget per video frame (Identity-GRPO: 399,360)."""
    num_frames: int = 5
    """Frames requested per video; rounded to a multiple of temporal_patch_size (5 -> 4) as the reference."""
    tokens_per_second: int = 2
    """Temporal M-RoPE positions per second."""
    system_prompt: str = SYSTEM_PROMPT
    """System turn of the chat template."""
    add_vision_id: bool = True
    """'Picture k: ' / 'Video k: ' before each vision block."""

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size, self.num_frames) < 1:
            raise ValueError("patch sizes, merge_size and num_frames must be >= 1")
        if self.image_min_pixels > self.image_max_pixels or self.video_min_pixels > self.video_max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


# ----------------------------------------------------------------------------- pixels


# Note [resize]: the reference resizes videos with torchvision (bicubic, antialias, on tensors) and
# images with PIL (bicubic). We resize both with `F.interpolate(bicubic, antialias=True)` on the
# frames' device, rounded and clamped to uint8 levels: this equals torchvision's float path; PIL's
# two-pass fixed-point resize differs by a level here and there (tests bound it). Inputs already at
# the target size pass through untouched, exactly as in the reference.
def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, height, width) holding integer levels in [0, 255]."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if x.shape[-2:] == (height, width):
        return x
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) levels -> CLIP-normalised float32."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x * (1 / 255) - mean) / std


def patchify(x: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) with T a multiple of `temporal` -> patches (t*h*w, C*temporal*patch*patch) in the order
    (t, h/merge, w/merge, merge, merge), and the grid (t, h, w) in patches."""
    T, C, H, W = x.shape
    gt, gh, gw = T // temporal, H // patch, W // patch
    x = x.reshape(gt, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, temporal, p, p)
    return x.reshape(gt * gh * gw, C * temporal * patch * patch), (gt, gh, gw)


def _check_frames(frames: torch.Tensor, what: str) -> None:
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 (T, H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")


def preprocess_image(image: torch.Tensor, config: QwenProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 (H, W, 3) -> (patches (h*w, 1176) float32 on image.device, grid (1, h, w))."""
    _check_frames(image.unsqueeze(0), "image")
    height, width = smart_resize(image.shape[0], image.shape[1], config.factor, config.image_min_pixels,
                                 config.image_max_pixels)
    x = normalize(resize_frames(image.unsqueeze(0), height, width))  # (1, 3, h, w)
    x = x.expand(config.temporal_patch_size, -1, -1, -1)  # one frame repeated over the temporal patch
    return patchify(x, config.patch_size, config.temporal_patch_size, config.merge_size)


def sample_frame_indices(total: int, num_frames: int, temporal_patch_size: int = 2) -> list[int]:
    """qwen_vl_utils with `nframes`: round to the temporal patch (Python round: 5 -> 4), then
    linspace(0, total - 1, n).round()."""
    n = max(temporal_patch_size, round(num_frames / temporal_patch_size) * temporal_patch_size)
    if n > total:
        raise ValueError(f"video has {total} frames, fewer than the {n} to sample")
    return torch.linspace(0, total - 1, n).round().long().tolist()


def preprocess_video(frames: torch.Tensor, config: QwenProcessorConfig, fps: float = 16.0, *,
                     sample: bool = True) -> tuple[torch.Tensor, tuple[int, int, int], float]:
    """uint8 (T, H, W, 3) -> (patches, grid (t, h, w), second_per_grid_t). With `sample`, takes
    `config.num_frames` (rounded) frames uniformly, as the reference's `nframes`; otherwise uses all frames
    (`fps` is then their rate). An odd frame count repeats the last frame."""
    _check_frames(frames, "video")
    total = frames.shape[0]
    if sample:
        index = sample_frame_indices(total, config.num_frames, config.temporal_patch_size)
        frames = frames[torch.tensor(index, device=frames.device)]
        fps = len(index) / total * fps  # the sampled frame rate
    height, width = smart_resize(frames.shape[1], frames.shape[2], config.factor, config.video_min_pixels,
                                 config.video_max_pixels)
    x = normalize(resize_frames(frames, height, width))  # (T, 3, h, w)
    if x.shape[0] % config.temporal_patch_size:
        extra = config.temporal_patch_size - x.shape[0] % config.temporal_patch_size
        x = torch.cat([x, x[-1:].expand(extra, -1, -1, -1)])
    patches, grid = patchify(x, config.patch_size, config.temporal_patch_size, config.merge_size)
    return patches, grid, config.temporal_patch_size / fps


# ----------------------------------------------------------------------------- position ids


def rope_index(input_ids: torch.Tensor, lengths: torch.Tensor | None, image_grid_thw, video_grid_thw,
               second_per_grid_ts=None, *, image_token_id: int, video_token_id: int, spatial_merge_size: int = 2,
               tokens_per_second: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, L) of right-padded rows, and per-row deltas (max position + 1 - length), as
    transformers 4.51 `get_rope_index`: text tokens count up on all three rows; each vision block (its run of
    t*h*w/merge^2 pad tokens) starts at the next text position p and takes (p + t_idx, p + h_idx, p + w_idx),
    t_idx = floor(k * second_per_grid_t * tokens_per_second) for videos and 0 for images; text then resumes
    at the block's largest position + 1. Padding positions are 1. Host tensors in, host tensors out."""
    B, L = input_ids.shape
    ids = input_ids.cpu()
    lengths = [L] * B if lengths is None else [int(n) for n in lengths.tolist()]
    grids = {image_token_id: iter(_rows(image_grid_thw)), video_token_id: iter(_rows(video_grid_thw))}
    seconds = iter([float(s) for s in (second_per_grid_ts.tolist() if isinstance(second_per_grid_ts, torch.Tensor)
                                       else second_per_grid_ts or [])])
    position_ids = torch.ones(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        row = ids[b, :lengths[b]].tolist()
        pieces, next_pos, i = [], 0, 0
        while i < len(row):
            token = row[i]
            if token in (image_token_id, video_token_id):
                try:
                    t, h, w = next(grids[token])
                except StopIteration:
                    raise ValueError(f"row {b}: more {'image' if token == image_token_id else 'video'} blocks "
                                     f"than grids") from None
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                if token == video_token_id:
                    step = torch.tensor(next(seconds, 1.0), dtype=torch.float32) * tokens_per_second
                    t_idx = (torch.arange(t) * step).long()
                else:
                    t_idx = torch.zeros(t, dtype=torch.long)
                block = torch.stack([t_idx.view(-1, 1, 1).expand(t, gh, gw),
                                     torch.arange(gh).view(1, -1, 1).expand(t, gh, gw),
                                     torch.arange(gw).view(1, 1, -1).expand(t, gh, gw)]).reshape(3, -1) + next_pos
                if row[i:i + block.shape[1]] != [token] * block.shape[1]:
                    raise ValueError(f"row {b}: a vision block at token {i} has fewer than {block.shape[1]} pad "
                                     f"tokens for grid {(t, h, w)}")
                pieces.append(block)
                next_pos = int(block.max()) + 1
                i += block.shape[1]
            else:
                run = i
                while run < len(row) and row[run] not in (image_token_id, video_token_id):
                    run += 1
                pieces.append(torch.arange(next_pos, next_pos + run - i).view(1, -1).expand(3, -1))
                next_pos += run - i
                i = run
        if pieces:
            positions = torch.cat(pieces, dim=1)
            position_ids[:, b, :lengths[b]] = positions
            deltas[b] = int(positions.max()) + 1 - lengths[b]
    return position_ids, deltas


def _rows(grid_thw) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


# ----------------------------------------------------------------------------- text


def render_chat(content: list[dict], *, system_prompt: str = SYSTEM_PROMPT, add_vision_id: bool = True) -> str:
    """Qwen2.5-VL chat template for one user turn (`add_generation_prompt=True`), one pad placeholder per
    vision item (expanded by the processor)."""
    parts = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"]
    images = videos = 0
    for item in content:
        kind = item.get("type")
        if kind == "image":
            images += 1
            label = f"Picture {images}: " if add_vision_id else ""
            parts.append(label + "<|vision_start|><|image_pad|><|vision_end|>")
        elif kind == "video":
            videos += 1
            label = f"Video {videos}: " if add_vision_id else ""
            parts.append(label + "<|vision_start|><|video_pad|><|vision_end|>")
        elif kind == "text":
            parts.append(item["text"])
        else:
            raise ValueError(f"content item type {kind!r}: expected 'image', 'video' or 'text'")
    parts.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


@dataclass
class QwenBatch:
    input_ids: torch.Tensor
    """(B, L) int64, right-padded."""
    attention_mask: torch.Tensor
    """(B, L) int64, 1 on real tokens."""
    lengths: torch.Tensor
    """(B,) int64 real tokens per row."""
    position_ids: torch.Tensor
    """(3, B, L) int64 M-RoPE positions."""
    pixel_values: torch.Tensor | None
    """(N_img, 1176) float32 image patches, all images of all rows in order."""
    image_grid_thw: torch.Tensor | None
    """(n_images, 3) int64 on the host."""
    pixel_values_videos: torch.Tensor | None
    """(N_vid, 1176) float32 video patches."""
    video_grid_thw: torch.Tensor | None
    """(n_videos, 3) int64 on the host."""
    second_per_grid_ts: torch.Tensor | None
    """(n_videos,) float32 seconds per temporal patch."""

    def to(self, device) -> QwenBatch:
        """Token tensors and pixels to `device`; grids stay on the host (the vision layout is built there)."""
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return QwenBatch(move(self.input_ids), move(self.attention_mask), move(self.lengths), move(self.position_ids),
                         move(self.pixel_values), self.image_grid_thw, move(self.pixel_values_videos),
                         self.video_grid_thw, self.second_per_grid_ts)

    def model_inputs(self) -> dict:
        """Keyword arguments of `Qwen2_5_VL.forward` besides input_ids and position_ids."""
        return dict(lengths=self.lengths, pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                    pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw)


class QwenProcessor:
    """Chat template + tokenizer + pixel pipeline + position ids. `tokenizer` is a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, config: QwenProcessorConfig | None = None, *,
                 extra_special_tokens: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.config = config or QwenProcessorConfig()
        missing = [t for t in extra_special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            from tokenizers import AddedToken

            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.ids = {}
        for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                      "<|video_pad|>", "<|endoftext|>", *extra_special_tokens):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer has no {token!r} token (is this a Qwen2.5-VL tokenizer.json?)")
            self.ids[token] = token_id

    @staticmethod
    def from_pretrained(path: str | Path, config: QwenProcessorConfig | None = None, *,
                        extra_special_tokens: tuple[str, ...] | list[str] = ()) -> QwenProcessor:
        """`path`: a tokenizer.json or a directory holding one."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - environment
            raise ImportError('the Qwen tokenizer needs `tokenizers`: pip install "idgrpo[vlm]"') from e
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (expected a Qwen2.5-VL model directory)")
        return QwenProcessor(Tokenizer.from_file(str(file)), config, extra_special_tokens=extra_special_tokens)

    @property
    def image_token_id(self) -> int:
        return self.ids["<|image_pad|>"]

    @property
    def video_token_id(self) -> int:
        return self.ids["<|video_pad|>"]

    @property
    def pad_token_id(self) -> int:
        return self.ids["<|endoftext|>"]

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"tokenizer has no token {token!r}")
        return token_id

    def __call__(self, conversations: list[list[dict]]) -> QwenBatch:
        """One user turn per row: a list of {"type": "image", "image": uint8 (H, W, 3)}, {"type": "video",
        "video": uint8 (T, H, W, 3), "fps": float (default 16), "sample": bool (default True)} and
        {"type": "text", "text": str} items. Pixels are processed on their own device."""
        c = self.config
        group = c.merge_size ** 2
        image_patches, image_grids, video_patches, video_grids, seconds, rows = [], [], [], [], [], []
        for content in conversations:
            text = render_chat(content, system_prompt=c.system_prompt, add_vision_id=c.add_vision_id)
            expansions = []
            for item in content:
                if item.get("type") == "image":
                    patches, grid = preprocess_image(item["image"], c)
                    image_patches.append(patches)
                    image_grids.append(grid)
                    expansions.append(("<|image_pad|>", math.prod(grid) // group))
                elif item.get("type") == "video":
                    patches, grid, spg = preprocess_video(item["video"], c, item.get("fps", 16.0),
                                                          sample=item.get("sample", True))
                    video_patches.append(patches)
                    video_grids.append(grid)
                    seconds.append(spg)
                    expansions.append(("<|video_pad|>", math.prod(grid) // group))
            rows.append(self._encode_expanded(text, expansions))
        B, L = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = torch.tensor(row)
            attention_mask[b, :len(row)] = 1
        lengths = attention_mask.sum(-1)
        image_grid_thw = torch.tensor(image_grids, dtype=torch.long) if image_grids else None
        video_grid_thw = torch.tensor(video_grids, dtype=torch.long) if video_grids else None
        second_per_grid_ts = torch.tensor(seconds, dtype=torch.float32) if seconds else None
        position_ids, _ = rope_index(input_ids, lengths, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                     image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                                     spatial_merge_size=c.merge_size, tokens_per_second=c.tokens_per_second)
        return QwenBatch(input_ids, attention_mask, lengths, position_ids,
                         torch.cat(image_patches) if image_patches else None, image_grid_thw,
                         torch.cat(video_patches) if video_patches else None, video_grid_thw, second_per_grid_ts)

    def _encode_expanded(self, text: str, expansions: list[tuple[str, int]]) -> list[int]:
        """Tokenize with each pad placeholder (in order) standing for n pad tokens; the pads are spliced in as
        ids rather than tokenized as n copies of a string."""
        ids: list[int] = []
        rest = text
        for placeholder, n in expansions:
            head, _, rest = rest.partition(placeholder)
            ids += self.tokenizer.encode(head, add_special_tokens=False).ids + [self.ids[placeholder]] * n
        return ids + self.tokenizer.encode(rest, add_special_tokens=False).ids


__all__ = ["QwenBatch", "QwenProcessor", "QwenProcessorConfig", "patchify", "preprocess_image", "preprocess_video",
           "render_chat", "resize_frames", "rope_index", "sample_frame_indices", "smart_resize"]
