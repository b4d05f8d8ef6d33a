"""The preference pair format: parsing, loading with uniform frame sampling and resizing, and
clear errors (file and line) or counted skips for bad rows."""

import json
from pathlib import Path

import pytest
import torch

from idgrpo import media
from idgrpo.reward.data import PairDataError, load_pairs, read_pairs, resize_frames, split_pairs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    (root / "videos").mkdir()
    (root / "refs").mkdir()
    for i in range(3):
        # Frame t of video i is filled with the value 10 * t + i, so sampling is checkable.
        frames = torch.stack([torch.full((24, 40, 3), 10 * t + i, dtype=torch.uint8) for t in range(9)])
        media.write_video(root / "videos" / f"v{i}.gif", frames, fps=8)
        media.write_image(root / "refs" / f"r{i}.png", torch.full((20, 12, 3), 50 + i, dtype=torch.uint8))
    (root / "broken.gif").write_bytes(b"not a video")
    return root


def _write_csv(path: Path, rows: list[str], header="video_a,video_b,refs,prompt,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_and_jsonl_parse_to_the_same_pairs(files):
    csv_path = _write_csv(files / "p.csv", ["videos/v0.gif,videos/v1.gif,refs/r0.png;refs/r1.png,two people,A",
                                           "videos/v1.gif,videos/v2.gif,refs/r0.png;refs/r1.png,,same",
                                           "videos/v2.gif,videos/v0.gif,refs/r0.png;refs/r1.png,x,b"])
    jsonl = files / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"video_a": "videos/v0.gif", "video_b": "videos/v1.gif", "refs": ["refs/r0.png", "refs/r1.png"],
         "prompt": "two people", "label": "A"},
        {"video_a": "videos/v1.gif", "video_b": "videos/v2.gif", "refs_a": "refs/r0.png;refs/r1.png",
         "refs_b": "refs/r0.png;refs/r1.png", "prompt": "", "label": "same"},
        {"video_a": "videos/v2.gif", "video_b": "videos/v0.gif", "refs": "refs/r0.png;refs/r1.png",
         "prompt": "x", "label": "B"}]) + "\n")
    a, _ = read_pairs(csv_path)
    b, _ = read_pairs(jsonl)
    assert [p.label for p in a] == [1, 0, -1] == [p.label for p in b]
    assert [(p.video_a, p.refs_a, p.refs_b) for p in a] == [(p.video_a, p.refs_a, p.refs_b) for p in b]
    assert a[0].refs_a[1] == (files / "refs" / "r1.png").resolve()


def test_load_samples_uniformly_and_resizes(files):
    pairs, _ = read_pairs(_write_csv(files / "q.csv", ["videos/v0.gif,videos/v1.gif,refs/r0.png,p,A",
                                                       "videos/v2.gif,videos/v1.gif,refs/r0.png;refs/r2.png,p,B"]))
    t = load_pairs(pairs, num_frames=5, image_size=16)
    assert t.frames_a.shape == (2, 5, 16, 16, 3) and t.refs_a.shape == (2, 2, 16, 16, 3)
    assert t.ref_mask.tolist() == [[True, False], [True, True]]
    # Frames 0, 2, 4, 6, 8 of 9 (gif palette may shift values by a few levels).
    values = t.frames_a[0, :, 8, 8, 0].float()
    torch.testing.assert_close(values, torch.tensor([0.0, 20, 40, 60, 80]), atol=4, rtol=0)
    assert t.labels.tolist() == [1, -1]
    resized = resize_frames(torch.full((3, 10, 20, 3), 7, dtype=torch.uint8), 8)
    assert resized.shape == (3, 8, 8, 3) and (resized == 7).all()


@pytest.mark.parametrize("row, message", [
    ("videos/v0.gif,videos/missing.gif,refs/r0.png,p,A", r"q.csv:2: video_b .*missing.gif does not exist"),
    ("videos/v0.gif,videos/v1.gif,refs/nope.png,p,A", r"q.csv:2: reference .*nope.png does not exist"),
    ("videos/v0.gif,videos/v1.gif,refs/r0.png,p,C", r"q.csv:2: label 'C' is not one of A, B, same"),
    ("videos/v0.gif,videos/v1.gif,,p,A", r"q.csv:2: missing column 'refs'"),
    (",videos/v1.gif,refs/r0.png,p,A", r"q.csv:2: missing column 'video_a'"),
])
def test_bad_rows_name_file_and_line(files, row, message):
    path = _write_csv(files / "q.csv", [row])
    with pytest.raises(PairDataError, match=message):
        read_pairs(path)


def test_mismatched_refs_duplicates_unreadable_and_skips(files):
    header = "video_a,video_b,refs_a,refs_b,prompt,label"
    mismatched = _write_csv(files / "m.csv", ["videos/v0.gif,videos/v1.gif,refs/r0.png,refs/r0.png;refs/r1.png,p,A"],
                            header)
    with pytest.raises(PairDataError, match=r"m.csv:2: A has 1 references but B has 2"):
        read_pairs(mismatched)
    good = "videos/v0.gif,videos/v1.gif,refs/r0.png,p,A"
    dup = _write_csv(files / "d.csv", [good, "videos/v1.gif,videos/v2.gif,refs/r0.png,p,B", good])
    with pytest.raises(PairDataError, match=r"d.csv:4: duplicate of the pair at .*d.csv:2"):
        read_pairs(dup)
    pairs, report = read_pairs(dup, skip_bad_rows=True)
    assert len(pairs) == 2 and report.skipped == 1 and "duplicate" in report.reasons[0]
    unreadable = _write_csv(files / "u.csv", [good, "broken.gif,videos/v1.gif,refs/r0.png,p,A"])
    pairs, _ = read_pairs(unreadable)
    with pytest.raises(PairDataError, match=r"u.csv:3: cannot read video .*broken.gif"):
        load_pairs(pairs)
    report_skip = type(report)()
    loaded = load_pairs(pairs, skip_bad_rows=True, report=report_skip)
    assert len(loaded) == 1 and report_skip.skipped == 1
    all_bad = _write_csv(files / "b.csv", ["videos/v0.gif,videos/v1.gif,refs/r0.png,p,Z"])
    with pytest.raises(PairDataError, match=r"no valid pair \(1 bad rows skipped\)"):
        read_pairs(all_bad, skip_bad_rows=True)
    bad_json = files / "j.jsonl"
    bad_json.write_text('{"video_a": "videos/v0.gif"\n')
    with pytest.raises(PairDataError, match=r"j.jsonl:1: not valid JSON"):
        read_pairs(bad_json)
    with pytest.raises(PairDataError, match="does not exist"):
        read_pairs(files / "nothing.csv")


def test_split_by_group_and_empty_split_error(files):
    rows = [f"videos/v{i % 3}.gif,videos/v{(i + 1) % 3}.gif,refs/r{i % 3}.png,prompt {i},A" for i in range(12)]
    path = _write_csv(files / "s.csv", [r + f",g{i // 2}" for i, r in enumerate(rows)],
                      "video_a,video_b,refs,prompt,label,group")
    pairs, _ = read_pairs(path)
    train, val = split_pairs(pairs, 0.4, seed=1)
    assert len(train) + len(val) == 12 and train and val
    assert not {p.group for p in train} & {p.group for p in val}
    assert split_pairs(pairs, 0.4, seed=1)[1] == val  # deterministic
    with pytest.raises(PairDataError, match="empty held-out split"):
        split_pairs(pairs[:1], 0.01)
