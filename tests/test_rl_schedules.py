"""σ grids (docs/models.md#sigma-schedules-and-shift), index_for_timestep semantics, and the ODE solvers
against diffusers."""


import pytest
import torch

from idgrpo.rl.sampler import Branch, Conditioning, cfg_conditioning, sample, unipc_sample
from idgrpo.rl.schedules import flow_schedule, shift_sigmas

SPEC_25_SHIFT3 = [999, 986, 971, 956, 940, 923, 904, 885, 864, 842, 818, 792, 765, 735, 702, 667, 628, 586, 539, 487,
                  429, 365, 292, 208, 113]


def test_diffusers_grid_25_steps_shift_3_matches_spec_table():
    s = flow_schedule(25, 3.0, "diffusers")
    assert s.timesteps.tolist() == SPEC_25_SHIFT3
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
    assert s.sigmas.shape == (26,) and s.sigmas[-1].item() == 0.0
    assert s.sigmas[0].item() == pytest.approx(1.0 - 1e-6, abs=1e-7)
    assert s.sigmas[1].item() == pytest.approx(0.98632, abs=1e-5)  # Identity-GRPO's σ_max
    assert s.sigmas[2].item() == pytest.approx(0.97186, abs=1e-5)
    assert s.sigmas[24].item() == pytest.approx(0.11358, abs=1e-5)


@pytest.mark.parametrize("grid,first,second,last", [
    ("wan", (0.99980, 999), (0.99573, 995), (0.09251, 92)),
    ("diffusers", (1.0, 999), (0.99594, 995), (0.09678, 96)),
])
def test_50_steps_shift_5_first_and_last_entries(grid, first, second, last):
    s = flow_schedule(50, 5.0, grid)
    for i, (sigma, t) in ((0, first), (1, second), (49, last)):
        assert s.sigmas[i].item() == pytest.approx(sigma, abs=1e-5)
        assert s.timesteps[i].item() == t


@pytest.mark.parametrize("steps,shift", [(25, 3.0), (50, 5.0), (40, 16.0), (7, 1.0)])
def test_diffusers_grid_equals_diffusers_unipc(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=shift)
    ref.set_timesteps(steps)
    s = flow_schedule(steps, shift, "diffusers")
    assert s.timesteps.tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(s.sigmas, ref.sigmas, rtol=0, atol=0)


def test_wan_grids_and_timestep_truncation():
    s = flow_schedule(10, 5.0, "wan")
    base = torch.linspace(0.999, 0.0, 11, dtype=torch.float64)[:10].numpy()
    expected = shift_sigmas(base, 5.0)
    torch.testing.assert_close(s.sigmas[:-1].double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-7)
    assert s.timesteps.tolist() == [int(v * 1000) for v in expected]  # truncation toward zero, not rounding
    dpm = flow_schedule(10, 5.0, "wan_dpm")
    assert dpm.sigmas[0].item() == 1.0 and dpm.timesteps[0].item() == 1000
    with pytest.raises(ValueError, match="grid"):
        flow_schedule(10, 5.0, "karras")


def test_index_for_timestep_takes_the_second_match_on_duplicates():
    s = flow_schedule(200, 16.0, "diffusers")  # many steps + a big shift: duplicated integer timesteps at σ ≈ 1
    ts = s.timesteps.tolist()
    duplicated = [t for t in set(ts) if ts.count(t) > 1]
    assert duplicated, "expected duplicated integer timesteps in this grid"
    t = duplicated[0]
    first = ts.index(t)
    assert s.index_for_timestep(t) == first + 1
    idx = s.step_indices()
    assert idx[first] == first + 1 and idx[first + 1] == first + 1
    sigma, sigma_next = s.step_sigmas()
    assert sigma[first].item() == s.sigmas[first + 1].item() and sigma_next[first].item() == s.sigmas[first + 2]
    plain = flow_schedule(25, 3.0)
    assert plain.step_indices() == list(range(25))
    with pytest.raises(ValueError, match="not in the schedule"):
        plain.index_for_timestep(1)


def _toy_velocity(weight: torch.Tensor):
    def policy(x, t, ctx):
        tt = t.double().view(-1, 1, 1, 1, 1) / 1000
        mixed = torch.einsum("ij,bjfhw->bifhw", weight, x.double())
        return (torch.tanh(mixed + tt * ctx.double().view(-1, 4, 1, 1, 1)) + 0.5 * x).float()
    return policy


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (25, 5.0)])
def test_unipc_matches_diffusers_scheduler(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    policy = _toy_velocity(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.3)
    ctx = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    ours = unipc_sample(policy, cfg_conditioning({"ctx": ctx}, None, 1.0), flow_schedule(steps, shift), x.clone())
    ref = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=shift)
    ref.set_timesteps(steps)
    y = x.clone()
    for t in ref.timesteps:
        y = ref.step(policy(y, t.expand(2), ctx), t, y).prev_sample
    torch.testing.assert_close(ours, y, rtol=1e-5, atol=2e-6)


class _ExactFlow(torch.nn.Module):
    """v = (x − m)/σ with σ looked up from the integer timestep: every consistent ODE solver lands on m."""

    def __init__(self, schedule):
        super().__init__()
        self.sigma_of = {t: s for t, s in zip(schedule.timesteps.tolist(), schedule.sigmas.tolist())}

    def forward(self, x, t, target):
        sigma = torch.tensor([self.sigma_of[v] for v in t.tolist()], dtype=torch.float64)
        return ((x.double() - target.double()) / sigma.view(-1, 1, 1, 1, 1)).float()


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_ode_solvers_reach_the_target_of_an_exact_flow(solver):
    target = torch.randn(3, 2, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    cond = Conditioning([Branch({"target": target}, 1.0)])
    schedule = flow_schedule(8, 3.0, "diffusers")
    out = sample(_ExactFlow(schedule), cond, schedule, [1, 2, 3], (2, 1, 3, 3), solver=solver)
    assert out.log_probs is None and out.states is None
    torch.testing.assert_close(out.final, target, rtol=1e-4, atol=1e-4)


def test_unipc_rejects_a_grid_starting_at_sigma_one():
    cond = cfg_conditioning({"ctx": torch.zeros(1, 4)}, None, 1.0)
    with pytest.raises(ValueError, match="UniPC"):
        unipc_sample(_toy_velocity(torch.eye(4, dtype=torch.float64)), cond, flow_schedule(4, 1.0, "wan_dpm"),
                     torch.zeros(1, 4, 1, 1, 1))
