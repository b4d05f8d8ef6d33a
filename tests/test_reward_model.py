"""The compact identity reward model: the reward interface, padding of people, save/load, presets."""

import pytest
import torch

import idgrpo.reward.model as model_module
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
from idgrpo.synth import World, WorldConfig

TINY = RewardModelConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2, parts=3)


@pytest.fixture(scope="module")
def scenes():
    world = World(WorldConfig(frame_size=32, num_frames=9, num_people=2, population=12, seed=5))
    return [world.scene(i) for i in range(3)]


def test_score_interface_shapes_and_prompts_ignored(scenes):
    torch.manual_seed(0)
    model = IdentityRewardModel(TINY).eval()
    frames = torch.stack([s.frames for s in scenes])  # (3, 9, 32, 32, 3) uint8
    refs = [s.references for s in scenes]
    r = model.score(frames, refs, ["a", "b", "c"])
    assert r.shape == (3,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    torch.testing.assert_close(model.score(frames, refs, ["x", "y", "z"]), r)
    # Batch invariance: scoring one video alone gives its score in the batch.
    torch.testing.assert_close(model.score(frames[1:2], refs[1:2], ["b"]), r[1:2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="references"):
        model.score(frames, refs[:2], ["a", "b"])


def test_padded_people_do_not_change_the_reward(scenes):
    torch.manual_seed(1)
    model = IdentityRewardModel(TINY).eval()
    s = scenes[0]
    frames = torch.stack([s.frames, s.frames])
    one = model.score(frames[:1], [s.references[:1]])
    mixed = model.score(frames, [s.references[:1], s.references])  # the first sample is padded to 2 people
    torch.testing.assert_close(mixed[:1], one, rtol=1e-4, atol=1e-5)
    out = model(torch.zeros(2, 5, 16, 16, 3), torch.zeros(2, 2, 16, 16, 3))
    assert out["per_frame"].shape == (2, 2, 5) and out["per_person"].shape == (2, 2)


def test_uses_the_kernel_attention_and_trains(monkeypatch, scenes):
    calls = []
    original = model_module.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "attention", counting)
    torch.manual_seed(2)
    model = IdentityRewardModel(TINY)
    frames = torch.randint(0, 255, (2, 5, 16, 16, 3), dtype=torch.uint8)
    refs = torch.randint(0, 255, (2, 2, 16, 16, 3), dtype=torch.uint8)
    out = model(frames, refs)["reward"]
    assert len(calls) >= 3  # encoder, reference summary, search of the frames (+ temporal)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_sdpa_attention_gives_the_same_rewards(scenes):
    torch.manual_seed(4)
    model = IdentityRewardModel(TINY).eval()
    frames = torch.stack([s.frames for s in scenes])
    refs = [s.references for s in scenes]
    ours = model.score(frames, refs)
    model.set_attention_impl("sdpa")
    torch.testing.assert_close(model.score(frames, refs), ours, rtol=1e-5, atol=1e-5)
    model.set_attention_impl("idgrpo")
    assert torch.equal(model.score(frames, refs), ours)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        model.set_attention_impl("flash")


def test_save_load_roundtrip_and_presets(tmp_path, scenes):
    torch.manual_seed(3)
    model = IdentityRewardModel(TINY).eval()
    model.save(tmp_path)
    loaded = IdentityRewardModel.load(tmp_path)
    frames = torch.stack([scenes[2].frames])
    refs = [scenes[2].references]
    torch.testing.assert_close(loaded.score(frames, refs), model.score(frames, refs))
    for name in ("tiny", "small", "base"):
        assert RewardModelConfig.from_name(name).dim > 0
    with pytest.raises(ValueError, match="unknown reward model preset"):
        RewardModelConfig.from_name("huge")
    with pytest.raises(ValueError, match="multiple of --model.patch-size"):
        RewardModelConfig(image_size=30, patch_size=4)
