"""Each synthetic distortion changes what it should and only that (checked with the world's boxes),
and pair generation is seeded, labelled and recorded."""

import pytest
import torch

from idgrpo.reward import distortions as D
from idgrpo.synth import World, WorldConfig, oracle_consistency
from idgrpo.synth.oracle import sprite_from_reference


@pytest.fixture(scope="module")
def scene():
    world = World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=24, seed=11))
    # A scene where the two people overlap in some frames but not in all.
    for i in range(50):
        s = world.scene(i)
        inside = D.boxes_mask(s.boxes, 32, 32)
        overlap = (inside[0] & inside[1]).flatten(1).any(1)
        if 0 < int(overlap.sum()) < 5:
            return s
    raise AssertionError("no suitable scene")


def _outside(boxes, people, height=32, width=32):
    """(T, H, W) True outside the boxes of `people`."""
    return ~D.boxes_mask(boxes[list(people)], height, width).any(0)


def test_background_estimate_exact_on_world(scene):
    background = D.estimate_background(scene.frames, scene.boxes)
    covered = D.boxes_mask(scene.boxes, 32, 32).any(0)  # (T, H, W)
    for t in range(scene.frames.shape[0]):
        free = ~covered[t]
        assert torch.equal(background[free], scene.frames[t][free].float())
    # Person pixels are found: all of the front person's sprite, nothing outside its box.
    mask = D.person_mask(scene.frames, scene.boxes, 1)
    sprite_pixels = int(sprite_from_reference(scene.references[1])[1].sum())
    assert int(mask[0].sum()) >= 0.9 * sprite_pixels
    assert not (mask & _outside(scene.boxes, [1])).any()


@pytest.mark.parametrize("name", ["drift", "recolour", "blend", "remove", "clone"])
def test_single_person_edits_stay_in_that_box(scene, name):
    f, b = scene.frames, scene.boxes
    person, other = 1, 0
    video = {
        "drift": lambda: D.drift_person(f, b, person, 0.9),
        "recolour": lambda: D.recolour_person(f, b, person, 0.9),
        "blend": lambda: D.blend_person(f, b, person, other, 0.7),
        "remove": lambda: D.remove_person(f, b, person),
        "clone": lambda: D.clone_person(f, b, other, person),
    }[name]()
    assert video.dtype == torch.uint8 and video.shape == f.shape
    outside = _outside(b, [person])
    assert torch.equal(video[outside], f[outside])  # nothing outside the edited person's box changes
    score = oracle_consistency(video, b, scene.references)
    assert score.per_person[person] < 0.85  # the edited identity is broken ...
    assert score.per_person[other] > 0.9  # ... the other one is (nearly) untouched
    if name == "drift":  # gradual: frame 0 untouched, the last frame changed most
        assert torch.equal(video[0], f[0])
        changed = (video != f).flatten(1).any(1)
        assert changed[-1] and score.per_frame[person, -1] < score.per_frame[person, 1]
    if name == "recolour":  # constant: every frame changed by the same rotation
        assert (video != f).flatten(1).any(1).all()
        spread = score.per_frame[person][~score.per_frame[person].isnan()]
        assert spread.max() - spread.min() < 0.15


def test_recolour_is_a_channel_rotation_of_the_person_pixels(scene):
    f, b = scene.frames, scene.boxes
    assert torch.equal(D.recolour_person(f, b, 0, 0.0), f)
    full = D.recolour_person(f, b, 0, 1.0)
    mask = D.person_mask(f, b, 0)
    assert torch.equal(full[mask], f[mask][:, [1, 2, 0]])
    assert torch.equal(full[~mask], f[~mask])
    half = D.recolour_person(f, b, 0, 0.5).float()
    expected = (0.5 * f.float() + 0.5 * f.float()[..., [1, 2, 0]]).round()
    assert torch.equal(half[mask], expected[mask])


def test_swap_changes_both_people_after_the_start_only(scene):
    f, b = scene.frames, scene.boxes
    video = D.swap_people(f, b, 0, 1, start_frame=4)
    assert torch.equal(video[:4], f[:4])
    outside = _outside(b, [0, 1])
    assert torch.equal(video[outside], f[outside])
    per_frame = oracle_consistency(video, b, scene.references).per_frame
    late = per_frame[:, 4:]
    assert torch.nanmean(late) < 0.6 and torch.nansum(per_frame[:, :4] < 1) == 0


def test_label_preserving_distortions(scene):
    f, b = scene.frames, scene.boxes
    shifted = D.photometric_shift(f, 1.1, (5.0, -3.0, 0.0))
    expected = (f.float() * 1.1 + torch.tensor([5.0, -3.0, 0.0])).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(shifted, expected)
    cropped, new_boxes = D.small_crop(f, b, 1, 2, 2, 1)
    assert cropped.shape == f.shape and new_boxes.shape == b.shape
    assert (new_boxes[..., 2] - new_boxes[..., 0] >= b[..., 2] - b[..., 0]).all()  # enlarged by the zoom
    assert oracle_consistency(cropped, new_boxes, scene.references).video > 0.6
    reencoded = D.reencode(f)
    assert reencoded.shape == f.shape and (reencoded.float() - f.float()).abs().mean() < 20
    with pytest.raises(ValueError, match="do not fit"):
        D.small_crop(f, b, 20, 0, 20, 0)


def test_box_free_distortions(scene):
    f = scene.frames
    g = torch.Generator().manual_seed(0)
    shuffled, order = D.temporal_shuffle(f, g)
    assert not torch.equal(order, torch.arange(9)) and torch.equal(shuffled, f[order])
    flickered, gains = D.flicker(f, 0.3, g)
    assert ((gains - 1).abs() > 0).any() and ((gains - 1).abs() <= 0.3 + 1e-6).all()
    steady = gains == 1
    assert torch.equal(flickered[steady], f[steady])
    with pytest.raises(ValueError, match="needs per-person boxes"):
        D.remove_person(f, None, 0)
    with pytest.raises(ValueError, match="out of range"):
        D.remove_person(f, scene.boxes, 5)


def _sources(n=3):
    world = World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=24, seed=2))
    return [D.SourceVideo(f"s{i}", s.frames, s.references, s.prompt, s.boxes)
            for i, s in ((i, world.scene(i)) for i in range(n))]


def test_make_pairs_is_seeded_labelled_and_recorded():
    kinds = ("swap", "drift", "remove", "mismatch", "shuffle", "photometric", "crop")
    sources = _sources()
    pairs, videos, refs = D.make_pairs(sources, kinds=kinds, pairs_per_video=7, seed=5)
    again, videos2, _ = D.make_pairs(sources, kinds=kinds, pairs_per_video=7, seed=5)
    assert [(p.video_a, p.video_b, p.label, p.params) for p in pairs] == \
        [(p.video_a, p.video_b, p.label, p.params) for p in again]
    assert all(torch.equal(videos[k], videos2[k]) for k in videos)
    assert {p.kind for p in pairs} == set(kinds)  # every kind once per video first
    for p in pairs:
        assert "strength" in p.params
        if p.kind in D.LABEL_PRESERVING:
            assert p.label == "same"
        else:
            clean_side = "A" if "_clean" in p.video_a and p.refs_a == [f"{p.group}_p0", f"{p.group}_p1"] else "B"
            if p.kind == "mismatch":
                clean_side = "A" if p.refs_a == [f"{p.group}_p0", f"{p.group}_p1"] else "B"
                assert p.video_a == p.video_b and p.refs_a != p.refs_b
            assert p.label == clean_side, p
    assert {p.label for p in pairs} >= {"A", "B", "same"}
    without_boxes = [D.SourceVideo(s.name, s.frames, s.references, s.prompt, None) for s in sources]
    pairs_nb, _, _ = D.make_pairs(without_boxes, kinds=kinds, pairs_per_video=4, seed=5)
    assert not {p.kind for p in pairs_nb} & set(D.IDENTITY_BREAKING)
