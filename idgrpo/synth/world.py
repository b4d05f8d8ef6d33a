"""A tiny synthetic multi-person world: seeded person-like sprites walking across small frames.

It stands in for real multi-human videos wherever a test, the reward tutorial or `idgrpo demo`
needs data without downloads. Everything is exact and deterministic per seed:

- `make_identity(seed, frame_size)`: a person-like sprite (head shape, skin, hair, shirt and
  pants colours, shirt markings, body width/height) drawn from `seed`;
- `World(config).scene(index)`: a video of 2 (or 3) people moving along smooth paths that cross,
  so nearer people occlude farther ones, with the exact per-person box of every frame and one
  reference image per person (the identity alone on `REFERENCE_BACKGROUND`).

Coordinates: boxes are int64 `(x0, y0, x1, y1)` with exclusive ends, in frame pixels; people are
listed back to front (person p is drawn over persons < p), which is what lets the oracle
(`idgrpo.synth.oracle`) know which pixels of a person are hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# The plain backdrop of reference images. Sprite pixels never take this exact colour, so a
# reference's sprite mask is simply "pixels that differ from it".
REFERENCE_BACKGROUND = (128, 128, 128)

MARKINGS = ("plain", "horizontal stripes", "vertical stripes", "dots", "checks", "diagonal stripes", "belt")
HEADS = ("round", "square")

# Named, well separated colours: shirts and pants pick from these, prompts name them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 220, 40), "green": (40, 170, 60),
    "teal": (20, 160, 160), "blue": (40, 70, 220), "purple": (140, 50, 200), "pink": (240, 120, 190),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (120, 70, 30), "navy": (20, 30, 100),
}
SKINS = ((250, 215, 180), (225, 180, 140), (190, 140, 100), (140, 95, 60), (95, 60, 40))
HAIRS = ((20, 15, 10), (90, 55, 25), (200, 160, 70), (160, 40, 20), (200, 200, 200))


@dataclass(frozen=True)
class Identity:
    """One person's look. `sprite` (h, w, 3) uint8 and `mask` (h, w) bool are the rendered person."""

    seed: int
    shirt: str
    pants: str
    marking: str
    marking_colour: str
    head: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    sprite: np.ndarray = field(repr=False, compare=False)
    mask: np.ndarray = field(repr=False, compare=False)

    def describe(self) -> str:
        marks = "" if self.marking == "plain" else f" with {self.marking_colour} {self.marking}"
        return f"a person with a {self.head} head in a {self.shirt} shirt{marks} and {self.pants} trousers"


def _sprite_size(frame_size: int, rng: np.random.Generator) -> tuple[int, int]:
    height = int(round(frame_size * rng.uniform(0.50, 0.62)))
    width = int(round(frame_size * rng.uniform(0.28, 0.36)))
    return max(height, 10), max(width, 6)


def make_identity(seed: int, frame_size: int = 32) -> Identity:
    """Draw one identity from `seed`; its sprite is sized for frames of `frame_size` pixels."""
    rng = np.random.default_rng([seed, 7919])
    names = list(PALETTE)
    shirt, pants, marking_colour = rng.choice(names, size=3, replace=False)
    marking = MARKINGS[rng.integers(len(MARKINGS))]
    head = HEADS[rng.integers(len(HEADS))]
    skin = SKINS[rng.integers(len(SKINS))]
    hair = HAIRS[rng.integers(len(HAIRS))]
    h, w = _sprite_size(frame_size, rng)
    sprite = np.zeros((h, w, 3), np.int32)
    mask = np.zeros((h, w), bool)
    head_h = max(3, int(round(h * 0.28)))
    torso_h = max(3, int(round(h * 0.40)))
    head_w = max(3, int(round(w * 0.6)))
    hx0 = (w - head_w) // 2
    yy, xx = np.mgrid[0:head_h, 0:head_w]
    if head == "round":
        cy, cx = (head_h - 1) / 2, (head_w - 1) / 2
        inside = ((yy - cy) / (head_h / 2)) ** 2 + ((xx - cx) / (head_w / 2)) ** 2 <= 1.05
    else:
        inside = np.ones((head_h, head_w), bool)
    face = np.where(yy[..., None] < max(1, head_h // 3), np.array(hair), np.array(skin))
    sprite[:head_h, hx0:hx0 + head_w][inside] = face[inside]
    mask[:head_h, hx0:hx0 + head_w] = inside
    # Torso: shirt with markings.
    ty, tx = np.mgrid[0:torso_h, 0:w]
    pattern = {
        "plain": np.zeros_like(ty, bool),
        "horizontal stripes": ty % 3 == 1,
        "vertical stripes": tx % 3 == 1,
        "dots": (ty % 3 == 1) & (tx % 3 == 1),
        "checks": ((ty // 2) + (tx // 2)) % 2 == 0,
        "diagonal stripes": (ty + tx) % 4 < 2,
        "belt": ty >= torso_h - 2,
    }[marking]
    torso = np.where(pattern[..., None], np.array(PALETTE[marking_colour]), np.array(PALETTE[shirt]))
    sprite[head_h:head_h + torso_h] = torso
    mask[head_h:head_h + torso_h] = True
    # Legs: two trouser legs with a gap.
    gap = max(1, w // 5)
    leg_w = (w - gap) // 2
    for x0 in (0, w - leg_w):
        sprite[head_h + torso_h:, x0:x0 + leg_w] = PALETTE[pants]
        mask[head_h + torso_h:, x0:x0 + leg_w] = True
    # Keep sprite pixels off the reference backdrop colour (see REFERENCE_BACKGROUND).
    clash = np.all(sprite == np.array(REFERENCE_BACKGROUND), axis=-1) & mask
    sprite[clash] += 1
    sprite[~mask] = 0
    return Identity(seed, str(shirt), str(pants), marking, str(marking_colour), head, skin, hair,
                    sprite.astype(np.uint8), mask)


def render_reference(identity: Identity, size: int, grid: int = 1) -> torch.Tensor:
    """The identity alone, centred on the plain reference backdrop: uint8 (size, size, 3). The sprite's top-left
    corner is rounded down to a multiple of `grid` (see `WorldConfig.grid`)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = REFERENCE_BACKGROUND
    h, w = identity.mask.shape
    y0, x0 = (size - h) // 2 // grid * grid, (size - w) // 2 // grid * grid
    region = image[y0:y0 + h, x0:x0 + w]
    region[identity.mask] = identity.sprite[identity.mask]
    return torch.from_numpy(image)


def render_frames(identities: list[Identity], positions: np.ndarray, background: np.ndarray) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Paint people back to front over `background` (H, W, 3) uint8 at integer top-left
    `positions` (P, T, 2) as (x, y). Returns frames uint8 (T, H, W, 3) and boxes int64 (P, T, 4)."""
    num_people, num_frames, _ = positions.shape
    frames = np.repeat(background[None], num_frames, axis=0).copy()
    boxes = np.zeros((num_people, num_frames, 4), np.int64)
    for p, identity in enumerate(identities):
        h, w = identity.mask.shape
        for t in range(num_frames):
            x, y = positions[p, t]
            region = frames[t, y:y + h, x:x + w]
            region[identity.mask] = identity.sprite[identity.mask]
            boxes[p, t] = (x, y, x + w, y + h)
    return torch.from_numpy(frames), torch.from_numpy(boxes)


@dataclass
class WorldConfig:
    frame_size: int = 32
    """Square frame side in pixels (>= 24)."""
    num_frames: int = 9
    """Frames per video (9 to 17 keeps the demo fast)."""
    num_people: int = 2
    """People per video: 2 or 3."""
    population: int = 48
    """Distinct identities the scenes draw from."""
    seed: int = 0
    """Everything (identities, paths, backgrounds) is a function of this seed."""
    grid: int = 1
    """Sprite top-left corners (in scenes and references) sit on multiples of this many pixels. 1: anywhere.
    `idgrpo demo` sets its latent's pixel stride, so a person's pixels fall into latent cells the same way in every
    frame and in the reference (people then move in steps of `grid` pixels)."""

    def __post_init__(self):
        if self.frame_size < 24:
            raise ValueError(f"frame_size must be >= 24, got {self.frame_size}")
        if not 2 <= self.num_frames <= 64:
            raise ValueError(f"num_frames must be in [2, 64], got {self.num_frames}")
        if self.num_people not in (1, 2, 3):
            raise ValueError(f"num_people must be 1, 2 or 3, got {self.num_people}")
        if self.population < self.num_people:
            raise ValueError(f"population ({self.population}) must be >= num_people ({self.num_people})")
        if not 1 <= self.grid <= self.frame_size // 4:
            raise ValueError(f"grid must be in [1, frame_size / 4], got {self.grid}")


@dataclass
class Scene:
    """One video of the world. frames uint8 (T, H, W, 3); boxes int64 (P, T, 4) back to front;
    references: P images uint8 (S, S, 3); identity_ids index `World.identities`."""

    frames: torch.Tensor
    boxes: torch.Tensor
    references: list[torch.Tensor]
    identity_ids: list[int]
    prompt: str


class World:
    """A seeded population of identities and an endless, deterministic supply of scenes."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        c = self.config
        self.identities = [make_identity(c.seed * 100_003 + i, c.frame_size) for i in range(c.population)]

    def reference(self, identity_id: int) -> torch.Tensor:
        return render_reference(self.identities[identity_id], self.config.frame_size, self.config.grid)

    def background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.config.frame_size
        top, bottom = rng.uniform(60, 200, size=(2, 3))
        # Muted colours (pulled toward grey) so people stand out from the backdrop.
        top, bottom = 0.5 * top + 0.5 * top.mean(), 0.5 * bottom + 0.5 * bottom.mean()
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]
        image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).copy()
        horizon = int(size * rng.uniform(0.55, 0.75))
        image[horizon:] *= 0.8
        return np.clip(image, 0, 255).astype(np.uint8)

    def paths(self, identities: list[Identity], rng: np.random.Generator) -> np.ndarray:
        """Smooth paths inside the frame: people walk toward and past each other (so they cross
        and occlude), with a gentle vertical sway. Returns int64 (P, T, 2) top-left (x, y)."""
        c = self.config
        t = np.linspace(0.0, 1.0, c.num_frames)
        positions = np.zeros((len(identities), c.num_frames, 2), np.int64)
        first_left_to_right = bool(rng.integers(2))
        for p, identity in enumerate(identities):
            h, w = identity.mask.shape
            max_x, max_y = c.frame_size - w, c.frame_size - h
            left_to_right = (p % 2 == 0) == first_left_to_right
            start, end = rng.uniform(0.0, 0.3) * max_x, rng.uniform(0.7, 1.0) * max_x
            if not left_to_right:
                start, end = end, start
            base_y = (p / max(1, len(identities) - 1) * 0.6 + rng.uniform(0.1, 0.3)) * max_y
            sway = rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * (rng.uniform(0.5, 1.0) * t + rng.uniform()))
            x = start + (end - start) * (3 * t**2 - 2 * t**3)  # eased start and stop
            y = base_y + sway
            g = c.grid
            positions[p, :, 0] = np.clip(np.round(x / g) * g, 0, max_x // g * g)
            positions[p, :, 1] = np.clip(np.round(y / g) * g, 0, max_y // g * g)
        return positions

    def scene(self, index: int) -> Scene:
        """Scene `index` (deterministic for this world's seed)."""
        c = self.config
        rng = np.random.default_rng([c.seed, index, 104729])
        ids = [int(i) for i in rng.choice(c.population, size=c.num_people, replace=False)]
        identities = [self.identities[i] for i in ids]
        frames, boxes = render_frames(identities, self.paths(identities, rng), self.background(rng))
        words = {1: "one person", 2: "two people", 3: "three people"}[len(ids)]
        prompt = f"{words} walking: " + "; ".join(identity.describe() for identity in identities)
        return Scene(frames, boxes, [self.reference(i) for i in ids], ids, prompt)
