"""group_advantage: Triton (interpreter, fp32) and reference against float64 truths, including
Flow-GRPO's per-prompt stat tracker written out in NumPy as an independent oracle."""

import numpy as np
import pytest
import torch

from idgrpo.kernels.group_advantage import group_advantage, group_advantage_reference
from idgrpo.testing import poison, randn

BACKENDS = ["triton", "reference"]


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made during the test comes back full of NaN (or -7777),
    so an output element the kernel forgets to write cannot pass by luck."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def flow_grpo_tracker(prompts, rewards, global_std=False, clip=5.0):
    """Flow-GRPO's `PerPromptStatTracker.update` on a fresh tracker (it is cleared every epoch),
    followed by the trainer's advantage clamp; float64 NumPy."""
    prompts = np.array(prompts)
    rewards = np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(prompt_rewards, axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return np.clip(advantages, -clip, clip)


def shuffled_ids(sizes, seed):
    """Group ids that are neither contiguous nor sorted: group k gets id 1000 - 37k, order shuffled."""
    ids = torch.cat([torch.full((n,), 1000 - 37 * k, dtype=torch.int64) for k, n in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("columns", [None, 3])
def test_matches_flow_grpo_tracker(backend, std, columns, poisoned_allocations):
    sizes = [8, 8, 5, 8, 3, 8, 1]  # N = 41, not a multiple of the group size; one singleton
    ids = shuffled_ids(sizes, seed=1)
    shape = (len(ids),) if columns is None else (len(ids), columns)
    rewards = randn(*shape, seed=2, scale=1.7) + 0.5
    out = group_advantage(rewards, ids, std=std, backend=backend)
    expected = flow_grpo_tracker(ids.numpy(), rewards.double().numpy(), global_std=std == "global")
    assert out.advantages.shape == rewards.shape and out.advantages.dtype == torch.float32
    np.testing.assert_allclose(out.advantages.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.advantages.abs().max() > 0.5  # a real signal, not all zeros


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("clip", [5.0, 0.8, None])
def test_triton_matches_float64_reference(std, unbiased, clip, poisoned_allocations):
    sizes = [7, 1, 19, 4, 4, 2, 9, 3]
    ids = shuffled_ids(sizes, seed=3)
    rewards = randn(len(ids), 5, seed=4) * torch.tensor([1.0, 0.01, 3.0, 1.0, 100.0])
    rewards[[2, 11, 30], [0, 3, 4]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = group_advantage(rewards, ids, std=std, unbiased=unbiased, clip=clip, num_groups=len(sizes),
                          backend="triton")
    ref = group_advantage_reference(rewards.double(), ids, std=std, unbiased=unbiased, clip=clip)
    for name in ("advantages", "group_mean", "group_std", "zero_std_fraction"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name), rtol=2e-5, atol=2e-5,
                                   msg=name)
    assert torch.equal(out.group_count, ref.group_count)
    assert int(out.nonfinite_count) == 3 == int(ref.nonfinite_count)
    if clip is not None:
        assert out.advantages.abs().max() <= clip
    if clip == 0.8:
        assert (out.advantages.abs() == 0.8).any()  # the clip was exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, poisoned_allocations):
    # ids 40 (size 1), 7 (zero variance), 3 (normal, one NaN and one Inf), 12 (all NaN), 25 (normal)
    ids = torch.tensor([3, 40, 7, 3, 25, 7, 3, 12, 25, 3, 7, 25, 12, 3])
    nan, inf = float("nan"), float("inf")
    rewards = torch.tensor([0.3, 5.0, 2.0, nan, 1.1, 2.0, -0.7, nan, 0.2, inf, 2.0, -0.4, nan, 1.9])
    out = group_advantage(rewards, ids, backend=backend)
    group = {gid: i for i, gid in enumerate([3, 7, 12, 25, 40])}  # torch.unique order
    assert torch.isfinite(out.advantages).all()
    assert out.advantages[1] == 0  # group of one
    assert (out.advantages[[2, 5, 10]] == 0).all()  # zero variance
    assert (out.advantages[[3, 9, 7, 12]] == 0).all()  # non-finite rewards
    assert int(out.nonfinite_count) == 4
    assert out.group_count.tolist() == [3, 3, 0, 3, 1]
    assert out.group_std[group[7]] == 0 and out.group_std[group[40]] == 0 and out.group_std[group[12]] == 0
    assert out.group_mean[group[12]] == 0
    # zero std: ids 7, 12 and 40 out of 5 groups
    torch.testing.assert_close(out.zero_std_fraction, torch.tensor(3 / 5))
    finite3 = torch.tensor([0.3, -0.7, 1.9], dtype=torch.float64)
    expected3 = ((finite3 - finite3.mean()) / (finite3.std(correction=0) + 1e-4)).float()
    torch.testing.assert_close(out.advantages[[0, 6, 13]], expected3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.group_mean[group[3]], finite3.mean().float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariant_to_sample_order_and_id_values(backend):
    sizes = [6, 3, 8, 1, 5]
    ids = shuffled_ids(sizes, seed=5)
    rewards = randn(len(ids), 2, seed=6)
    out = group_advantage(rewards, ids, backend=backend)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(7))
    # relabel with a monotone map (keeps the torch.unique order) and shuffle the samples
    out2 = group_advantage(rewards[perm], ids[perm] * 3 + 11, backend=backend)
    torch.testing.assert_close(out2.advantages, out.advantages[perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2.group_mean, out.group_mean, rtol=0, atol=1e-6)
    assert torch.equal(out2.group_count, out.group_count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_num_groups_is_an_error(backend):
    ids = torch.tensor([4, 4, 9, 9, 1])
    with pytest.raises((ValueError, RuntimeError)):
        group_advantage(randn(5, seed=8), ids, num_groups=2, backend=backend)


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantage(randn(5, seed=9), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="std"):
        group_advantage(randn(5, seed=9), torch.zeros(5, dtype=torch.int64), std="batch")
    with pytest.raises(ValueError, match="integer"):
        group_advantage(randn(5, seed=9), torch.zeros(5))


def near_tied_batch(offset, columns, seed):
    """fp32 rewards (N, columns) around `offset` in groups that are hard for fp32 statistics, with
    their group ids (shuffled, as `shuffled_ids`). Every column of every group is one of: a few
    ulps apart (near-tied), all identical, {b - h, b, b + h} (the middle one exactly at the mean),
    spread over a few hundred ulps, or spread over ~1. Group sizes are not multiples of the
    kernel's blocks."""
    rng = np.random.default_rng(seed)
    sizes = [17, 8, 5, 1, 3, 33, 8, 6, 3, 7]
    kinds = ["near", "near", "same", "same", "at_mean", "near", "ulps", "spread", "at_mean", "same"]
    ids = shuffled_ids(sizes, seed)
    rewards = np.empty((len(ids), columns), np.float32)
    for k, (n, kind) in enumerate(zip(sizes, kinds, strict=True)):
        base = (offset + rng.normal(size=columns)).astype(np.float32)  # (T,)
        ulp = np.spacing(base)
        if kind == "near":
            group = base + rng.integers(0, 3, (n, columns)).astype(np.float32) * ulp
        elif kind == "same":
            group = np.repeat(base[None], n, 0)
        elif kind == "at_mean":
            group = base + np.array([[-4], [0], [4]], np.float32) * ulp
        elif kind == "ulps":
            group = base + np.round(rng.normal(size=(n, columns)) * 300).astype(np.float32) * ulp
        else:
            group = (base + rng.normal(size=(n, columns))).astype(np.float32)
        rewards[(ids == 1000 - 37 * k).numpy()] = group
    return torch.from_numpy(rewards), ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("offset, seed", [(0.0, 11), (1e4, 12), (1e6, 13), (-1e6, 14)])
def test_near_ties_and_large_offsets_match_float64_formula(backend, std, offset, seed, poisoned_allocations):
    """The fp32 kernel against the tracker's float64 formula on the fp32 rewards: values within
    1e-5 * (1 + |A|) (the module docstring's bound) and the same samples exactly 0."""
    columns = 17 if offset > 0 else 1  # 17: two column blocks, the second one partly masked
    rewards, ids = near_tied_batch(offset, columns, seed)
    out = group_advantage(rewards, ids, std=std, backend=backend)
    r64 = rewards.double().numpy()
    expected = flow_grpo_tracker(ids.numpy(), r64, global_std=std == "global")
    got = out.advantages.double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got == 0, expected == 0)
    assert (expected == 0).any() and (np.abs(expected) > 0.5).any()  # tied groups and real signal
    if std == "group" and offset == 0:
        assert ((expected != 0) & (np.abs(expected) < 0.05)).any()  # near-ties: std << eps, tiny A kept
    unique = ids.unique().tolist()
    for gid in unique:
        members = r64[(ids == gid).numpy()]
        np.testing.assert_allclose(out.group_mean[unique.index(gid)].double().numpy(), members.mean(0),
                                   rtol=1e-7, atol=0)
        np.testing.assert_allclose(out.group_std[unique.index(gid)].double().numpy(), members.std(0),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_cases_large_offset_and_near_tie(backend, poisoned_allocations):
    """A group at 1e4 two ulps apart, and seven 3.0 against one 3.0 + 1e-6: an fp32 mean rounds
    away the difference (giving -0.907 for -0.700, and zeroing the seven tied samples)."""
    for values in ([1e4] * 5 + [1e4 + 2e-3] * 3, [3.0] * 7 + [3.0 + 1e-6]):
        rewards = torch.tensor(values, dtype=torch.float32)
        ids = torch.full((len(values),), 5, dtype=torch.int64)
        out = group_advantage(rewards, ids, backend=backend)
        expected = flow_grpo_tracker(ids.numpy(), rewards.double().numpy())
        np.testing.assert_allclose(out.advantages.double().numpy(), expected, rtol=1e-6, atol=1e-7)
        assert (out.advantages != 0).all()
        assert out.zero_std_fraction == 0
