"""Optimizer helpers without a process group: clipping and skipping non-finite updates."""

import pytest
import torch

from idgrpo.engine.optim import build_optimizer, clip_grad_norm_, step_if_finite
from idgrpo.testing import randn


def params_with_grads(seed=0):
    ps = [torch.nn.Parameter(randn(5, 3, seed=seed)), torch.nn.Parameter(randn(7, seed=seed + 1))]
    for i, p in enumerate(ps):
        p.grad = randn(*p.shape, seed=seed + 10 + i)
    return ps


def test_clip_grad_norm_matches_torch():
    ours, theirs = params_with_grads(), params_with_grads()
    norm = clip_grad_norm_(ours, 0.5)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.testing.assert_close(norm, want)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    assert norm > 0.5  # clipping happened


@pytest.mark.parametrize("fused", [False, True])
def test_step_if_finite_skips_nan_updates(fused):
    ps = params_with_grads()
    opt = build_optimizer(ps, lr=0.1) if not fused else torch.optim.AdamW(ps, lr=0.1, fused=True)
    before = [p.detach().clone() for p in ps]
    skipped = step_if_finite(opt, torch.tensor(float("nan")), torch.tensor(1.0))
    assert skipped.item() == 1.0
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    skipped = step_if_finite(opt, torch.tensor(2.0))
    assert skipped.item() == 0.0
    assert all(not torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert float(opt.state[ps[0]]["step"]) == 1.0  # the skipped step was not counted


def test_warmup_cosine_is_train_rewards_former_inline_schedule():
    import math

    from idgrpo.engine import warmup_cosine

    total, warmup = 37, 3
    for step in range(total):
        # The expression train-reward had inline, to the bit (its golden run pins it); `pi * step / total`, which
        # the demo once used, differs from it in the last ulp at some steps.
        inline = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        assert warmup_cosine(step, total, warmup=warmup) == inline
        unclamped = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))
        assert warmup_cosine(step, total, warmup=warmup) == pytest.approx(unclamped, rel=1e-15)
    assert warmup_cosine(0, 100, warmup=20) == pytest.approx(1 / 20)  # the warm-up's first step
    assert warmup_cosine(19, 100, warmup=20) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.19)))
    assert warmup_cosine(100, 100, warmup=20) == pytest.approx(0.05)  # the floor at the end, and past it
    assert warmup_cosine(3, 100, warmup=0) == warmup_cosine(3, 100, warmup=1)  # at least one warm-up step
    assert warmup_cosine(50, 100, warmup=1, floor=0.0) == pytest.approx(0.5)
