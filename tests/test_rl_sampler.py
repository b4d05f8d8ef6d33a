"""The SDE rollout against the closed-form formulas of
docs/models.md#sde-step-and-log-probability, guidance branches, seeds and SDE windows."""

import math

import pytest
import torch

from idgrpo.rl.sampler import (
    Branch,
    Conditioning,
    StepPlan,
    cfg_conditioning,
    guided_velocity,
    phantom_conditioning,
    sample,
)
from idgrpo.rl.schedules import flow_schedule

SHAPE = (3, 2, 3, 5)  # (C, F, H, W): odd sizes


class CountingPolicy(torch.nn.Module):
    """A small nonlinear velocity field of (x, t, context); counts its forwards."""

    def __init__(self, channels=3, dim=4):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=gen) * 0.4)
        self.proj = torch.nn.Parameter(torch.randn(channels, dim, generator=gen) * 0.5)
        self.calls = 0

    def forward(self, x, t, context):
        self.calls += 1
        tt = t.float().view(-1, 1, 1, 1, 1) / 1000
        c = (context @ self.proj.t()).view(x.shape[0], -1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjfhw->bifhw", self.mix, x) + c * tt) - 0.3 * x


def _conditioning(batch, guidance=4.5, seed=5):
    ctx = torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed))
    return cfg_conditioning({"context": ctx}, {"context": -ctx}, guidance)


def _spec_step(x, v, sigma, sigma_next, s, x_next):
    """docs/models.md#sde-step-and-log-probability in float64: μ and the per-sample mean log-prob of x_next."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    dt = sigma_next - sigma
    mu = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * math.sqrt(-dt)
    lp = -((x_next - mu) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mu, lp.flatten(1).mean(1), std


@pytest.mark.parametrize("noise_schedule,grid", [("identity_grpo", "diffusers"), ("flow_grpo", "wan_dpm")])
def test_rollout_log_probs_and_noise_match_the_closed_form(noise_schedule, grid):
    # flow_grpo is Flow-GRPO's SD3 schedule, whose grid starts at σ = 1 exactly (the special case of s_t).
    # Note: on the diffusers grid (σ_0 = 1 − 1e-6) it would give s_0 ≈ 700, a step noise of ~80.
    policy = CountingPolicy()
    schedule = flow_schedule(6, 3.0, grid)
    cond = _conditioning(2)
    seeds = [11, 12]
    roll = sample(policy, cond, schedule, seeds, SHAPE, noise_schedule=noise_schedule, noise_level=0.7)
    sig = schedule.sigmas.double().tolist()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    assert roll.states.shape == (2, 7, *SHAPE) and roll.log_probs.shape == (2, 6)
    for k in range(6):
        torch.testing.assert_close(roll.states[:, k], x, rtol=1e-5, atol=1e-5)
        t = schedule.timesteps[k].expand(2)
        v_c = policy(x, t, cond.branches[0].kwargs["context"])
        v_u = policy(x, t, cond.branches[1].kwargs["context"])
        v = v_u + 4.5 * (v_c - v_u)
        if noise_schedule == "identity_grpo":
            s = sig[1] * sig[k]
        else:
            s = 0.7 * math.sqrt(sig[k] / (1 - (sig[1] if sig[k] == 1 else sig[k])))
        eps = torch.stack([torch.randn(SHAPE, generator=g) for g in gens]).double()
        mu, _, std = _spec_step(x, v, sig[k], sig[k + 1], s, x)
        x_next = mu + std * eps
        torch.testing.assert_close(roll.states[:, k + 1].double(), x_next, rtol=1e-4, atol=1e-5)
        _, lp, _ = _spec_step(x, v, sig[k], sig[k + 1], s, roll.states[:, k + 1])
        torch.testing.assert_close(roll.log_probs[:, k].double(), lp, rtol=1e-5, atol=1e-5)
        x = roll.states[:, k + 1]
    torch.testing.assert_close(roll.final, x)


def test_batched_guidance_is_one_forward_and_equals_separate_forwards():
    policy = CountingPolicy()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 113])
    cond = _conditioning(3, guidance=4.5)
    policy.calls = 0
    v = guided_velocity(policy, x, t, cond)
    assert policy.calls == 1
    v_c = policy(x, t, cond.branches[0].kwargs["context"])
    v_u = policy(x, t, cond.branches[1].kwargs["context"])
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    free = cfg_conditioning({"context": cond.branches[0].kwargs["context"]}, None, 4.5)  # CFG-free option
    assert len(free.branches) == 1
    torch.testing.assert_close(guided_velocity(policy, x, t, free), v_c)


def test_phantom_guidance_injects_references_at_the_end_and_combines_three_passes():
    seen = []

    def policy(x, t, context):
        seen.append(x.clone())
        return x * context.view(-1, 1, 1, 1, 1)

    x = torch.randn(2, 3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    refs = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    pos, neg = torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0])
    cond = phantom_conditioning({"context": pos}, {"context": neg}, refs, guidance_image=5.0, guidance_text=7.5)
    v = guided_velocity(policy, x, torch.tensor([999, 999]), cond)
    model_in = seen[0].view(3, 2, 3, 4, 2, 2)
    torch.testing.assert_close(model_in[:, :, :, :3], x[None, :, :, :3].expand(3, -1, -1, -1, -1, -1))
    torch.testing.assert_close(model_in[0, :, :, 3:], refs)
    torch.testing.assert_close(model_in[1, :, :, 3:], refs)
    assert model_in[2, :, :, 3:].abs().max() == 0  # the negative pass sees zeros in place of the references
    with_ref = torch.cat([x[:, :, :3], refs], 2)
    with_zero = torch.cat([x[:, :, :3], torch.zeros_like(refs)], 2)
    pos_it, pos_i = with_ref * pos.view(-1, 1, 1, 1, 1), with_ref * neg.view(-1, 1, 1, 1, 1)
    neg_v = with_zero * neg.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, neg_v + 5.0 * (pos_i - neg_v) + 7.5 * (pos_it - pos_i))
    assert cond.video_latents(x).shape[2] == 3 and cond.drop_back == 1


def test_samples_depend_only_on_their_seed_not_on_the_batching():
    policy = CountingPolicy()
    schedule = flow_schedule(5, 3.0)
    seeds = [3, 4, 5, 6]
    cond = _conditioning(4)
    whole = sample(policy, cond, schedule, seeds, SHAPE)
    a = sample(policy, cond.select(slice(0, 1)), schedule, seeds[:1], SHAPE)
    b = sample(policy, cond.select(slice(1, 4)), schedule, seeds[1:], SHAPE)
    torch.testing.assert_close(torch.cat([a.final, b.final]), whole.final, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([a.log_probs, b.log_probs]), whole.log_probs, rtol=1e-5, atol=1e-5)
    other = sample(policy, cond, schedule, [3, 4, 5, 7], SHAPE)
    assert (other.final[3] - whole.final[3]).abs().max() > 1e-3
    torch.testing.assert_close(other.final[:3], whole.final[:3], rtol=1e-5, atol=1e-5)


def test_initial_seeds_set_only_the_starting_latent():
    policy = CountingPolicy()
    schedule = flow_schedule(5, 3.0)
    cond = _conditioning(3)
    plan = StepPlan.build(5, window_start=0, window_size=2)
    # Samples 0 and 1 share an initial seed; their step noises (seeds 3, 4) differ.
    roll = sample(policy, cond, schedule, [3, 4, 5], SHAPE, plan=plan, initial_seeds=[11, 11, 12])
    start = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (11, 11, 12)])
    torch.testing.assert_close(roll.states[:, 0], start, rtol=0, atol=0)
    assert (roll.final[0] - roll.final[1]).abs().max() > 1e-3
    # The step noises are seeds[i]'s draws either way: with initial_seeds = seeds, the plain rollout.
    plain = sample(policy, cond, schedule, [3, 4, 5], SHAPE, plan=plan)
    same = sample(policy, cond, schedule, [3, 4, 5], SHAPE, plan=plan, initial_seeds=[3, 4, 5])
    torch.testing.assert_close(same.final, plain.final, rtol=0, atol=0)
    torch.testing.assert_close(same.log_probs, plain.log_probs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="initial seeds"):
        sample(policy, cond, schedule, [3, 4, 5], SHAPE, plan=plan, initial_seeds=[1, 2])


def test_sde_window_runs_ode_outside_and_keeps_only_the_trained_steps():
    policy = CountingPolicy()
    schedule = flow_schedule(8, 3.0)
    cond = _conditioning(2)
    plan = StepPlan.build(8, window_start=2, window_size=3)
    roll = sample(policy, cond, schedule, [1, 2], SHAPE, plan=plan)
    assert roll.trained == range(2, 5) and roll.states.shape == (2, 4, *SHAPE) and roll.log_probs.shape == (2, 3)
    # Before the window: plain Euler from the same initial noise.
    euler = sample(policy, cond, flow_schedule(8, 3.0), [1, 2], SHAPE, solver="euler")
    x = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    sig = schedule.sigmas.tolist()
    for k in range(2):
        v = guided_velocity(policy, x, schedule.timesteps[k].expand(2), cond)
        x = x + (sig[k + 1] - sig[k]) * v
    torch.testing.assert_close(roll.states[:, 0], x, rtol=1e-5, atol=1e-5)
    # After the window: deterministic again, so two runs differ only through the window's noise.
    assert (roll.final - euler.final).abs().max() > 1e-4
    assert torch.isfinite(roll.log_probs).all()


def test_step_plans():
    assert StepPlan.build(25, timestep_fraction=0.99).trained == range(0, 24)  # 24 of 25 steps (the reference)
    assert StepPlan.build(25, window_start=20, window_size=5, timestep_fraction=0.99).trained == range(20, 24)
    starts = [StepPlan.sliding(10, 3, e, every=2).window.start for e in range(20)]
    assert starts[:6] == [0, 0, 1, 1, 2, 2] and max(starts) == 7 and min(starts) == 0
    with pytest.raises(ValueError, match="outside"):
        StepPlan.build(10, window_start=8, window_size=3)
    with pytest.raises(ValueError, match="no trained step"):
        StepPlan.build(10, window_start=9, window_size=1, timestep_fraction=0.5)


def test_reference_means_are_the_sde_mean_under_the_reference_policy():
    policy, other = CountingPolicy(), CountingPolicy()
    with torch.no_grad():
        other.mix.mul_(0.5)
    schedule = flow_schedule(4, 3.0)
    cond = Conditioning([Branch({"context": torch.randn(2, 4, generator=torch.Generator().manual_seed(9))}, 1.0)])
    roll = sample(policy, cond, schedule, [5, 6], SHAPE, reference=other)
    sig = schedule.sigmas.double().tolist()
    for k in range(4):
        x = roll.states[:, k]
        v_ref = other(x, schedule.timesteps[k].expand(2), cond.branches[0].kwargs["context"])
        mu_ref, _, _ = _spec_step(x, v_ref, sig[k], sig[k + 1], sig[1] * sig[k], x)
        torch.testing.assert_close(roll.ref_means[:, k].double(), mu_ref, rtol=1e-5, atol=1e-5)
    same = sample(policy, cond, schedule, [5, 6], SHAPE, reference=policy)
    mu = same.ref_means  # the reference is the policy: μ_ref is the rollout mean, x' − μ = std·ε
    assert torch.isfinite(mu).all()
    torch.testing.assert_close(same.states[:, 1:], roll.states[:, 1:])
