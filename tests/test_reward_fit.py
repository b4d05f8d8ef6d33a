"""`idgrpo.reward.train.fit`: the demo's former reward loop to the bit, and per-epoch seeding that resumes exactly.
(train-reward's side, FSDP and all, is pinned by the golden run in tests/test_golden.py.)"""

import math

import pytest
import torch

from idgrpo.engine import build_optimizer
from idgrpo.reward.data import PairTensors
from idgrpo.reward.losses import PREFER_A, PREFER_B, TIE, btt_loss
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
from idgrpo.reward.train import FitConfig, fit

TINY = RewardModelConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2, parts=3)


def pairs(n: int = 10, seed: int = 0) -> PairTensors:
    gen = torch.Generator().manual_seed(seed)
    frames = lambda: torch.randint(0, 256, (n, 2, 16, 16, 3), dtype=torch.uint8, generator=gen)  # noqa: E731
    refs = torch.randint(0, 256, (n, 1, 16, 16, 3), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([PREFER_A, PREFER_B, TIE])[torch.randint(0, 3, (n,), generator=gen)]
    return PairTensors(frames_a=frames(), frames_b=frames(), refs_a=refs, refs_b=refs.clone(),
                       ref_mask=torch.ones(n, 1, dtype=torch.bool), labels=labels, kinds=["k"] * n, prompts=[""] * n)


def demo_loop_before_fit(train: PairTensors, *, epochs, batch, lr, clip, seed) -> IdentityRewardModel:
    """The reward loop `idgrpo demo` had inline before it called `fit`."""
    torch.manual_seed(seed)
    model = IdentityRewardModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / batch)
    total = steps_per_epoch * epochs
    warmup = total // 20
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        flips = torch.rand(len(train), generator=generator) < 0.5
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            flip = torch.cat([flips[index], flips[index]]).view(-1, 1, 1, 1, 1)
            frames = torch.cat([train.frames_a[index], train.frames_b[index]])
            refs = torch.cat([train.refs_a[index], train.refs_b[index]])
            frames = torch.where(flip, frames.flip(-2), frames)
            refs = torch.where(flip, refs.flip(-2), refs)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup)) * (
                    0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
            reward = model(frames, refs)["reward"]
            loss = btt_loss(reward[:len(index)], reward[len(index):], train.labels[index], k=5.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1
    return model


def test_fit_trains_a_plain_module_exactly_as_the_demos_former_loop():
    train = pairs(10)
    # A clip far below the gradient norm, so that clipping acts on every step.
    want = demo_loop_before_fit(train, epochs=2, batch=4, lr=2e-3, clip=0.01, seed=3)
    torch.manual_seed(3)
    model = IdentityRewardModel(TINY)
    config = FitConfig(epochs=2, batch_size=4, lr=2e-3, grad_clip=0.01, warmup_fraction=0.05, seed=3,
                       reseed_each_epoch=False)
    norms = []
    steps = fit(model, build_optimizer(model.parameters(), lr=2e-3, weight_decay=0.01), train, config,
                on_step=lambda done: norms.append(float(done.grad_norm)))
    assert steps == 6 and min(norms) > 0.01
    for (name, got), expected in zip(model.state_dict().items(), want.state_dict().values(), strict=True):
        assert torch.equal(got, expected), name


def test_per_epoch_seeds_let_a_stopped_run_resume_exactly():
    train = pairs(10, seed=1)
    config = FitConfig(epochs=3, batch_size=4, lr=1e-3, seed=7)

    def fresh():
        torch.manual_seed(0)
        model = IdentityRewardModel(TINY)
        return model, build_optimizer(model.parameters(), lr=1e-3)

    whole, whole_optimizer = fresh()
    ends = []
    assert fit(whole, whole_optimizer, train, config, on_epoch_end=lambda epoch, step: ends.append((epoch, step))) == 9
    assert ends == [(1, 3), (2, 6), (3, 9)]
    parts, optimizer = fresh()
    stopped = fit(parts, optimizer, train, config, on_epoch_end=lambda epoch, step: True)  # stops after epoch 1
    assert stopped == 3
    assert fit(parts, optimizer, train, config, start_epoch=1, step=stopped) == 9
    for (name, got), expected in zip(parts.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(got, expected), name
    with pytest.raises(ValueError, match="cannot resume"):
        stream = FitConfig(epochs=3, batch_size=4, lr=1e-3, reseed_each_epoch=False)
        fit(parts, optimizer, train, stream, start_epoch=1)
    with pytest.raises(ValueError, match="loss"):
        FitConfig(epochs=1, batch_size=1, lr=1e-3, loss="hinge")
