"""Oracle identity consistency: how closely each person's pixels match their reference sprite.

The stand-in for face-similarity metrics in the synthetic world. It needs what the world knows
exactly: the per-person boxes of every frame (people listed back to front) and the reference
images (identity alone on `REFERENCE_BACKGROUND`). For each person and frame the reference sprite
is placed in the box (nearest-resized if the box has another size), pixels hidden by nearer people
are left out, and each remaining sprite pixel scores `max(0, 1 - mean|frame - sprite| / tolerance)`
(per-channel absolute difference in 0..255). A frame where less than `min_visible` of the person is
visible is skipped. Per person: mean over scored frames (0 when none is scored); per video: mean
over people. A clean world video scores exactly 1.0; swapping, drifting, blending, cloning or
removing a person lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idgrpo.synth.world import REFERENCE_BACKGROUND


@dataclass
class OracleScore:
    video: float
    """Mean over people of `per_person`."""
    per_person: torch.Tensor
    """(P,) mean over the person's scored frames."""
    per_frame: torch.Tensor
    """(P, T) per-frame scores, NaN where the person was (almost) hidden."""


def _sprite_mask(reference: torch.Tensor) -> torch.Tensor:
    mask = (reference != torch.tensor(REFERENCE_BACKGROUND, dtype=reference.dtype)).any(-1)
    if not mask.any():
        raise ValueError("reference image has no pixel off the reference background: no sprite to compare with")
    return mask


def _box_of(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).long()


def sprite_box(reference: torch.Tensor) -> torch.Tensor:
    """The int64 (x0, y0, x1, y1) box (exclusive ends) of the sprite in a reference image (h, w, 3) uint8: the
    pixels off `REFERENCE_BACKGROUND`."""
    return _box_of(_sprite_mask(reference))


def sprite_from_reference(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a reference image (h, w, 3) uint8 to its sprite: (sprite (h', w', 3) float, mask (h', w') bool)."""
    mask = _sprite_mask(reference)
    x0, y0, x1, y1 = _box_of(mask).tolist()
    return reference[y0:y1, x0:x1].float(), mask[y0:y1, x0:x1]


def place_sprite(sprite: torch.Tensor, mask: torch.Tensor, box: list[int], height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cropped sprite (h', w', 3) float with its mask (h', w') bool, nearest-resized to `box` (x0, y0, x1, y1) and
    clipped to a (height, width) frame: (frame-sized mask (H, W) bool, frame-sized sprite (H, W, 3) float)."""
    x0, y0, x1, y1 = box
    full = torch.zeros(height, width, dtype=torch.bool)
    placed = torch.zeros(height, width, 3)
    if x1 <= x0 or y1 <= y0:
        return full, placed
    if sprite.shape[:2] != (y1 - y0, x1 - x0):
        sprite = F.interpolate(sprite.permute(2, 0, 1)[None], size=(y1 - y0, x1 - x0),
                               mode="nearest")[0].permute(1, 2, 0)
        mask = F.interpolate(mask[None, None].float(), size=(y1 - y0, x1 - x0), mode="nearest")[0, 0] > 0.5
    # Clip the box to the frame; the sprite is cut the same way.
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 > cx0 and cy1 > cy0:
        full[cy0:cy1, cx0:cx1] = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        placed[cy0:cy1, cx0:cx1] = sprite[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return full, placed


def oracle_consistency(frames: torch.Tensor, boxes: torch.Tensor, references: list[torch.Tensor], *,
                       tolerance: float = 64.0, min_visible: float = 0.3) -> OracleScore:
    """frames uint8 (T, H, W, 3); boxes int (P, T, 4) (x0, y0, x1, y1) back to front; references: P
    images uint8 (h, w, 3). Returns per-frame, per-person and per-video scores in [0, 1]."""
    num_people, num_frames, _ = boxes.shape
    if len(references) != num_people:
        raise ValueError(f"{len(references)} references for {num_people} people")
    if frames.shape[0] != num_frames:
        raise ValueError(f"{frames.shape[0]} frames but boxes for {num_frames}")
    _, height, width, _ = frames.shape
    sprites = [sprite_from_reference(r.cpu()) for r in references]
    frames = frames.cpu().float()
    boxes = boxes.cpu().long()
    per_frame = torch.full((num_people, num_frames), float("nan"))
    for t in range(num_frames):
        # Frame-sized masks of each person's sprite, to know what nearer people hide.
        placed = [place_sprite(*sprites[p], boxes[p, t].tolist(), height, width) for p in range(num_people)]
        hidden = torch.zeros(height, width, dtype=torch.bool)
        for p in reversed(range(num_people)):  # front to back
            full, sprite = placed[p]
            visible = full & ~hidden
            hidden |= full
            total = full.sum()
            if total == 0 or visible.sum() < min_visible * total:
                continue
            diff = (frames[t][visible] - sprite[visible]).abs().mean(-1)  # (N,)
            per_frame[p, t] = (1 - diff / tolerance).clamp(min=0).mean()
    scored = ~per_frame.isnan()
    per_person = torch.where(scored, per_frame, 0.0).sum(1) / scored.sum(1).clamp(min=1)
    return OracleScore(float(per_person.mean()), per_person, per_frame)
