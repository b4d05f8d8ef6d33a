"""grpo_step / grpo_loss: Triton (interpreter, fp32) against the float64 reference, the
closed-form formulas of docs/models.md#sde-step-and-log-probability, autograd of the reference, and the
on-policy identity."""

import math

import pytest
import torch

from idgrpo.kernels.grpo_loss import (
    grpo_loss,
    grpo_loss_reference,
    grpo_step,
    grpo_step_reference,
    sde_log_prob_reference,
    sde_mean_reference,
    sde_noise_std,
)
from idgrpo.testing import poison, randn

SHAPES = [(3, 5, 3, 7, 9), (2, 16, 2, 5, 3), (1, 3, 1, 1, 2)]  # (B, C, T, H, W), odd, not block multiples


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made during the test comes back full of NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def diffusers_flow_sigmas(steps=25, shift=3.0):
    """UniPC use_flow_sigmas: shift(linspace(1, 0.001, N+1)[:N]), then 0 appended
    (docs/models.md#sigma-schedules-and-shift)."""
    base = torch.linspace(1, 0.001, steps + 1, dtype=torch.float64)[:steps]
    sigmas = shift * base / (1 + (shift - 1) * base)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def step_inputs(shape, schedule, seed, steps=(0, 7, 19)):
    """Per-sample (σ, σ', s_t) drawn from the 25-step, shift-3 schedule (float64)."""
    sigmas = diffusers_flow_sigmas()
    idx = torch.tensor([steps[b % len(steps)] for b in range(shape[0])])
    sigma, sigma_next = sigmas[idx], sigmas[idx + 1]
    std = sde_noise_std(sigma, sigma_next, sigmas[1], schedule=schedule)
    x = randn(*shape, seed=seed, dtype=torch.float64)
    v = randn(*shape, seed=seed + 1, dtype=torch.float64)
    noise = randn(*shape, seed=seed + 2, dtype=torch.float64)
    return x, v, noise, sigma, sigma_next, std


def test_schedule_and_noise_std_match_spec_formulas():
    sigmas = diffusers_flow_sigmas()
    assert abs(float(sigmas[1]) - 0.98632) < 1e-5  # docs/models.md#sigma-schedules-and-shift
    sigma = torch.tensor([1.0, float(sigmas[1]), float(sigmas[10]), float(sigmas[24])], dtype=torch.float64)
    sigma_next = torch.tensor([float(sigmas[1]), float(sigmas[2]), float(sigmas[11]), 0.0], dtype=torch.float64)
    s1 = float(sigmas[1])
    identity = sde_noise_std(sigma, sigma_next, s1, schedule="identity_grpo")
    # s_t = σ_min + (σ_max − σ_min)·σ with σ_max = sigmas[1], σ_min = sigmas[-1] = 0
    expected = [0.0 + (s1 - 0.0) * float(s) for s in sigma]
    torch.testing.assert_close(identity, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    flow = sde_noise_std(sigma, sigma_next, s1, schedule="flow_grpo", noise_level=0.7)
    expected = [0.7 * math.sqrt(float(s) / (1 - (s1 if float(s) == 1.0 else float(s)))) for s in sigma]
    torch.testing.assert_close(flow, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert sde_noise_std(sigma.float(), sigma_next.float(), s1).dtype == torch.float32
    with pytest.raises(ValueError, match="schedule"):
        sde_noise_std(sigma, sigma_next, s1, schedule="ddim")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo"])
def test_step_matches_closed_form(backend, schedule):
    """μ, x' and log p written out elementwise from docs/models.md#sde-step-and-log-probability,
    independently of the module."""
    x, v, noise, sigma, sigma_next, std = step_inputs((3, 4, 3, 5, 7), schedule, seed=10)
    x_next, log_prob, mean = grpo_step(x.float(), v.float(), sigma.float(), sigma_next.float(), std.float(),
                                       noise.float(), backend=backend)
    b = (-1, 1, 1, 1, 1)
    s, sg, dt = std.view(b), sigma.view(b), (sigma_next - sigma).view(b)
    mu = x * (1 + s**2 / (2 * sg) * dt) + v * (1 + s**2 * (1 - sg) / (2 * sg)) * dt
    step_std = s * torch.sqrt(-dt)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_next.double(), mu + step_std * noise, rtol=1e-5, atol=1e-5)
    # x' − μ = s_t√(−dt)·ε, so log p = mean(−ε²/2) − log(s_t√(−dt)) − log√(2π)
    expected = (-(noise**2) / 2).mean(dim=(1, 2, 3, 4)) - torch.log(step_std.flatten()) - math.log(
        math.sqrt(2 * math.pi))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_step_triton_matches_float64_reference(shape, schedule, deterministic, poisoned_allocations):
    x, v, noise, sigma, sigma_next, std = step_inputs(shape, schedule, seed=20)
    out = grpo_step(x.float(), v.float(), sigma.float(), sigma_next.float(), std.float(), noise.float(),
                    deterministic=deterministic, backend="triton")
    ref = grpo_step_reference(x, v, sigma, sigma_next, std, noise, deterministic=deterministic)
    for name, got, want in zip(("x_next", "log_prob", "mean"), out, ref):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5, msg=name)
    if deterministic:  # x' = x + dt·v, the log-prob still measured against μ
        dt = (sigma_next - sigma).view(-1, *[1] * (len(shape) - 1))
        torch.testing.assert_close(out[0].double(), x + dt * v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo"])
def test_on_policy_ratio_is_one(backend, schedule):
    x, v, noise, sigma, sigma_next, std = (t.float() for t in step_inputs((3, 5, 3, 7, 9), schedule, seed=30))
    x_next, log_prob, mean = grpo_step(x, v, sigma, sigma_next, std, noise, backend=backend)
    advantages = randn(3, seed=33)
    loss, stats = grpo_loss(x, x_next, v.clone().requires_grad_(), log_prob, advantages, sigma, sigma_next, std,
                            ref_mean=mean, backend=backend)
    torch.testing.assert_close(stats["log_prob"], log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["ratio"], torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["kl"], torch.zeros(3), rtol=0, atol=1e-9)  # ref_mean = μθ
    assert float(stats["clipfrac"]) == 0
    # at ratio 1 and KL 0 the loss is −mean(clip(A))
    torch.testing.assert_close(loss.detach(), -advantages.clamp(-5, 5).mean(), rtol=1e-5, atol=1e-6)


def loss_inputs(shape, schedule, seed, with_ref):
    x, v, noise, sigma, sigma_next, std = step_inputs(shape, schedule, seed)
    x_next, log_prob, mean = grpo_step_reference(x, v, sigma, sigma_next, std, noise)
    B = shape[0]
    # Policy moved since the rollout: a perturbed velocity. Old log-probs offset so that
    # ratios land inside and outside 1 ± clip_range, advantages of both signs, one clipped.
    v_new = v + 0.05 * randn(*shape, seed=seed + 5, dtype=torch.float64)
    new_log_prob = sde_log_prob_reference(x_next, sde_mean_reference(x, v_new, sigma, sigma_next, std), sigma,
                                          sigma_next, std)
    old_log_prob = new_log_prob - torch.tensor([0.0003, -0.004, 0.003, -0.0002], dtype=torch.float64)[:B]
    advantages = torch.tensor([-0.7, 1.3, 6.5, -2.0], dtype=torch.float64)[:B]
    ref_mean = (mean + 0.02 * randn(*shape, seed=seed + 6, dtype=torch.float64)) if with_ref else None
    return x, x_next, v_new, old_log_prob, advantages, sigma, sigma_next, std, ref_mean


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo"])
@pytest.mark.parametrize("with_ref", [True, False])
def test_loss_and_gradient_match_float64_autograd(shape, schedule, with_ref, poisoned_allocations):
    x, x_next, v, old_lp, adv, sigma, sigma_next, std, ref_mean = loss_inputs(shape, schedule, 40, with_ref)
    kwargs = dict(clip_range=1e-3, adv_clip=5.0, kl_beta=0.5)  # a large beta so the KL gradient matters

    v64 = v.clone().requires_grad_()
    loss64, stats64 = grpo_loss_reference(x, x_next, v64, old_lp, adv, sigma, sigma_next, std, ref_mean=ref_mean,
                                          **kwargs)
    loss64.backward()
    v32 = v.float().requires_grad_()
    loss32, stats32 = grpo_loss(x.float(), x_next.float(), v32, old_lp.float(), adv.float(), sigma.float(),
                                sigma_next.float(), std.float(),
                                ref_mean=None if ref_mean is None else ref_mean.float(), backend="triton", **kwargs)
    loss32.backward()

    torch.testing.assert_close(loss32.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    for name in ("log_prob", "ratio", "kl", "policy_loss", "clipfrac", "approx_kl"):
        assert stats32[name].dtype == torch.float32, name
        torch.testing.assert_close(stats32[name].double(), stats64[name], rtol=1e-4, atol=1e-6, msg=name)
    if shape[0] >= 3:
        assert 0 < float(stats64["clipfrac"]) < 1  # both the clipped and the unclipped branch are exercised
    grad64 = v64.grad
    assert grad64.abs().max() > 0
    scale = float(grad64.abs().max())
    torch.testing.assert_close(v32.grad.double(), grad64, rtol=1e-4, atol=1e-5 * scale)


def test_gradient_is_elementwise_times_per_sample_scalars():
    """Closed form of d loss / d v (docs/models.md#loss-and-kl): for sample b with active policy gradient,
    (1/B)·[−A·ratio·(x'−μ) + β·(μ−μ_ref)]·cv/(var·M)."""
    shape = (2, 3, 1, 4, 5)
    x, x_next, v, old_lp, adv, sigma, sigma_next, std, ref_mean = loss_inputs(shape, "flow_grpo", 50, True)
    b = (-1, 1, 1, 1, 1)
    dt = (sigma_next - sigma).view(b)
    s, sg = std.view(b), sigma.view(b)
    mu = x * (1 + s**2 / (2 * sg) * dt) + v * (1 + s**2 * (1 - sg) / (2 * sg)) * dt
    # ratios exp(∓0.01), exp(±0.02): inside clip_range 0.5, so both samples carry a policy gradient
    old_lp = sde_log_prob_reference(x_next, mu, sigma, sigma_next, std) + torch.tensor([0.01, -0.02]).double()
    v32 = v.float().requires_grad_()
    beta = 0.3
    loss, stats = grpo_loss(x.float(), x_next.float(), v32, old_lp.float(), adv.float(), sigma.float(),
                            sigma_next.float(), std.float(), ref_mean=ref_mean.float(), kl_beta=beta,
                            clip_range=0.5, backend="triton")
    loss.backward()
    cv = (1 + s**2 * (1 - sg) / (2 * sg)) * dt
    var, M, B = s**2 * -dt, x[0].numel(), shape[0]
    ratio = stats["ratio"].double().view(b)
    expected = (-adv.view(b) * ratio * (x_next - mu) + beta * (mu - ref_mean)) * cv / (var * M) / B
    torch.testing.assert_close(v32.grad.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_gradient_flows_only_to_velocity():
    x, x_next, v, old_lp, adv, sigma, sigma_next, std, ref_mean = (
        t.float() for t in loss_inputs((2, 3, 1, 2, 5), "identity_grpo", 60, True))
    x.requires_grad_()
    v.requires_grad_()
    loss, _ = grpo_loss(x, x_next, v, old_lp, adv, sigma, sigma_next, std, ref_mean=ref_mean, backend="triton")
    loss.backward()
    assert x.grad is None and v.grad is not None


def test_bad_arguments():
    x, v, noise, sigma, sigma_next, std = (t.float() for t in step_inputs((2, 3, 1, 2, 5), "flow_grpo", 70))
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(x, x, v, torch.zeros(2), torch.zeros(2), sigma, sigma_next, std, clip_range=0.0)
    with pytest.raises(ValueError, match="shape"):
        grpo_step(x, v[:, :2], sigma, sigma_next, std, noise, backend="triton")
    with pytest.raises(ValueError, match="per-sample"):
        grpo_step(x, v, sigma[:1].expand(3), sigma_next, std, noise, backend="reference")
