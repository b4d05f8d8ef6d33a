"""nft_loss: the reference against the official DiffusionNFT expression in float64 (values and gradients),
the Triton kernel (interpreter, fp32) against the float64 reference, and the argument contract."""

import pytest
import torch

from idgrpo.kernels import nft_loss as nft_module
from idgrpo.kernels.nft_loss import WEIGHT_FLOOR, nft_loss_reference
from idgrpo.rl.objectives import nft_loss
from idgrpo.testing import poison, randn

SHAPES = [(3, 5, 3, 7, 9), (2, 16, 2, 5, 3), (1, 3, 1, 1, 2), (6, 4, 2, 9, 11)]  # (B, C, F, H, W), not block multiples
SIGMAS = [0.3, 0.6, 1e-7, 0.97, 1.0, 1e-3]
ADVANTAGES = [-7.5, 0.4, 5.0, -5.0, 2.2, 0.0]  # both signs, beyond and exactly at the clip of 5
EXACT = 1  # the sample whose velocities are exactly noise − x0: its x0 errors are rounding, its weights floored


def official_nft_loss(forward_prediction, old_prediction, ref_forward_prediction, xt, x0, t, advantages, *,
                      beta, adv_clip_max, train_beta):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py (commit 24af555), lines 910-914, 928-929 and 934-970
    transcribed; config.beta -> beta, config.train.adv_clip_max -> adv_clip_max, config.train.beta ->
    train_beta, train_sample_batch["advantages"][:, j_idx] -> advantages; no adv_mode (lines 915-925)."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double())
                         .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    loss = policy_loss
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    loss += train_beta * torch.mean(kl_div_loss)
    return loss


def make_inputs(shape, seed, offset=0.0):
    """(v_new, v_old, v_ref, x_t, x0, sigma, advantages) in float64, every value fp32-representable so that
    the float64 reference of the fp32 inputs is the truth. x_t = (1 − σ)·x0 + σ·noise as the official script
    noises (its lines 864-870); velocities near noise − x0, the new and the reference one perturbed."""
    B = shape[0]

    def fp32(t):
        return t.float().double()

    x0 = fp32(randn(*shape, seed=seed, dtype=torch.float64) + offset)
    noise = fp32(randn(*shape, seed=seed + 1, dtype=torch.float64))
    sigma = fp32(torch.tensor(SIGMAS[:B], dtype=torch.float64))
    s = sigma.view(-1, *[1] * (len(shape) - 1))
    x_t = fp32((1 - s) * x0 + s * noise)
    v_old = fp32(noise - x0 + 0.1 * randn(*shape, seed=seed + 2, dtype=torch.float64))
    v_new = fp32(v_old + 0.05 * randn(*shape, seed=seed + 3, dtype=torch.float64))
    v_ref = fp32(v_old + 0.05 * randn(*shape, seed=seed + 4, dtype=torch.float64))
    if B > EXACT:
        v_old[EXACT] = v_new[EXACT] = fp32(noise[EXACT] - x0[EXACT])
    advantages = torch.tensor(ADVANTAGES[:B], dtype=torch.float64)
    return v_new, v_old, v_ref, x_t, x0, sigma, advantages


def weights_floored(v_new, v_old, x_t, x0, sigma, beta):
    """Whether each sample's positive and negative adaptive weights hit the 1e-5 floor (float64)."""
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    dims = tuple(range(1, x0.ndim))
    pos = (x_t - s * (beta * v_new + (1 - beta) * v_old) - x0).abs().mean(dims)
    neg = (x_t - s * ((1 + beta) * v_old - beta * v_new) - x0).abs().mean(dims)
    return (pos < WEIGHT_FLOOR) & (neg < WEIGHT_FLOOR)


def loss_and_grad(fn, v_new, *args, **kwargs):
    v = v_new.clone().requires_grad_()
    loss = fn(v, *args, **kwargs)
    loss.backward()
    return loss.detach(), v.grad


def assert_no_worse_than_eager(got, eager, truth, name, slack=2e-6):
    """Per sample, the kernel's fp32 result is at most 2x as far from the float64 truth as the eager fp32
    reference, plus `slack` times the truth's magnitude. Per sample because a sample whose x0 errors are
    rounding noise (EXACT) has a gradient that no fp32 computation gets right, and must not loosen the
    bound on the others."""
    assert got.dtype == eager.dtype and got.shape == truth.shape, name
    rows = [t.double().reshape(truth.shape[0] if truth.ndim else 1, -1) for t in (got, eager, truth)]
    for b, (g, e, t) in enumerate(zip(*rows)):
        scale = float(t.abs().max())
        assert scale > 0, name
        err, eager_err = float((g - t).abs().max()), float((e - t).abs().max())
        assert err <= 2 * eager_err + slack * scale, \
            f"{name}[{b}]: error {err:.3g}, eager fp32 {eager_err:.3g}, scale {scale:.3g}"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made during the test comes back full of NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [1.0, 0.1, 0.37])
@pytest.mark.parametrize("kl_beta", [0.0, 0.3])
def test_reference_equals_the_official_expression_in_float64(shape, beta, kl_beta):
    v_new, v_old, v_ref, x_t, x0, sigma, advantages = make_inputs(shape, seed=10)
    if shape[0] > EXACT:
        assert weights_floored(v_new, v_old, x_t, x0, sigma, beta)[EXACT]  # the floor is exercised
    kwargs = dict(beta=beta, adv_clip_max=5.0)
    want, want_grad = loss_and_grad(official_nft_loss, v_new, v_old, v_ref, x_t, x0, sigma, advantages,
                                    train_beta=kl_beta, **kwargs)
    got, got_grad = loss_and_grad(nft_loss, v_new, v_old, v_ref, x_t, x0, sigma, advantages, kl_beta=kl_beta,
                                  backend="reference", **kwargs)
    assert got.dtype == torch.float64 and got_grad.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15 * float(want_grad.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta, kl_beta", [(1.0, 0.0), (0.1, 0.3), (0.37, 1e-4)])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_triton_matches_float64_reference(shape, beta, kl_beta, offset, poisoned_allocations):
    inputs = make_inputs(shape, seed=20, offset=offset)
    kwargs = dict(beta=beta, adv_clip_max=5.0, kl_beta=kl_beta)
    truth, truth_grad = loss_and_grad(nft_loss_reference, *inputs, **kwargs)
    inputs32 = [t.float() for t in inputs]
    eager, eager_grad = loss_and_grad(nft_loss_reference, *inputs32, **kwargs)
    got, got_grad = loss_and_grad(nft_loss, *inputs32, backend="triton", **kwargs)
    assert got.shape == () and got_grad.dtype == torch.float32
    assert_no_worse_than_eager(got, eager, truth, "loss")
    assert_no_worse_than_eager(got_grad, eager_grad, truth_grad, "grad v_new")


def test_triton_bf16_latents():
    """bf16 in, fp32 arithmetic: the loss is fp32 and equals the fp32 reference of the same bf16 values; the
    gradient comes back in bf16, within bf16 rounding of that reference's."""
    inputs = [t.bfloat16() for t in make_inputs((3, 5, 3, 7, 9), seed=30)[:5]] + [
        torch.tensor(SIGMAS[:3]), torch.tensor(ADVANTAGES[:3])]
    kwargs = dict(beta=0.1, adv_clip_max=5.0, kl_beta=0.3)
    want, want_grad = loss_and_grad(nft_loss_reference, *[t.double() for t in inputs], **kwargs)
    got, got_grad = loss_and_grad(nft_loss, *inputs, backend="triton", **kwargs)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-2, atol=1e-2 * float(want_grad.abs().max()))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_beta_one_at_full_advantage_is_weighted_flow_matching(backend):
    """β = 1 and every advantage at or over the clip: r = 1 and the positive policy is v_new itself, so the
    loss is A·mean_b(mean(e²)/mean|e|) with e = x_t − σ·v_new − x0."""
    v_new, v_old, v_ref, x_t, x0, sigma, _ = (t.float() for t in make_inputs((3, 4, 2, 5, 7), seed=40))
    advantages = torch.tensor([2.0, 2.5, 9.0])
    got = nft_loss(v_new, v_old, None, x_t, x0, sigma, advantages, beta=1.0, adv_clip_max=2.0, backend=backend)
    error = (x_t - sigma.view(-1, 1, 1, 1, 1) * v_new - x0).double()
    dims = (1, 2, 3, 4)
    expected = 2.0 * ((error**2).mean(dims) / error.abs().mean(dims).clamp_min(WEIGHT_FLOOR)).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_kl_free_loss_reads_no_reference_velocity(backend):
    v_new, v_old, v_ref, x_t, x0, sigma, advantages = (t.float() for t in make_inputs((2, 3, 1, 4, 5), seed=50))
    kwargs = dict(beta=0.2, adv_clip_max=5.0, backend=backend)
    without = nft_loss(v_new, v_old, None, x_t, x0, sigma, advantages, **kwargs)
    unread = nft_loss(v_new, v_old, torch.full_like(v_ref, float("nan")), x_t, x0, sigma, advantages, **kwargs)
    assert torch.isfinite(without) and float(unread) == float(without)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradient_reaches_v_new_only(backend):
    v_new, v_old, v_ref, x_t, x0, sigma, advantages = (t.float() for t in make_inputs((2, 3, 1, 4, 5), seed=60))
    for t in (v_new, v_old, v_ref, x_t, x0):
        t.requires_grad_()
    nft_loss(v_new, v_old, v_ref, x_t, x0, sigma, advantages, beta=0.5, adv_clip_max=5.0, kl_beta=0.1,
             backend=backend).backward()
    assert v_new.grad is not None and v_new.grad.abs().max() > 0
    assert all(t.grad is None for t in (v_old, v_ref, x_t, x0))


def test_backend_follows_the_environment(monkeypatch):
    inputs = [t.float() for t in make_inputs((2, 3, 1, 4, 5), seed=70)]
    monkeypatch.setattr(nft_module, "_nft_loss_triton", lambda *a, **k: "triton path")
    monkeypatch.setenv("IDGRPO_KERNELS", "triton")
    assert nft_loss(*inputs, beta=0.5, adv_clip_max=5.0) == "triton path"
    monkeypatch.setenv("IDGRPO_KERNELS", "auto")  # CPU tensors: the reference
    assert isinstance(nft_loss(*inputs, beta=0.5, adv_clip_max=5.0), torch.Tensor)
    assert nft_loss(*inputs, beta=0.5, adv_clip_max=5.0, backend="triton") == "triton path"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_arguments(backend):
    v_new, v_old, v_ref, x_t, x0, sigma, advantages = (t.float() for t in make_inputs((2, 3, 1, 4, 5), seed=80))
    args = (v_new, v_old, v_ref, x_t, x0, sigma, advantages)
    for bad, match in [(dict(beta=0.0), "beta"), (dict(adv_clip_max=-1.0), "adv_clip_max"),
                       (dict(kl_beta=-0.1), "kl_beta")]:
        with pytest.raises(ValueError, match=match):
            nft_loss(*args, **{"beta": 0.5, "adv_clip_max": 5.0, **bad}, backend=backend)
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v_new, v_old, None, x_t, x0, sigma, advantages, beta=0.5, adv_clip_max=5.0, kl_beta=0.1,
                 backend=backend)
    with pytest.raises(ValueError, match="x0 has shape"):
        nft_loss(v_new, v_old, v_ref, x_t, x0[:, :2], sigma, advantages, beta=0.5, adv_clip_max=5.0,
                 backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        nft_loss(*args[:6], advantages[:1], beta=0.5, adv_clip_max=5.0, backend=backend)
    with pytest.raises(ValueError, match="per-sample"):
        nft_loss(*args[:5], sigma[:1].expand(3), advantages, beta=0.5, adv_clip_max=5.0, backend=backend)
