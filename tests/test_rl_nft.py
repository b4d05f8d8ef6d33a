"""`GRPOTrainer` with `objective="nft"` (DiffusionNFT, docs/objectives.md#training-with-nft): the old policy's decay
schedule as the official script's, one micro-batch's gradient equal to the official loss on the three predictions,
CFG-free rollouts sampled by the old policy, N ranks equal 1 rank, and a resumed run on the same trajectory."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from test_nft_loss import official_nft_loss  # the official expression, transcribed once

from idgrpo.models.lora import apply_lora, disable_lora, mark_only_lora_trainable
from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow
from idgrpo.rl.nft import OldPolicy, cfg_free, level_noise, nft_forward_backward_step, old_policy_decay
from idgrpo.rl.sampler import Branch, Conditioning, guided_velocity, sample
from idgrpo.rl.schedules import flow_schedule
from idgrpo.rl.toy import ToyFlowPolicy, brightness_score, toy_conditioning, toy_decode
from idgrpo.testing import run_distributed

SHAPE = (4, 2, 8, 8)


def _official_return_decay(step, decay_type):
    # scripts/train_nft_sd3.py (NVlabs/DiffusionNFT), transcribed: the oracle of `old_policy_decay`.
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    decay = (step - flat) * uprate
    return min(decay, uphold)


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_old_policy_decay_is_the_official_schedule(decay_type):
    for step in list(range(0, 1200, 7)) + [74, 75, 76, 208, 209, 500, 501, 10_000]:
        assert old_policy_decay(step, decay_type) == _official_return_decay(step, decay_type)


def test_old_policy_follows_the_trained_weights_by_its_decay():
    weight = torch.nn.Parameter(torch.zeros(5))
    old = OldPolicy([weight], decay_type=1)
    with torch.no_grad():
        weight.add_(1.0)
    assert old.update(300) == pytest.approx(0.3)  # old = 0.3·0 + 0.7·1
    torch.testing.assert_close(old.weights[0], torch.full((5,), 0.7))
    with old.swapped():
        torch.testing.assert_close(weight.detach(), torch.full((5,), 0.7))
    torch.testing.assert_close(weight.detach(), torch.ones(5))  # the trained weights are back


def _lora_policy(seed=1):
    policy = ToyFlowPolicy(SHAPE, seed=seed)
    torch.manual_seed(0)
    apply_lora(policy, 2, 2.0, targets=["base"])
    mark_only_lora_trainable(policy)
    return policy


@pytest.mark.parametrize("drop_front", [0, 1])
def test_one_micro_batch_step_is_the_official_loss_on_old_new_and_reference_predictions(drop_front):
    torch.manual_seed(3)
    policy = _lora_policy()  # the toy policy computes in fp32
    params = [p for p in policy.parameters() if p.requires_grad]
    old = OldPolicy(params, decay_type=1)
    with torch.no_grad():  # the trained adapters move away from the old ones, which are nonzero too
        for p, w in zip(params, old.weights, strict=True):
            w.copy_(torch.randn_like(w) * 0.1)
            p.copy_(w + torch.randn_like(p) * 0.05)
    batch = 3
    context = toy_conditioning(["a", "b", "c"]).branches[0].kwargs["context"]
    cond = Conditioning([Branch({"context": context}, 1.0)], drop_front=drop_front)
    x0 = torch.randn(batch, *SHAPE, dtype=torch.float32)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.9, 0.5, 0.13])
    timestep = (sigma * 1000).long()
    advantages = torch.tensor([2.0, -7.0, 0.3])
    config = GRPOConfig(objective="nft", nft_beta=0.3, adv_clip=5.0, kl_beta=0.05)

    def reference(x, t, **kw):
        with disable_lora(policy):
            return policy(x, t, **kw)

    loss, stats = nft_forward_backward_step(policy, old, reference, cond, x0, noise, sigma, timestep, advantages,
                                            weight=0.5, config=config)
    got = [p.grad.clone() for p in params]

    # The oracle: the three predictions made separately (the old weights in a copy), the official expression.
    for p in params:
        p.grad = None
    old_policy = copy.deepcopy(policy)
    with torch.no_grad():
        for p, w in zip([p for p in old_policy.parameters() if p.requires_grad], old.weights, strict=True):
            p.copy_(w)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.no_grad():
        v_old = guided_velocity(old_policy, x_t, timestep, cond)
        v_ref = guided_velocity(reference, x_t, timestep, cond)
    v_new = guided_velocity(policy, x_t, timestep, cond)
    frames = slice(drop_front, None)
    want = official_nft_loss(v_new[:, :, frames], v_old[:, :, frames], v_ref[:, :, frames], x_t[:, :, frames],
                             x0[:, :, frames], sigma, advantages, beta=0.3, adv_clip_max=5.0, train_beta=0.05)
    (want * 0.5).backward()
    # fp32 (the official script computes its weights in float64; the loss rounds them to fp32)
    torch.testing.assert_close(loss, want.detach().float(), rtol=1e-5, atol=1e-7)
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
        assert g.abs().max() > 0
    assert float(stats["old_deviation"]) > 0 and float(stats["velocity_kl"]) > 0


def test_level_noise_depends_on_the_sample_seed_inner_epoch_and_level_only():
    a = level_noise([5, 6], (2, 3), inner=0, level=1, device=torch.device("cpu"))
    b = level_noise([6], (2, 3), inner=0, level=1, device=torch.device("cpu"))
    torch.testing.assert_close(a[1:], b)  # batching does not change a sample's noise
    assert not torch.equal(a, level_noise([5, 6], (2, 3), inner=1, level=1, device=torch.device("cpu")))
    assert not torch.equal(a, level_noise([5, 6], (2, 3), inner=0, level=2, device=torch.device("cpu")))


class _Counting(ToyFlowPolicy):
    """Records the batch size of every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def forward(self, latents, timestep, **kwargs):
        self.batches.append(latents.shape[0])
        return super().forward(latents, timestep, **kwargs)


def _trainer(run_dir, policy, **overrides):
    cfg = GRPOConfig.from_name("tiny", objective="nft", run_dir=str(run_dir), resume=False, epochs=2,
                               eval_every=0, save_every=1000, prompts_per_epoch=2, group_size=4,
                               rollout_batch_size=4, train_batch_size=2, kl_beta=0.0, **overrides)
    rows = [PromptRow(f"prompt {i}") for i in range(4)]
    return GRPOTrainer(cfg, policy, score=brightness_score, decode=toy_decode,
                       build_conditioning=lambda rs: toy_conditioning([r.prompt for r in rs], 3.0),
                       latent_shape=SHAPE, train_rows=rows, log=lambda m: None)


def test_rollouts_are_cfg_free_and_sampled_by_the_old_policy(tmp_path):
    policy = _Counting(SHAPE, seed=1)
    trainer = _trainer(tmp_path, policy)
    with torch.no_grad():  # trained weights != old weights
        for p in trainer.params:
            p.add_(0.3)
    policy.batches.clear()
    rollout = trainer.rollout(0)
    assert set(policy.batches) == {4}  # guidance 3 asked for 2 branches: NFT runs the conditional one alone
    assert rollout.states.shape[1] == 1 and rollout.log_probs.shape[1] == 0
    rows = [trainer.train_rows[i] for i in rollout.assignment.local_rows]
    cond = cfg_free(toy_conditioning([r.prompt for r in rows], 3.0))
    with trainer.old.swapped():
        want = sample(trainer.policy, cond, flow_schedule(8, 3.0), rollout.assignment.local_seeds, SHAPE,
                      solver="euler", device="cpu").final
    torch.testing.assert_close(rollout.states[:, 0], want, rtol=0, atol=0)
    trained = sample(trainer.policy, cond, flow_schedule(8, 3.0), rollout.assignment.local_seeds, SHAPE,
                     solver="euler", device="cpu").final
    assert not torch.allclose(rollout.states[:, 0], trained)


def _nan_for_prompt_1(frames, refs, prompts):
    r = brightness_score(frames)
    return torch.where(torch.tensor([p == "prompt 1" for p in prompts]), torch.full_like(r, float("nan")), r)


def _train(run_dir, lora: bool, epochs: int = 3, resume: bool = False, updates: int = 2) -> dict:
    cfg = GRPOConfig.from_name("tiny", objective="nft", run_dir=run_dir, resume=resume, epochs=epochs, eval_every=0,
                               save_every=1, prompts_per_epoch=2, group_size=4, rollout_batch_size=2,
                               train_batch_size=1, kl_beta=0.01, reference="lora" if lora else "copy",
                               inner_epochs=2, updates_per_epoch=updates, num_steps=4, timestep_fraction=0.75,
                               nft_old_decay=2 if lora else 1, nft_beta=0.5, lr=1e-2)
    policy = _lora_policy() if lora else ToyFlowPolicy(SHAPE, seed=1)
    rows = [PromptRow(f"prompt {i}") for i in range(4)]
    trainer = GRPOTrainer(cfg, policy, score=_nan_for_prompt_1, decode=toy_decode,
                          build_conditioning=lambda rs: toy_conditioning([r.prompt for r in rs], 1.0),
                          latent_shape=SHAPE, train_rows=rows, log=lambda m: None)
    history = trainer.train()
    state = trainer.policy.full_state_dict(trainable_only=True)
    return {"rewards": [h["reward_mean"] for h in history], "dropped": [h["dropped"] for h in history],
            "loss": [h["loss"] for h in history], "velocity_kl": [h["velocity_kl"] for h in history],
            "state": {k: v.tolist() for k, v in state.items()}, "steps": trainer.optimizer_steps}


def _both(rank, world_size, run_dir):
    return {"sharded": _train(f"{run_dir}/sharded", lora=False), "lora": _train(f"{run_dir}/lora", lora=True)}


def test_two_ranks_equal_one_rank(tmp_path):
    one = run_distributed(_both, 1, str(tmp_path / "w1"), timeout_s=150)[0]
    two = run_distributed(_both, 2, str(tmp_path / "w2"), timeout_s=150)
    for variant in ("sharded", "lora"):
        ref = one[variant]
        assert sum(ref["dropped"]) > 0  # the NaN row was drawn: uneven kept samples per rank
        assert ref["steps"] == 3 * 2 * 2 and ref["velocity_kl"][-1] > 0
        for result in two:
            got = result[variant]
            assert got["dropped"] == ref["dropped"] and got["steps"] == ref["steps"]
            assert got["rewards"] == pytest.approx(ref["rewards"], rel=1e-5, abs=1e-6)
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
            # Gradients are summed in another order on 2 ranks; AdamW divides each by its own root-mean-square, so an
            # element whose gradient is near zero moves by rounding-sized amounts: 2e-5 absolute on weights ~1e-2.
            for k, v in ref["state"].items():
                torch.testing.assert_close(torch.tensor(got["state"][k]), torch.tensor(v), rtol=1e-4, atol=2e-5)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    straight = _train(str(tmp_path / "straight"), lora=True, epochs=4)
    _train(str(tmp_path / "resumed"), lora=True, epochs=2)
    assert (tmp_path / "resumed" / "checkpoints_old").is_dir()
    resumed = _train(str(tmp_path / "resumed"), lora=True, epochs=4, resume=True)
    assert resumed["rewards"] == straight["rewards"] and resumed["loss"] == straight["loss"]
    assert resumed["state"] == straight["state"]  # the old policy was restored too: bit-identical


def test_train_grpo_nft_on_the_tiny_wan_dit_writes_its_exports(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "idgrpo", "train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4",
                          "--objective", "nft", "--nft-solver", "unipc", "--epochs", "2", "--eval-every", "1",
                          "--save-every", "1", "--num-steps", "3", "--eval-steps", "3", "--kl-beta", "1e-4",
                          "--run-dir", str(run)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("old_deviation" in r and "velocity_kl" in r for r in records)
    for name in ("lora", "lora_diffusers", "checkpoints_old", "reward_curve.png"):
        assert (run / name).exists(), name


def test_nft_settings_are_validated():
    for field, value in (("objective", "dpo"), ("nft_solver", "dpm2"), ("nft_old_decay", 3), ("nft_beta", 0.0)):
        with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
            GRPOConfig(**{field: value})


@pytest.mark.parametrize("preset", ["vace-1.3b-nft", "phantom-1.3b-nft", "t2v-1.3b-nft"])
def test_nft_presets_follow_the_official_settings_and_plan(preset):
    from idgrpo.plan import Layout, make_plan
    from idgrpo.rl.config import RecipeConfig

    recipe = RecipeConfig.from_name(preset)
    g = recipe.grpo
    assert (g.objective, g.nft_beta, g.nft_old_decay, g.num_steps, g.nft_levels) == ("nft", 1.0, 1, 10, 9)
    assert (g.kl_beta, g.lr, recipe.lora_rank, recipe.lora_alpha, recipe.guidance) == (1e-4, 3e-4, 32, 64.0, 1.0)
    assert not g.shared_initial_noise
    plan = make_plan(preset, recipe, Layout(nproc_per_node=8, nnodes=1, sp_size=1))
    assert plan.flops["rollout: KL reference"] == 0 and plan.flops["update: old policy + reference forwards"] > 0
    assert plan.fits(80)
