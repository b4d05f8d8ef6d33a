"""Identity preference pairs: the file format, its validation, and loading into tensors.

Format: a `.csv` (with a header) or `.jsonl` file, one pair per row/line:

    column     meaning
    video_a    path of video A (any format `idgrpo.media.read_video` reads: mp4, webm, gif, a folder of frames)
    video_b    path of video B
    refs       reference images of the people, `;`-separated (1..N paths), shared by A and B
    refs_a     (instead of `refs`) references for A only ...
    refs_b     ... and for B only: both sides must name the same number of people
    prompt     the text prompt (may be empty)
    label      `A` (A is better), `B` (B is better) or `same` (a tie)
    group      (optional) rows with the same group land in the same split (e.g. one source video)
    kind       (optional) what made the pair (a distortion name), for per-kind evaluation

In JSONL, `refs`/`refs_a`/`refs_b` may also be lists. Relative paths are relative to the file's
folder. Example CSV:

    video_a,video_b,refs,prompt,label
    videos/s0_clean.mp4,videos/s0_swap.mp4,refs/p0.png;refs/p1.png,two people walking,A

Bad rows (a missing column, a missing or unreadable file, a label outside {A, B, same}, different
numbers of references for A and B, a duplicate pair) raise `PairDataError` naming the file and
line, unless the caller asks to skip bad rows; skipped rows are counted and reported, never
dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from idgrpo.errors import UsageError
from idgrpo.reward.losses import PREFER_A, PREFER_B, TIE

LABELS = {"a": PREFER_A, "b": PREFER_B, "same": TIE}
LABEL_NAMES = {PREFER_A: "A", PREFER_B: "B", TIE: "same"}


class PairDataError(UsageError):
    """A bad preference file or row; the message names the file and line (a usage error: `idgrpo` prints it on
    one line and exits 2)."""


@dataclass
class PreferencePair:
    video_a: Path
    video_b: Path
    refs_a: list[Path]
    refs_b: list[Path]
    prompt: str
    label: int
    """1 (A better), -1 (B better), 0 (same): the loss module's codes."""
    group: str
    kind: str
    where: str
    """`file:line`, for error messages."""


@dataclass
class SkipReport:
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.skipped += 1
        self.reasons.append(reason)


def _split_refs(value, where: str) -> list[str]:
    if isinstance(value, list):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(";")]
    else:
        raise PairDataError(f"{where}: references must be a `;`-separated string or a list, got {type(value).__name__}")
    items = [v for v in items if v]
    if not items:
        raise PairDataError(f"{where}: no reference image given (need 1..N paths)")
    return items


def _rows(path: Path):
    """(line number, dict) for each data row of a CSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise PairDataError(f"{path}: empty file (expected a CSV header)")
            for row in reader:
                yield reader.line_num, row
    elif suffix in (".jsonl", ".json"):
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, PairDataError(f"{path}:{number}: not valid JSON ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    yield number, PairDataError(f"{path}:{number}: expected a JSON object per line")
                    continue
                yield number, row
    else:
        raise PairDataError(f"{path}: unsupported pair file suffix {suffix!r}; use .csv or .jsonl")


def _parse_row(row: dict, path: Path, number: int, check_files: bool) -> PreferencePair:
    where = f"{path}:{number}"
    for column in ("video_a", "video_b", "label"):
        if row.get(column) in (None, ""):
            raise PairDataError(f"{where}: missing column {column!r}")
    if row.get("refs") not in (None, ""):
        refs_a = refs_b = _split_refs(row["refs"], where)
    elif row.get("refs_a") not in (None, "") and row.get("refs_b") not in (None, ""):
        refs_a, refs_b = _split_refs(row["refs_a"], where), _split_refs(row["refs_b"], where)
    else:
        raise PairDataError(f"{where}: missing column 'refs' (or both 'refs_a' and 'refs_b')")
    if len(refs_a) != len(refs_b):
        raise PairDataError(f"{where}: A has {len(refs_a)} references but B has {len(refs_b)}: "
                            "both sides must show the same people")
    label = LABELS.get(str(row["label"]).strip().lower())
    if label is None:
        raise PairDataError(f"{where}: label {row['label']!r} is not one of A, B, same")
    base = path.parent
    resolve = lambda p: (base / str(p)).resolve() if not Path(str(p)).is_absolute() else Path(str(p))
    video_a, video_b = resolve(row["video_a"]), resolve(row["video_b"])
    refs_a, refs_b = [resolve(r) for r in refs_a], [resolve(r) for r in refs_b]
    if check_files:
        for what, p in [("video_a", video_a), ("video_b", video_b)] + [("reference", r) for r in refs_a + refs_b]:
            if not p.exists():
                raise PairDataError(f"{where}: {what} {p} does not exist")
    group = str(row.get("group") or row["video_a"])
    return PreferencePair(video_a, video_b, refs_a, refs_b, str(row.get("prompt") or ""), label, group,
                          str(row.get("kind") or ""), where)


def read_pairs(path: str | Path, *, skip_bad_rows: bool = False, check_files: bool = True
               ) -> tuple[list[PreferencePair], SkipReport]:
    """Parse and validate a pair file. Returns (pairs, skip report); raises PairDataError on the
    first bad row unless `skip_bad_rows`, and when no valid pair remains."""
    path = Path(path)
    if not path.exists():
        raise PairDataError(f"{path}: pair file does not exist")
    pairs: list[PreferencePair] = []
    report = SkipReport()
    seen: dict[tuple, str] = {}
    for number, row in _rows(path):
        try:
            if isinstance(row, PairDataError):
                raise row
            pair = _parse_row(row, path, number, check_files)
            key = (pair.video_a, pair.video_b, tuple(pair.refs_a), tuple(pair.refs_b), pair.prompt)
            if key in seen:
                raise PairDataError(f"{pair.where}: duplicate of the pair at {seen[key]}")
            seen[key] = pair.where
            pairs.append(pair)
        except PairDataError as e:
            if not skip_bad_rows:
                raise
            report.add(str(e))
    if not pairs:
        skipped = f" ({report.skipped} bad rows skipped)" if report.skipped else ""
        raise PairDataError(f"{path}: no valid pair{skipped}")
    return pairs, report


def split_pairs(pairs: list[PreferencePair], held_out_fraction: float, seed: int = 0
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic split by `group` (a hash of seed and group), so that pairs made from one
    source video never straddle the splits. Raises when either split comes out empty."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    def held_out(group: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < held_out_fraction
    train = [p for p in pairs if not held_out(p.group)]
    val = [p for p in pairs if held_out(p.group)]
    if not train or not val:
        empty = "train" if not train else "held-out"
        raise PairDataError(f"splitting {len(pairs)} pairs in {len({p.group for p in pairs})} groups with "
                            f"held_out_fraction={held_out_fraction} left an empty {empty} split: "
                            "add more groups or change the fraction")
    return train, val


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> uint8 (..., size, size, 3) (bilinear with antialiasing; aspect not kept)."""
    lead = frames.shape[:-3]
    if frames.shape[-3:-1] == (size, size):
        return frames
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(*lead, size, size, 3)


@dataclass
class PairTensors:
    """A loaded split, ready for training. References are padded to `max_people` with `ref_mask`."""

    frames_a: torch.Tensor  # (N, T, S, S, 3) uint8
    frames_b: torch.Tensor  # (N, T, S, S, 3) uint8
    refs_a: torch.Tensor  # (N, P, S, S, 3) uint8
    refs_b: torch.Tensor  # (N, P, S, S, 3) uint8
    ref_mask: torch.Tensor  # (N, P) bool
    labels: torch.Tensor  # (N,) int64
    kinds: list[str]
    prompts: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]


def load_pairs(pairs: list[PreferencePair], *, num_frames: int = 5, image_size: int = 32,
               skip_bad_rows: bool = False, report: SkipReport | None = None) -> PairTensors:
    """Read every video (uniformly sampled to `num_frames`) and reference of `pairs` (each file once),
    resize to `image_size`, and stack. Unreadable files raise PairDataError naming the row, or are
    counted in `report` and skipped when `skip_bad_rows`."""
    from idgrpo import media

    report = report if report is not None else SkipReport()
    cache: dict[tuple[Path, str], torch.Tensor] = {}

    def load(p: Path, what: str, where: str) -> torch.Tensor:
        key = (p, what)
        if key not in cache:
            try:
                if what == "video":
                    x = media.read_video(p, num_frames=num_frames)
                else:
                    x = media.read_image(p)
            except Exception as e:  # any decoder error: name the file and row
                raise PairDataError(f"{where}: cannot read {what} {p}: {e}") from e
            cache[key] = resize_frames(x, image_size)
        return cache[key]

    rows = []
    for pair in pairs:
        try:
            rows.append((pair, load(pair.video_a, "video", pair.where), load(pair.video_b, "video", pair.where),
                         [load(r, "image", pair.where) for r in pair.refs_a],
                         [load(r, "image", pair.where) for r in pair.refs_b]))
        except PairDataError as e:
            if not skip_bad_rows:
                raise
            report.add(str(e))
    if not rows:
        skipped = f" ({report.skipped} bad rows skipped)" if report.skipped else ""
        raise PairDataError(f"no readable pair left{skipped}")
    max_people = max(len(r[3]) for r in rows)
    n = len(rows)
    refs_a = torch.zeros(n, max_people, image_size, image_size, 3, dtype=torch.uint8)
    refs_b = torch.zeros_like(refs_a)
    ref_mask = torch.zeros(n, max_people, dtype=torch.bool)
    for i, (_, _, _, ra, rb) in enumerate(rows):
        refs_a[i, :len(ra)] = torch.stack(ra)
        refs_b[i, :len(rb)] = torch.stack(rb)
        ref_mask[i, :len(ra)] = True
    return PairTensors(
        frames_a=torch.stack([r[1] for r in rows]), frames_b=torch.stack([r[2] for r in rows]),
        refs_a=refs_a, refs_b=refs_b, ref_mask=ref_mask,
        labels=torch.tensor([r[0].label for r in rows], dtype=torch.int64),
        kinds=[r[0].kind for r in rows], prompts=[r[0].prompt for r in rows])
