"""Synthetic distortions of good multi-person videos, for identity preference pairs.

All functions take and return uint8 videos (T, H, W, 3) and never modify their input. Boxes are
int (P, T, 4) `(x0, y0, x1, y1)` (exclusive ends) with people listed back to front, as in
`idgrpo.synth.world`.

Identity-breaking (need boxes; they touch pixels inside the named people's boxes only):
    swap_people, drift_person, blend_person, clone_person, remove_person
Label-preserving (a pair (clean, distorted) is labelled `same`):
    photometric_shift, reencode, small_crop
Box-free:
    temporal_shuffle, flicker (the clean video is preferred) and reference mismatch (same video,
    one reference replaced by another identity: the matching references are preferred).

Note: with boxes but no masks, a person's pixels are estimated as "inside the box and different
from the background", the background being the per-pixel median over the frames in which that
pixel lies outside every box (static camera). Pixels inside the box of a nearer person are left
alone, so an edit never paints over someone standing in front.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import tyro

from idgrpo.errors import UsageError, at_least, flag, one_of, within

IDENTITY_BREAKING = ("swap", "drift", "blend", "clone", "remove")
LABEL_PRESERVING = ("photometric", "reencode", "crop")
BOX_FREE = ("mismatch", "shuffle", "flicker")


def estimate_background(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per-pixel median over the frames where the pixel is outside every box (all frames where it
    never is). frames uint8 (T, H, W, 3), boxes (P, T, 4) -> float (H, W, 3)."""
    covered = boxes_mask(boxes, frames.shape[1], frames.shape[2]).any(0)  # (T, H, W)
    values = frames.float().masked_fill(covered[..., None], float("nan"))
    background = values.nanmedian(dim=0).values  # (H, W, 3), NaN where always covered
    # Pixels covered in every frame: fill from their known neighbours, ring by ring (a diffusion
    # inpaint; exact for the world's row-constant backdrops up to the edge of the hole).
    for _ in range(background.shape[0] + background.shape[1]):
        missing = background[..., 0].isnan()
        if not missing.any():
            break
        known = (~missing).float()[None, None]
        filled = torch.nan_to_num(background).permute(2, 0, 1)[None]
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        count = F.conv2d(known, kernel, padding=1)[0, 0]
        total = F.conv2d(filled.reshape(3, 1, *missing.shape), kernel, padding=1)[:, 0].permute(1, 2, 0)
        grow = missing & (count > 0)
        background[grow] = total[grow] / count[grow][:, None]
    if background.isnan().any():  # every pixel covered in every frame: plain median
        background = torch.where(background.isnan(), frames.float().median(dim=0).values, background)
    return background


def boxes_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(P, T, 4) boxes -> (P, T, H, W) bool, True inside each box (clipped to the frame)."""
    ys = torch.arange(height).view(1, 1, height, 1)
    xs = torch.arange(width).view(1, 1, 1, width)
    b = boxes.long()[..., None, None]  # (P, T, 4, 1, 1)
    return (xs >= b[:, :, 0]) & (xs < b[:, :, 2]) & (ys >= b[:, :, 1]) & (ys < b[:, :, 3])


def person_mask(frames: torch.Tensor, boxes: torch.Tensor, person: int, *, threshold: float = 12.0,
                background: torch.Tensor | None = None) -> torch.Tensor:
    """(T, H, W) bool: the pixels of `person` that an edit may touch (see the module note)."""
    _, height, width, _ = frames.shape
    inside = boxes_mask(boxes, height, width)  # (P, T, H, W)
    if background is None:
        background = estimate_background(frames, boxes)
    differs = (frames.float() - background).abs().amax(-1) > threshold  # (T, H, W)
    in_front = inside[person + 1:].any(0) if person + 1 < boxes.shape[0] else torch.zeros_like(inside[0])
    return inside[person] & differs & ~in_front


def _check_person(boxes: torch.Tensor | None, *people: int) -> torch.Tensor:
    if boxes is None:
        raise ValueError("this distortion needs per-person boxes")
    for p in people:
        if not 0 <= p < boxes.shape[0]:
            raise ValueError(f"person {p} out of range: the boxes hold {boxes.shape[0]} people")
    return boxes.long()


def _least_occluded_frame(boxes: torch.Tensor, person: int) -> int:
    """Frame in which `person`'s box overlaps the other boxes the least (its clearest view)."""
    b = boxes.long()
    x0, y0, x1, y1 = b[person].unbind(-1)  # (T,)
    overlap = torch.zeros(b.shape[1])
    for q in range(b.shape[0]):
        if q == person:
            continue
        w = (torch.minimum(x1, b[q, :, 2]) - torch.maximum(x0, b[q, :, 0])).clamp(min=0)
        h = (torch.minimum(y1, b[q, :, 3]) - torch.maximum(y0, b[q, :, 1])).clamp(min=0)
        overlap += (w * h).float()
    return int(overlap.argmin())


def _appearance(frames, boxes, person, background):
    """The person's clearest view: (patch float (h, w, 3), mask (h, w) bool) cut from its box."""
    t = _least_occluded_frame(boxes, person)
    x0, y0, x1, y1 = boxes[person, t].tolist()
    mask = person_mask(frames[t:t + 1], boxes[:, t:t + 1], person, background=background)[0]
    return frames[t, y0:y1, x0:x1].float(), mask[y0:y1, x0:x1]


def _resize(patch: torch.Tensor, mask: torch.Tensor, h: int, w: int):
    patch = F.interpolate(patch.permute(2, 0, 1)[None], size=(h, w), mode="nearest")[0].permute(1, 2, 0)
    mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5
    return patch, mask


def _paint(out, frames, boxes, person, t, patch, patch_mask, background, alpha=1.0, erase=True):
    """Replace `person` in frame t by `patch` (resized to its box): erase the person to background,
    then paint the patch's masked pixels, never over a nearer person's box."""
    _, height, width, _ = frames.shape
    editable = person_mask(frames[t:t + 1], boxes[:, t:t + 1], person, background=background)[0]  # (H, W)
    x0, y0, x1, y1 = boxes[person, t].tolist()
    if x1 <= x0 or y1 <= y0:
        return
    src, src_mask = _resize(patch, patch_mask, y1 - y0, x1 - x0)
    target = torch.zeros(height, width, 3)
    target_mask = torch.zeros(height, width, dtype=torch.bool)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    target[cy0:cy1, cx0:cx1] = src[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    target_mask[cy0:cy1, cx0:cx1] = src_mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    inside = boxes_mask(boxes[:, t:t + 1], height, width)[:, 0]
    in_front = inside[person + 1:].any(0) if person + 1 < boxes.shape[0] else torch.zeros_like(inside[0])
    frame = out[t]
    if erase:
        frame[editable] = background[editable]
        paint = target_mask & inside[person] & ~in_front
        frame[paint] = (1 - alpha) * frame[paint] + alpha * target[paint]
    else:  # blend: mix the person's own pixels toward the patch where both exist
        both = editable & target_mask
        frame[both] = (1 - alpha) * frame[both] + alpha * target[both]


def _finish(video: torch.Tensor) -> torch.Tensor:
    return video.round().clamp(0, 255).to(torch.uint8)


def swap_people(frames, boxes, person_a: int, person_b: int, start_frame: int) -> torch.Tensor:
    """From `start_frame` on, person_a and person_b wear each other's appearance."""
    boxes = _check_person(boxes, person_a, person_b)
    if person_a == person_b:
        raise ValueError("swap needs two different people")
    background = estimate_background(frames, boxes)
    look_a = _appearance(frames, boxes, person_a, background)
    look_b = _appearance(frames, boxes, person_b, background)
    out = frames.float().clone()
    for t in range(max(0, start_frame), frames.shape[0]):
        # Erase both first so that a person behind is not painted over the other's old pixels.
        for p in (person_a, person_b):
            m = person_mask(frames[t:t + 1], boxes[:, t:t + 1], p, background=background)[0]
            out[t][m] = background[m]
        _paint(out, frames, boxes, person_a, t, *look_b, background)
        _paint(out, frames, boxes, person_b, t, *look_a, background)
    return _finish(out)


def _rotate_colours(frames, boxes, person: int, amount: torch.Tensor) -> torch.Tensor:
    """The person's pixels blended toward their colours rotated R->G->B by `amount` (T,) per frame (0: unchanged)."""
    boxes = _check_person(boxes, person)
    mask = person_mask(frames, boxes, person)  # (T, H, W)
    out = frames.float()
    amount = amount.view(-1, 1, 1, 1)
    rotated = (1 - amount) * out + amount * out[..., [1, 2, 0]]
    return _finish(torch.where(mask[..., None], rotated, out))


def drift_person(frames, boxes, person: int, strength: float) -> torch.Tensor:
    """Gradual appearance drift: the person's colours rotate (R->G->B) linearly from 0 at the
    first frame to `strength` (0..1) at the last."""
    return _rotate_colours(frames, boxes, person, torch.linspace(0.0, strength, frames.shape[0]))


def recolour_person(frames, boxes, person: int, strength: float) -> torch.Tensor:
    """The person's colours rotated (R->G->B) by `strength` (0..1) in every frame: a constant mismatch with the
    reference (a wrong identity from the first frame), where `drift_person` grows from nothing."""
    return _rotate_colours(frames, boxes, person, torch.full((frames.shape[0],), float(strength)))


def blend_person(frames, boxes, person: int, other: int, alpha: float) -> torch.Tensor:
    """Blend `person`'s appearance toward `other`'s by `alpha` (0..1) in every frame."""
    boxes = _check_person(boxes, person, other)
    background = estimate_background(frames, boxes)
    look = _appearance(frames, boxes, other, background)
    out = frames.float().clone()
    for t in range(frames.shape[0]):
        _paint(out, frames, boxes, person, t, *look, background, alpha=alpha, erase=False)
    return _finish(out)


def clone_person(frames, boxes, source: int, target: int) -> torch.Tensor:
    """`target` takes `source`'s appearance in every frame (two copies of one identity)."""
    boxes = _check_person(boxes, source, target)
    if source == target:
        raise ValueError("clone needs two different people")
    background = estimate_background(frames, boxes)
    look = _appearance(frames, boxes, source, background)
    out = frames.float().clone()
    for t in range(frames.shape[0]):
        _paint(out, frames, boxes, target, t, *look, background)
    return _finish(out)


def remove_person(frames, boxes, person: int) -> torch.Tensor:
    """Erase the person (their pixels become the estimated background) in every frame."""
    boxes = _check_person(boxes, person)
    background = estimate_background(frames, boxes)
    mask = person_mask(frames, boxes, person, background=background)
    out = frames.float().clone()
    out = torch.where(mask[..., None], background.expand_as(out), out)
    return _finish(out)


def photometric_shift(frames, gain: float, bias: tuple[float, float, float]) -> torch.Tensor:
    """Global brightness/colour change: `frames * gain + bias` (per channel), clamped."""
    return _finish(frames.float() * gain + torch.tensor(bias, dtype=torch.float32))


def reencode(frames, suffix: str = ".mp4", fps: int = 8) -> torch.Tensor:
    """Round trip through the video codec of `idgrpo.media` (lossy for mp4)."""
    from idgrpo import media

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "clip" + suffix)
        media.write_video(path, frames, fps=fps)
        out = media.read_video(path)
    if out.shape != frames.shape:
        raise RuntimeError(f"re-encoding changed the shape {tuple(frames.shape)} -> {tuple(out.shape)}")
    return out


def small_crop(frames, boxes, left: int, top: int, right: int, bottom: int):
    """Crop the given margins (pixels) and resize back to (H, W) bilinearly; boxes follow.
    Returns (frames, boxes or None)."""
    _, height, width, _ = frames.shape
    if left + right >= width or top + bottom >= height or min(left, top, right, bottom) < 0:
        raise ValueError(f"crop margins {(left, top, right, bottom)} do not fit a {height}x{width} frame")
    crop = frames[:, top:height - bottom, left:width - right].permute(0, 3, 1, 2).float()
    out = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    out = _finish(out.permute(0, 2, 3, 1))
    if boxes is None:
        return out, None
    sx, sy = width / (width - left - right), height / (height - top - bottom)
    b = boxes.double()
    new = torch.stack([(b[..., 0] - left) * sx, (b[..., 1] - top) * sy, (b[..., 2] - left) * sx,
                       (b[..., 3] - top) * sy], -1)
    new[..., 0::2] = new[..., 0::2].clamp(0, width)
    new[..., 1::2] = new[..., 1::2].clamp(0, height)
    return out, new.round().long()


def temporal_shuffle(frames, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames in a random order that is not the original one. Returns (frames, permutation)."""
    num_frames = frames.shape[0]
    if num_frames < 2:
        raise ValueError("temporal shuffle needs at least 2 frames")
    order = torch.arange(num_frames)
    while torch.equal(order, torch.arange(num_frames)):
        order = torch.randperm(num_frames, generator=generator)
    return frames[order].clone(), order


def flicker(frames, strength: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every other frame (random phase) gets a random brightness gain of 1 +- strength.
    Returns (frames, per-frame gains (T,))."""
    num_frames = frames.shape[0]
    phase = int(torch.randint(2, (1,), generator=generator))
    signs = torch.where(torch.rand(num_frames, generator=generator) < 0.5, -1.0, 1.0)
    gains = torch.where(torch.arange(num_frames) % 2 == phase, 1 + strength * signs, torch.ones(num_frames))
    return _finish(frames.float() * gains.view(-1, 1, 1, 1)), gains


# ----------------------------------------------------------------------------------------
# Pair generation and the `idgrpo synth-pairs` command
# ----------------------------------------------------------------------------------------


@dataclass
class SourceVideo:
    """A good video to distort. frames uint8 (T, H, W, 3); boxes (P, T, 4) back to front or None."""

    name: str
    frames: torch.Tensor
    references: list[torch.Tensor]
    prompt: str
    boxes: torch.Tensor | None = None


@dataclass
class SyntheticPair:
    """One labelled pair; videos and references are named entries of the generator's stores."""

    video_a: str
    video_b: str
    refs_a: list[str]
    refs_b: list[str]
    prompt: str
    label: str
    """`A`, `B` or `same`."""
    kind: str
    group: str
    params: dict


def _distort(kind: str, video: SourceVideo, rng: random.Random, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict]:
    """Apply one video distortion with random parameters; returns (video, parameters incl. strength)."""
    frames, boxes = video.frames, video.boxes
    num_people = boxes.shape[0] if boxes is not None else len(video.references)
    num_frames = frames.shape[0]
    if kind == "swap":
        a, b = rng.sample(range(num_people), 2)
        start = rng.randint(1, max(1, num_frames - 2))
        return swap_people(frames, boxes, a, b, start), {
            "people": [a, b], "start_frame": start, "strength": (num_frames - start) / num_frames}
    if kind == "drift":
        p, strength = rng.randrange(num_people), rng.uniform(0.5, 1.0)
        return drift_person(frames, boxes, p, strength), {"person": p, "strength": strength}
    if kind == "blend":
        p, q = rng.sample(range(num_people), 2)
        alpha = rng.uniform(0.4, 0.9)
        return blend_person(frames, boxes, p, q, alpha), {"person": p, "other": q, "strength": alpha}
    if kind == "clone":
        source, target = rng.sample(range(num_people), 2)
        return clone_person(frames, boxes, source, target), {"source": source, "target": target, "strength": 1.0}
    if kind == "remove":
        p = rng.randrange(num_people)
        return remove_person(frames, boxes, p), {"person": p, "strength": 1.0}
    if kind == "shuffle":
        out, order = temporal_shuffle(frames, generator)
        moved = float((order != torch.arange(num_frames)).float().mean())
        return out, {"order": order.tolist(), "strength": moved}
    if kind == "flicker":
        strength = rng.uniform(0.2, 0.45)
        out, gains = flicker(frames, strength, generator)
        return out, {"gains": [round(g, 4) for g in gains.tolist()], "strength": strength}
    if kind == "photometric":
        gain, bias = rng.uniform(0.8, 1.2), [rng.uniform(-15, 15) for _ in range(3)]
        return photometric_shift(frames, gain, tuple(bias)), {"gain": gain, "bias": bias, "strength": abs(gain - 1)}
    if kind == "reencode":
        return reencode(frames, ".mp4"), {"codec": "mp4", "strength": 1.0}
    if kind == "crop":
        margins = [rng.randint(0, 2) for _ in range(4)]
        margins[rng.randrange(4)] = max(1, margins[0])
        out, _ = small_crop(frames, boxes, *margins)
        return out, {"margins_ltrb": margins, "strength": sum(margins) / frames.shape[2]}
    raise ValueError(f"unknown distortion {kind!r}")


def make_pairs(videos: list[SourceVideo], *, kinds: tuple[str, ...], pairs_per_video: int, seed: int,
               both_shift_probability: float = 0.25, box_free_kinds: tuple[str, ...] | None = None):
    """Distort each source video `pairs_per_video` times. Returns (pairs, videos {name: frames},
    references {name: image}). Identity-breaking and box-free pairs prefer the clean side (placed
    as A or B at random); label-preserving pairs are `same`. With `both_shift_probability`, an
    identity pair gets one photometric shift applied to both sides (label unchanged). Videos
    without boxes use `box_free_kinds` (default: `kinds`)."""
    box_free_kinds = kinds if box_free_kinds is None else box_free_kinds
    unknown = set(kinds + box_free_kinds) - set(IDENTITY_BREAKING + LABEL_PRESERVING + BOX_FREE)
    if unknown:
        raise ValueError(f"unknown distortion kinds {sorted(unknown)}")
    video_store: dict[str, torch.Tensor] = {}
    ref_store: dict[str, torch.Tensor] = {}
    pairs: list[SyntheticPair] = []
    for v in videos:
        for p, ref in enumerate(v.references):
            ref_store[f"{v.name}_p{p}"] = ref
    all_refs = list(ref_store)
    for index, video in enumerate(videos):
        rng = random.Random(f"{seed}:{video.name}:{index}")
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        num_people = len(video.references)
        candidates = kinds if video.boxes is not None else box_free_kinds
        usable = [k for k in candidates if (video.boxes is not None or k not in IDENTITY_BREAKING)
                  and not (k in ("swap", "blend", "clone") and num_people < 2)]
        if not usable:
            raise ValueError(f"{video.name}: none of the distortions {kinds} applies (boxes: "
                             f"{video.boxes is not None}, people: {num_people})")
        clean_name = f"{video.name}_clean"
        video_store[clean_name] = video.frames
        refs = [f"{video.name}_p{p}" for p in range(num_people)]
        # Each kind at most once per video before any repeats, so small sets still cover the kinds.
        plan = rng.sample(usable, min(pairs_per_video, len(usable)))
        plan += [rng.choice(usable) for _ in range(pairs_per_video - len(plan))]
        for j, kind in enumerate(plan):
            params: dict = {}
            refs_clean, refs_other = refs, refs
            if kind == "mismatch":
                p = rng.randrange(num_people)
                others = [r for r in all_refs if not r.startswith(f"{video.name}_")]
                if not others:
                    raise ValueError("reference mismatch needs at least two source videos")
                replacement = rng.choice(others)
                refs_other = refs[:p] + [replacement] + refs[p + 1:]
                params = {"person": p, "replacement": replacement, "strength": 1.0}
                clean, other = video.frames, video.frames
                other_name = clean_name
            else:
                other, params = _distort(kind, video, rng, generator)
                other_name = f"{video.name}_{kind}{j}"
                clean = video.frames
            clean_name_j = clean_name
            if kind not in LABEL_PRESERVING and rng.random() < both_shift_probability:
                gain, bias = rng.uniform(0.85, 1.15), tuple(rng.uniform(-12, 12) for _ in range(3))
                clean = photometric_shift(clean, gain, bias)
                other = photometric_shift(other, gain, bias)
                params["both_shift"] = {"gain": gain, "bias": list(bias)}
                clean_name_j = f"{video.name}_clean_shift{j}"
                other_name = clean_name_j if kind == "mismatch" else f"{video.name}_{kind}{j}_shift"
                video_store[clean_name_j] = clean
            video_store[other_name] = other
            label_clean_first = "same" if kind in LABEL_PRESERVING else "A"
            if rng.random() < 0.5:
                pair = SyntheticPair(clean_name_j, other_name, refs_clean, refs_other, video.prompt,
                                     label_clean_first, kind, video.name, params)
            else:
                label = "same" if kind in LABEL_PRESERVING else "B"
                pair = SyntheticPair(other_name, clean_name_j, refs_other, refs_clean, video.prompt,
                                     label, kind, video.name, params)
            pairs.append(pair)
    return pairs, video_store, ref_store


def read_source_videos(path: Path) -> list[SourceVideo]:
    """Good videos listed in a JSONL file: {"video": path, "refs": [paths] or "a;b", "prompt": str,
    "boxes": (optional) [[[x0, y0, x1, y1] per frame] per person] or a path to such a JSON file}.
    Boxes are in the video's pixels, people back to front."""
    from idgrpo import media
    from idgrpo.reward.data import PairDataError, _split_refs

    videos = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
                video_path = path.parent / row["video"]
                refs = [path.parent / r for r in _split_refs(row["refs"], where)]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PairDataError(f"{where}: expected {{'video', 'refs', 'prompt', 'boxes'?}}: {e}") from e
            for p in [video_path, *refs]:
                if not p.exists():
                    raise PairDataError(f"{where}: {p} does not exist")
            frames = media.read_video(video_path)
            boxes = row.get("boxes")
            if isinstance(boxes, str):
                boxes = json.loads((path.parent / boxes).read_text())
            if boxes is not None:
                boxes = torch.tensor(boxes, dtype=torch.int64)
                if boxes.ndim != 3 or boxes.shape[1:] != (frames.shape[0], 4) or boxes.shape[0] != len(refs):
                    raise PairDataError(f"{where}: boxes must be (people={len(refs)}, frames={frames.shape[0]}, 4),"
                                        f" got {tuple(boxes.shape)}")
            videos.append(SourceVideo(f"v{number}_{video_path.stem}", frames,
                                      [media.read_image(r) for r in refs], str(row.get("prompt", "")), boxes))
    if not videos:
        raise PairDataError(f"{path}: no source video")
    return videos


@dataclass
class SynthPairsConfig:
    out: Path = Path("runs/synth_pairs")
    """Output folder: videos/, refs/, pairs.jsonl, pairs.csv, manifest.jsonl."""
    source: Path | None = None
    """JSONL of good videos (see `read_source_videos`); when omitted, the synthetic world makes them."""
    num_videos: int = 200
    """World videos to make (ignored with --source)."""
    frame_size: int = 32
    """World frame side in pixels."""
    num_frames: int = 9
    """World frames per video."""
    num_people: int = 2
    """World people per video (2 or 3)."""
    world_seed: int = 0
    """Seed of the world (identities, paths, backgrounds)."""
    pairs_per_video: int = 11
    """Pairs made from each good video (distinct kinds first, then kinds drawn at random)."""
    kinds: tuple[str, ...] = IDENTITY_BREAKING + ("mismatch",) + LABEL_PRESERVING
    """Distortions for videos with boxes (identity-breaking ones are skipped for videos without)."""
    box_free_kinds: tuple[str, ...] = BOX_FREE + LABEL_PRESERVING
    """Distortions for videos without boxes (temporal shuffle and flicker need no boxes; add them to
    --kinds to use them on boxed videos too)."""
    both_shift_probability: float = 0.25
    """Chance that a non-tie pair gets the same global colour shift on both videos."""
    video_suffix: str = ".mp4"
    """Container for written videos (.mp4, .webm, .gif via idgrpo.media)."""
    fps: int = 8
    """Frame rate of written videos."""
    seed: int = 0
    """Seed of the distortions."""

    def __post_init__(self):
        if self.num_videos < 2:
            raise UsageError(f"--num-videos must be >= 2 (reference mismatches borrow another video's people), "
                             f"got {self.num_videos}")
        at_least(self, 1, "pairs_per_video", "fps")
        at_least(self, 24, "frame_size")  # the world's smallest frame
        within(self, "num_frames", 2, 64)
        one_of(self, "num_people", (2, 3))
        within(self, "both_shift_probability", 0.0, 1.0)
        one_of(self, "video_suffix", (".mp4", ".webm", ".gif"))
        within(self, "seed", 0, 2**32 - 1)
        within(self, "world_seed", 0, 2**32 - 1)
        known = IDENTITY_BREAKING + LABEL_PRESERVING + BOX_FREE
        for name in ("kinds", "box_free_kinds"):
            kinds = getattr(self, name)
            if not kinds:
                raise UsageError(f"{flag(name)} needs at least one distortion kind")
            unknown = [k for k in kinds if k not in known]
            if unknown:
                raise UsageError(f"{flag(name)}: unknown distortion kind(s) {unknown}; choose from {list(known)}")


def world_source_videos(config: SynthPairsConfig) -> list[SourceVideo]:
    from idgrpo.synth import World, WorldConfig

    world = World(WorldConfig(frame_size=config.frame_size, num_frames=config.num_frames,
                              num_people=config.num_people, seed=config.world_seed))
    videos = []
    for i in range(config.num_videos):
        scene = world.scene(i)
        videos.append(SourceVideo(f"s{i:05d}", scene.frames, scene.references, scene.prompt, scene.boxes))
    return videos


def synth_pairs(config: Annotated[SynthPairsConfig, tyro.conf.arg(name="")]) -> int:
    """Make labelled identity preference pairs from good videos by synthetic distortions.

    Usage:
        idgrpo synth-pairs --out runs/pairs --num-videos 200            # from the synthetic world
        idgrpo synth-pairs --out runs/pairs --source good_videos.jsonl  # from your own videos (+ boxes)

    Writes videos/, refs/, pairs.jsonl and pairs.csv (the format of `idgrpo.reward.data`) and
    manifest.jsonl (every pair with its distortion, strength and parameters).
    """
    from tqdm import tqdm

    from idgrpo import media

    videos = read_source_videos(config.source) if config.source else world_source_videos(config)
    pairs, video_store, ref_store = make_pairs(videos, kinds=tuple(config.kinds),
                                               pairs_per_video=config.pairs_per_video, seed=config.seed,
                                               both_shift_probability=config.both_shift_probability,
                                               box_free_kinds=tuple(config.box_free_kinds))
    out = Path(config.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "refs").mkdir(parents=True, exist_ok=True)
    for name, image in ref_store.items():
        media.write_image(out / "refs" / f"{name}.png", image)
    for name, frames in tqdm(video_store.items(), desc="synth-pairs: writing videos", leave=False):
        media.write_video(out / "videos" / f"{name}{config.video_suffix}", frames, fps=config.fps)
    if config.source is None:
        boxes = {v.name: v.boxes.tolist() for v in videos}
        (out / "boxes.json").write_text(json.dumps(boxes))
    video_path = lambda n: f"videos/{n}{config.video_suffix}"
    ref_paths = lambda names: ";".join(f"refs/{n}.png" for n in names)
    rows = [{"video_a": video_path(p.video_a), "video_b": video_path(p.video_b),
             "refs_a": ref_paths(p.refs_a), "refs_b": ref_paths(p.refs_b), "prompt": p.prompt,
             "label": p.label, "group": p.group, "kind": p.kind} for p in pairs]
    with (out / "pairs.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with (out / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "manifest.jsonl").open("w") as f:
        for row, p in zip(rows, pairs):
            f.write(json.dumps({**row, "distortion": p.kind, "strength": p.params.get("strength"),
                                "params": p.params}) + "\n")
    counts = {k: sum(p.kind == k for p in pairs) for k in dict.fromkeys(p.kind for p in pairs)}
    print(f"synth-pairs: {len(pairs)} pairs from {len(videos)} videos -> {out}/pairs.jsonl  {counts}")
    return 0
