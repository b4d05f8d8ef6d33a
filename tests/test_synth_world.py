"""The synthetic world: deterministic per seed, exact boxes, distinct identities, occlusions, and an
oracle that is 1 on clean videos and drops under every identity distortion."""

import numpy as np
import pytest
import torch

from idgrpo.reward import distortions as D
from idgrpo.synth import REFERENCE_BACKGROUND, World, WorldConfig, make_identity, oracle_consistency


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=24, seed=3))


def test_deterministic_per_seed_and_different_across_seeds(world):
    again = World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=24, seed=3))
    a, b = world.scene(5), again.scene(5)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.boxes, b.boxes) and a.prompt == b.prompt
    assert all(torch.equal(x, y) for x, y in zip(a.references, b.references))
    other = World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=24, seed=4)).scene(5)
    assert not torch.equal(a.frames, other.frames)
    assert not torch.equal(world.scene(6).frames, a.frames)


def test_shapes_boxes_exact_and_inside(world):
    scene = world.scene(0)
    assert scene.frames.shape == (9, 32, 32, 3) and scene.frames.dtype == torch.uint8
    assert scene.boxes.shape == (2, 9, 4) and len(scene.references) == 2
    front = len(scene.identity_ids) - 1
    identity = world.identities[scene.identity_ids[front]]
    for t in range(9):
        x0, y0, x1, y1 = scene.boxes[front, t].tolist()
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        # The front person is never hidden: its sprite pixels are exactly inside its box.
        region = scene.frames[t, y0:y1, x0:x1].numpy()
        assert np.array_equal(region[identity.mask], identity.sprite[identity.mask])


def test_three_people_and_3_frame_sizes():
    for size, frames, people in [(32, 9, 3), (48, 17, 2)]:
        scene = World(WorldConfig(frame_size=size, num_frames=frames, num_people=people, seed=1)).scene(2)
        assert scene.frames.shape == (frames, size, size, 3) and scene.boxes.shape == (people, frames, 4)
        assert oracle_consistency(scene.frames, scene.boxes, scene.references).video == 1.0


def test_identities_distinct_and_references_alone(world):
    sprites = [make_identity(s).sprite for s in range(12)]
    for i in range(12):
        for j in range(i + 1, 12):
            same_shape = sprites[i].shape == sprites[j].shape
            assert not (same_shape and np.array_equal(sprites[i], sprites[j]))
    ref = world.reference(0)
    identity = world.identities[0]
    off_background = (ref != torch.tensor(REFERENCE_BACKGROUND, dtype=torch.uint8)).any(-1)
    assert int(off_background.sum()) == int(identity.mask.sum())


def test_paths_cross_so_people_occlude(world):
    overlapping = 0
    for i in range(20):
        boxes = world.scene(i).boxes
        a, b = boxes[0], boxes[1]
        w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
        h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
        overlapping += int(((w * h) > 0).any())
        steps = (boxes[:, 1:, :2] - boxes[:, :-1, :2]).abs()
        assert steps.max() <= 6  # smooth: no teleporting between frames
    assert overlapping >= 5


def test_oracle_one_when_clean_and_drops_per_identity_distortion(world):
    for i in range(4):
        scene = world.scene(i)
        clean = oracle_consistency(scene.frames, scene.boxes, scene.references)
        assert clean.video == 1.0 and torch.equal(clean.per_person, torch.ones(2))
        f, b = scene.frames, scene.boxes
        distorted = {
            "swap": D.swap_people(f, b, 0, 1, 3),
            "drift": D.drift_person(f, b, 1, 0.8),
            "blend": D.blend_person(f, b, 0, 1, 0.6),
            "clone": D.clone_person(f, b, 0, 1),
            "remove": D.remove_person(f, b, 0),
        }
        for name, video in distorted.items():
            score = oracle_consistency(video, b, scene.references)
            assert score.video < 0.9, (i, name, score.video)
        # The person who is not touched keeps a high score.
        assert oracle_consistency(distorted["drift"], b, scene.references).per_person[0] > 0.9
        assert oracle_consistency(distorted["remove"], b, scene.references).per_person[0] < 0.5
        # Mismatched references also score low.
        wrong = [scene.references[0], world.reference((scene.identity_ids[1] + 1) % 24)]
        if scene.identity_ids[0] != (scene.identity_ids[1] + 1) % 24:
            assert oracle_consistency(f, b, wrong).per_person[1] < 0.9


def test_oracle_falls_as_the_recolour_strength_rises(world):
    # The demo's pretraining failure: the oracle must rank its strengths, or GRPO's target would be meaningless.
    for i in range(4):
        scene = world.scene(i)
        scores = [oracle_consistency(D.recolour_person(scene.frames, scene.boxes, 1, strength), scene.boxes,
                                     scene.references).per_person for strength in (0.0, 0.3, 0.6, 1.0)]
        hit = [float(s[1]) for s in scores]
        assert hit[0] == 1.0 and all(a > b for a, b in zip(hit, hit[1:], strict=False)), (i, hit)
        assert all(float(s[0]) > 0.9 for s in scores)  # the other person barely moves


def test_oracle_validates_inputs(world):
    scene = world.scene(0)
    with pytest.raises(ValueError, match="references"):
        oracle_consistency(scene.frames, scene.boxes, scene.references[:1])
    blank = torch.full((32, 32, 3), 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no sprite"):
        oracle_consistency(scene.frames, scene.boxes, [blank, blank])
    with pytest.raises(ValueError, match="num_people"):
        WorldConfig(num_people=4)


def test_grid_snaps_people_and_references_to_latent_cells():
    from idgrpo.synth.oracle import sprite_box

    for grid in (2, 4):
        world = World(WorldConfig(frame_size=32, num_frames=9, num_people=3, population=24, seed=7, grid=grid))
        for index in range(6):
            scene = world.scene(index)
            assert (scene.boxes[..., :2] % grid == 0).all()  # every top-left corner on the grid
            assert (scene.boxes[..., 2:] <= 32).all() and (scene.boxes[..., :2] >= 0).all()
            assert oracle_consistency(scene.frames, scene.boxes, scene.references).video == 1.0
            for reference in scene.references:
                assert (sprite_box(reference)[:2] % grid == 0).all()
    # grid=1 is the default and leaves the world as it was: some corner off every coarser grid.
    scenes = [World(WorldConfig(frame_size=32, num_frames=9, seed=7)).scene(i) for i in range(6)]
    assert any((s.boxes[..., :2] % 2 != 0).any() for s in scenes)
    with pytest.raises(ValueError, match="grid"):
        WorldConfig(frame_size=32, grid=16)
