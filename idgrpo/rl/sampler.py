"""Flow-matching samplers for any velocity policy: the GRPO SDE step with per-sample log-probs, Euler and UniPC ODE.

A policy is any callable `policy(latents (B, C, F, H, W), timestep (B,) int64, **kwargs) -> velocity` (the Wan DiT,
a user's model, a toy). Guidance is expressed as a weighted sum of *branches*, all run in ONE batched forward:

    v = Σ_i w_i · policy(inject_i(x), t, **kwargs_i)

- classifier-free guidance: branches (cond, g), (uncond, 1 − g)  ->  v_u + g·(v_c − v_u)   (`cfg_conditioning`)
- CFG-free training: one branch (cond, 1)                                                     (`cfg_conditioning`)
- Phantom's three passes (docs/models.md#phantom): (text + refs, g_text), (neg + refs, g_img − g_text),
  (neg + zero refs, 1 − g_img),
  with the clean reference latents re-injected as the last frames of the model input at every step
  (`phantom_conditioning`).

`sample` runs one rollout: SDE steps (docs/models.md#sde-step-and-log-probability, through
`idgrpo.kernels.grpo_loss.grpo_step`) inside the SDE window,
Euler ODE steps elsewhere, per-sample seeds (a sample's noise depends only on its seed, never on the batch it was
drawn in), and for the trained steps it keeps the states, the old log-probs and, when asked, the mean of the SDE step
under a reference policy (the KL anchor) — computed here so that training needs no reference forward.

No host syncs: σ, timesteps and the window are host-side numbers known before the rollout; per-sample values are
(B,) device tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from idgrpo.kernels.grpo_loss import grpo_step, sde_noise_std
from idgrpo.rl.schedules import FlowSchedule

Policy = Callable[..., torch.Tensor]
"""`policy(latents, timestep, **kwargs) -> velocity`: the flow-matching velocity field being trained.

- latents: (B, C, F, H, W) fp32 noisy latents x_σ = (1 − σ)·x0 + σ·ε (reference slots included);
- timestep: (B,) int64 model timesteps in [0, 1000): int(σ·1000), truncated (`idgrpo.rl.schedules`), not σ itself;
- kwargs: the conditioning of one guidance branch (`Branch.kwargs`: text context, VACE context, ...), batch-first;
- returns the velocity dx/dσ ≈ ε − x0, same shape as `latents`, any float dtype (used in fp32).

Under `GRPOTrainer` it is an `nn.Module` whose parameters with requires_grad are the trained ones (LoRA adapters, or
everything for full fine-tuning); for the benchmark's `sdpa_attention` switch it may offer
`set_attention_impl("sdpa" | "idgrpo")` as `WanDiT` does."""


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning: guidance branches, batched into one forward
# ----------------------------------------------------------------------------------------------------------------------


def _index(value: Any, index: torch.Tensor | slice) -> Any:
    """Select samples of a batch-first tensor (or a list/tuple/dict of them); other values pass through."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[index.to(value.device) if isinstance(index, torch.Tensor) else index]
    if isinstance(value, dict):
        return {k: _index(v, index) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_index(v, index) for v in value)
    return value


def _concat(values: Sequence[Any]) -> Any:
    """Concatenate one kwarg across branches along the batch; non-tensors must agree across branches."""
    first = values[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(list(values))
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values]) for k in first}
    if any(v != first for v in values[1:]):
        raise ValueError(f"non-tensor policy arguments differ between guidance branches: {values}")
    return first


@dataclass
class Branch:
    """One term of the guided velocity: `weight · policy(x with `injected` frames, t, **kwargs)`.

        Branch({"context": text}, weight=4.5)        # CFG's conditional branch at guidance 4.5
    """

    kwargs: dict[str, Any]
    """Policy keyword arguments; tensors are batch-first (B, ...)."""
    weight: float
    """Coefficient of this branch's velocity in the guided sum (the weights of a guidance rule add up to 1)."""
    injected: torch.Tensor | None = None
    """(B, C, n, H, W) clean latent frames written over the LAST n frames of the model input (Phantom), or None."""


@dataclass
class Conditioning:
    """The guidance branches of a batch, plus which latent frames are reference slots to drop before decoding.

        cond = cfg_conditioning({"context": text}, {"context": negative}, guidance=4.5, drop_front=2)
        cond.select(torch.tensor([0, 3]))            # samples 0 and 3 of the batch, every branch
        cond.video_latents(latents)                  # (B, C, F - 2, H, W): the reference slots dropped
    """

    branches: list[Branch]
    drop_front: int = 0
    """Latent frames at the start that are reference slots (VACE prepends its references), removed before decoding."""
    drop_back: int = 0
    """Latent frames at the end that are reference slots (Phantom appends its references), removed before decoding."""

    def __post_init__(self):
        if not self.branches:
            raise ValueError("Conditioning needs at least one branch")
        if self.drop_front < 0 or self.drop_back < 0:
            raise ValueError("drop_front / drop_back must be >= 0")

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        """The conditioning of a subset of the batch (index along the batch dimension)."""
        branches = [replace(b, kwargs=_index(b.kwargs, index), injected=_index(b.injected, index))
                    for b in self.branches]
        return replace(self, branches=branches)

    def video_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> the video frames only (reference slots dropped), ready for the VAE decoder."""
        return latents[:, :, self.drop_front: latents.shape[2] - self.drop_back]


def cfg_conditioning(cond: dict[str, Any], uncond: dict[str, Any] | None, guidance: float,
                     *, drop_front: int = 0) -> Conditioning:
    """Classifier-free guidance v_u + g·(v_c − v_u); `uncond=None` (or g == 1) is the CFG-free single forward.

    Note: the unconditional branch of Wan uses the negative prompt, not an empty string
    (docs/models.md#parameterisation-and-timesteps).
    """
    if uncond is None or guidance == 1.0:
        return Conditioning([Branch(cond, 1.0)], drop_front=drop_front)
    return Conditioning([Branch(cond, guidance), Branch(uncond, 1.0 - guidance)], drop_front=drop_front)


def phantom_conditioning(cond: dict[str, Any], neg: dict[str, Any], reference_latents: torch.Tensor,
                         guidance_image: float = 5.0, guidance_text: float = 7.5) -> Conditioning:
    """Phantom's three-pass guidance (docs/models.md#phantom): v = neg + g_img·(pos_i − neg) + g_text·(pos_it − pos_i).

    reference_latents: (B, 16, n_ref, H, W) VAE latents of the references, re-injected at the END of the model
    input at every step; the negative pass sees zeros in their place.
    """
    zeros = torch.zeros_like(reference_latents)
    branches = [Branch(cond, guidance_text, reference_latents)]
    if guidance_image != guidance_text:  # pos_i's weight is zero otherwise: skip its forward
        branches.append(Branch(neg, guidance_image - guidance_text, reference_latents))
    branches.append(Branch(neg, 1.0 - guidance_image, zeros))
    return Conditioning(branches, drop_back=reference_latents.shape[2])


def _inject(latents: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    if frames is None:
        return latents
    n = frames.shape[2]
    return torch.cat([latents[:, :, : latents.shape[2] - n], frames.to(latents.dtype)], dim=2)


def guided_velocity(policy: Policy, latents: torch.Tensor, timestep: torch.Tensor,
                    conditioning: Conditioning, *, separate_branches: bool = False) -> torch.Tensor:
    """The guided velocity in fp32, from one batched forward over every branch.

    latents (B, C, F, H, W) fp32; timestep (B,) int64 -> (B, C, F, H, W) fp32.
    separate_branches: one forward per branch instead (the straightforward CFG; the benchmark's baseline). Same
    function, summed in the same order.
    """
    branches = conditioning.branches
    batch = latents.shape[0]
    if separate_branches:
        velocity = None
        for b in branches:
            out = policy(_inject(latents, b.injected), timestep, **b.kwargs).float() * b.weight  # (B, ...)
            velocity = out if velocity is None else velocity + out
        return velocity
    model_in = torch.cat([_inject(latents, b.injected) for b in branches])  # (nb·B, C, F, H, W)
    kwargs = _concat([b.kwargs for b in branches])
    out = policy(model_in, timestep.repeat(len(branches)), **kwargs).float()  # (nb·B, ...)
    velocity = out[:batch] * branches[0].weight
    for i, b in enumerate(branches[1:], start=1):
        velocity = velocity + out[i * batch:(i + 1) * batch] * b.weight
    return velocity


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Host-side description of one rollout: which steps are stochastic and which are trained.

        plan = StepPlan.build(25, timestep_fraction=0.99)        # window range(0, 25), trained range(0, 24)
        plan = StepPlan.build(25, window_start=4, window_size=2)  # SDE steps 4 and 5 only, both trained

    SDE steps are `window` (a contiguous range, Flow-GRPO-Fast / MixGRPO style), Euler ODE steps elsewhere.
    Trained steps are the SDE steps among the first ⌊N·timestep_fraction⌋ (Identity-GRPO trains 24 of 25), and
    must be contiguous so the states x_k … x_{k+K} are stored once.
    """

    num_steps: int
    window: range
    trained: range

    @staticmethod
    def build(num_steps: int, *, window_start: int = 0, window_size: int = 0,
              timestep_fraction: float = 1.0) -> StepPlan:
        """window_size 0 means every step is an SDE step."""
        if not 0.0 < timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        size = num_steps if window_size <= 0 else window_size
        if not (0 <= window_start and window_start + size <= num_steps):
            raise ValueError(f"SDE window [{window_start}, {window_start + size}) is outside {num_steps} steps")
        window = range(window_start, window_start + size)
        limit = int(num_steps * timestep_fraction)
        trained = range(window.start, min(window.stop, limit))
        if len(trained) == 0:
            raise ValueError(f"no trained step: window {window} and timestep_fraction {timestep_fraction} "
                             f"(first {limit} of {num_steps} steps) do not overlap")
        return StepPlan(num_steps, window, trained)

    @staticmethod
    def sliding(num_steps: int, window_size: int, epoch: int, *, every: int = 1, stride: int = 1,
                timestep_fraction: float = 1.0) -> StepPlan:
        """A window that advances by `stride` steps every `every` epochs and wraps around
        (over the starts 0 … ⌊N·fraction⌋ − size, so that every position keeps a trained step)."""
        limit = max(1, int(num_steps * timestep_fraction))
        positions = max(1, min(num_steps, limit) - window_size + 1)
        start = ((epoch // max(1, every)) * stride) % positions
        return StepPlan.build(num_steps, window_start=start, window_size=window_size,
                              timestep_fraction=timestep_fraction)


@dataclass
class StepSchedule:
    """Per-step σ, σ', s_t and model timesteps (all (N,) on the device), with the reference indexing semantics.

        steps = StepSchedule.build(flow_schedule(25, 3.0), "cpu")
        sigma, sigma_next, std, t = steps.at(k, batch)           # step k's values as (B,) tensors
    """

    sigma: torch.Tensor
    sigma_next: torch.Tensor
    std_dev_t: torch.Tensor
    timesteps: torch.Tensor

    @staticmethod
    def build(schedule: FlowSchedule, device, *, noise_schedule: str = "identity_grpo",
              noise_level: float = 0.7) -> StepSchedule:
        sigma, sigma_next = schedule.step_sigmas(device)
        sigmas_1 = schedule.sigmas[min(1, schedule.num_steps)].to(device).expand_as(sigma)
        std = sde_noise_std(sigma, sigma_next, sigmas_1, schedule=noise_schedule, noise_level=noise_level)
        return StepSchedule(sigma, sigma_next, std.float(), schedule.timesteps.to(device))

    def at(self, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ, σ', s_t, t) of step k expanded to (B,) per-sample tensors."""
        return tuple(v[k].expand(batch).contiguous() for v in (self.sigma, self.sigma_next, self.std_dev_t,
                                                               self.timesteps))


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """x_{σ'} = x_σ + (σ' − σ)·v with per-sample (B,) σ."""
    dt = (sigma_next - sigma).view(-1, *([1] * (x.ndim - 1)))
    return x + dt * velocity


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample noise
# ----------------------------------------------------------------------------------------------------------------------


class SampleNoise:
    """One generator per sample: sample i's initial latent and step noises depend only on seeds[i].

        noise = SampleNoise([11, 12], (16, 9, 30, 52), "cpu")
        x = noise.draw()                              # (2, 16, 9, 30, 52): the initial latents, then each step's noise

    This makes a rollout independent of how samples are batched or spread across ranks. With `initial_seeds`, the
    first draw (the initial latent) comes from initial_seeds[i] instead, while the step noises stay the draws they
    would be without it: samples that share an initial seed start from the same latent.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device,
                 initial_seeds: Sequence[int] | None = None):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        if initial_seeds is not None and len(initial_seeds) != len(self.generators):
            raise ValueError(f"{len(initial_seeds)} initial seeds for {len(self.generators)} samples")
        self.initial = None if initial_seeds is None else [
            torch.Generator(device=self.device).manual_seed(int(s)) for s in initial_seeds]

    def draw(self) -> torch.Tensor:
        """(B, *shape) standard normal fp32; advances every sample's generator by one draw."""
        out = self._draw(self.generators)
        if self.initial is not None:  # the step noises stay seeds[i]'s 2nd, 3rd, ... draws either way
            out, self.initial = self._draw(self.initial), None
        return out

    def _draw(self, generators) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32)
                            for g in generators])


# ----------------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """What `sample` returns for one batch. K = len(plan.trained), B = batch size.

        roll = sample(policy, cond, flow_schedule(25, 3.0), seeds=[0, 1], latent_shape=(16, 9, 30, 52))
        roll.final                                    # (2, 16, 9, 30, 52) at σ = 0; decode roll.final for videos
    """

    final: torch.Tensor  # (B, C, F, H, W) fp32, x at σ = 0
    states: torch.Tensor | None  # (B, K + 1, C, F, H, W) fp32: x before each trained step, then after the last one
    log_probs: torch.Tensor | None  # (B, K) fp32, log-prob of each trained transition under the rollout policy
    ref_means: torch.Tensor | None  # (B, K, C, F, H, W) fp32, SDE mean under the reference policy (the KL anchor)
    trained: range = field(default_factory=lambda: range(0))


@torch.no_grad()
def sample(policy: Policy, conditioning: Conditioning, schedule: FlowSchedule, seeds: Sequence[int],
           latent_shape: Sequence[int], *, plan: StepPlan | None = None, steps: StepSchedule | None = None,
           noise_schedule: str = "identity_grpo", noise_level: float = 0.7, reference: Policy | None = None,
           solver: str = "sde", device=None, separate_branches: bool = False,
           initial_seeds: Sequence[int] | None = None) -> Rollout:
    """Run one rollout batch of len(seeds) samples.

    solver: "sde"  — SDE steps in `plan.window` (default: all steps), Euler elsewhere; keeps the trained steps'
                     states, log-probs and (with `reference`) the reference means;
            "euler" / "unipc" — deterministic ODE sampling (evaluation); no log-probs.
    latent_shape: (C, F, H, W) of one sample's latent (reference slots included).
    reference: a policy evaluated with the same guidance on the trained steps, whose SDE mean is the KL anchor.
    separate_branches: one policy forward per guidance branch (`guided_velocity`; the benchmark's baseline).
    initial_seeds: per sample, the seed of its initial latent (default: seeds; see `SampleNoise`).
    """
    device = torch.device(device) if device is not None else _device_of(policy)
    noise = SampleNoise(seeds, latent_shape, device, initial_seeds)
    x = noise.draw()  # (B, C, F, H, W)
    batch = x.shape[0]
    if solver == "unipc":
        return Rollout(final=unipc_sample(policy, conditioning, schedule, x), states=None, log_probs=None,
                       ref_means=None)
    if solver not in ("sde", "euler"):
        raise ValueError(f"solver must be 'sde', 'euler' or 'unipc', got {solver!r}")
    steps = steps or StepSchedule.build(schedule, device, noise_schedule=noise_schedule, noise_level=noise_level)
    plan = plan or StepPlan.build(schedule.num_steps)
    sde = solver == "sde"
    trained = plan.trained if sde else range(0)
    states, log_probs, ref_means = [], [], []
    for k in range(schedule.num_steps):
        sigma, sigma_next, std, t = steps.at(k, batch)
        velocity = guided_velocity(policy, x, t, conditioning, separate_branches=separate_branches)
        if sde and k in plan.window:
            eps = noise.draw()
            x_next, log_prob, _ = grpo_step(x, velocity, sigma, sigma_next, std, eps)
            if k in trained:
                states.append(x)
                log_probs.append(log_prob)
                if reference is not None:
                    ref_velocity = guided_velocity(reference, x, t, conditioning,
                                                   separate_branches=separate_branches)
                    ref_means.append(grpo_step(x, ref_velocity, sigma, sigma_next, std, eps)[2])
        else:
            x_next = euler_step(x, velocity, sigma, sigma_next)
        if sde and k == trained.stop - 1 and len(trained):
            states.append(x_next)
        x = x_next
    if not trained:
        return Rollout(final=x, states=None, log_probs=None, ref_means=None)
    return Rollout(final=x, states=torch.stack(states, 1), log_probs=torch.stack(log_probs, 1),
                   ref_means=torch.stack(ref_means, 1) if ref_means else None, trained=trained)


def _device_of(policy) -> torch.device:
    params = getattr(policy, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# UniPC (evaluation quality ODE solver)
# ----------------------------------------------------------------------------------------------------------------------


def unipc_sample(policy: Policy, conditioning: Conditioning, schedule: FlowSchedule, x: torch.Tensor,
                 *, order: int = 2) -> torch.Tensor:
    """UniPC multistep (bh2 variant, flow prediction, predictor + corrector, lower order at the final steps) as in
    diffusers `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)` and Wan's
    FlowUniPCMultistepScheduler with their defaults (solver_order=2, lower_order_final=True, final σ 0).

    Data prediction x0 = x − σ·v (docs/models.md#parameterisation-and-timesteps); α = 1 − σ; λ = log α − log σ.
    """
    sig = schedule.sigmas.tolist()  # host floats: the grid is host data
    if not 0.0 < sig[0] < 1.0:
        raise ValueError(f"UniPC needs 0 < σ_0 < 1 (λ = log((1-σ)/σ) is infinite at σ = 1), got σ_0 = {sig[0]}; "
                         "use the 'diffusers' or 'wan' grid")
    n = schedule.num_steps
    batch = x.shape[0]
    timesteps = schedule.timesteps.to(x.device)
    model_outputs: list[torch.Tensor] = []  # x0 predictions, most recent last
    lambdas: list[float] = []
    last_sample = None
    this_order = 1
    for k in range(n):
        t = timesteps[k].expand(batch)
        v = guided_velocity(policy, x, t, conditioning)
        x0 = x - sig[k] * v
        if k > 0 and last_sample is not None:  # corrector (UniC) with the new model output
            x = _unic(model_outputs, lambdas, x0, last_sample, sig, k, this_order)
        model_outputs.append(x0)
        lambdas.append(_lam(sig[k]))
        model_outputs = model_outputs[-order:]
        lambdas = lambdas[-order:]
        this_order = min(order, n - k, k + 1)  # lower order at the final steps and during warm-up
        last_sample = x
        x = _unip(model_outputs, lambdas, x, sig, k, this_order)
    return x


def _lam(sigma: float) -> float:
    if sigma <= 0:
        return math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _unip(model_outputs, lambdas, x, sig, k, order):
    """UniP predictor (bh2) from σ_k to σ_{k+1}."""

    s0, s1 = sig[k], sig[k + 1]
    m0 = model_outputs[-1]
    alpha_t, sigma_t = 1.0 - s1, s1
    if s1 == 0.0:  # to σ = 0 (always order 1 with lower_order_final): h = inf and the update is x = x0
        return m0
    lam_t, lam_s0 = _lam(s1), _lam(s0)
    h = lam_t - lam_s0
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)  # bh2
    x_t_ = sigma_t / s0 * x - alpha_t * h_phi_1 * m0
    if order == 1:
        return x_t_
    lam_prev = lambdas[-2]
    rk = (lam_prev - lam_s0) / h
    d1 = (model_outputs[-2] - m0) / rk
    rhos_p = 0.5  # order 2: the predictor coefficient is 0.5 (diffusers special case)
    return x_t_ - alpha_t * b_h * (rhos_p * d1)


def _unic(model_outputs, lambdas, model_t, last_sample, sig, k, order):
    """UniC corrector (bh2) of the step σ_{k−1} -> σ_k, using the new model output at σ_k."""

    s0, s1 = sig[k - 1], sig[k]
    m0 = model_outputs[-1]
    alpha_t, sigma_t = 1.0 - s1, s1
    lam_t, lam_s0 = _lam(s1), _lam(s0)
    h = lam_t - lam_s0
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)
    rks, d1s = [], []
    for i in range(1, order):
        lam_prev = lambdas[-(i + 1)]
        rk = (lam_prev - lam_s0) / h
        rks.append(rk)
        d1s.append((model_outputs[-(i + 1)] - m0) / rk)
    rks.append(1.0)
    r_mat, b_vec = [], []
    factorial = 1
    for i in range(1, order + 1):
        r_mat.append([r ** (i - 1) for r in rks])
        b_vec.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    if order == 1:
        rhos_c = [0.5]
    else:
        rhos_c = torch.linalg.solve(torch.tensor(r_mat, dtype=torch.float64),
                                    torch.tensor(b_vec, dtype=torch.float64)).tolist()
    x_t_ = sigma_t / s0 * last_sample - alpha_t * h_phi_1 * m0
    corr = 0.0
    for rho, d in zip(rhos_c[:-1], d1s, strict=True):
        corr = corr + rho * d
    d1_t = model_t - m0
    return x_t_ - alpha_t * b_h * (corr + rhos_c[-1] * d1_t)
