"""The train-grpo reward factories resolve a trained compact reward model into a score callable."""

from types import SimpleNamespace

import pytest
import torch

from idgrpo.reward import factories
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig


def test_compact_factory_scores_like_the_saved_model(tmp_path):
    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig.from_name("tiny")).eval()
    model.save(tmp_path / "final")
    score = factories.compact(SimpleNamespace(extra={"reward_checkpoint": str(tmp_path / "final")}), "cpu")
    size = model.config.image_size
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 5, size, size, 3), generator=gen, dtype=torch.uint8)
    refs = [[torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)] for _ in range(2)]
    got = score(frames, refs, ["a", "b"])
    assert got.shape == (2,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, model.score(frames, refs, ["a", "b"]))


def test_factories_name_the_missing_setting():
    with pytest.raises(ValueError, match="reward_checkpoint"):
        factories.compact(SimpleNamespace(extra={}), "cpu")
    with pytest.raises(ValueError, match="reward_base"):
        factories.vlm(SimpleNamespace(extra={}), "cpu")
