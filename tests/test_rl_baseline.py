"""The benchmark's baseline mode (`BaselineFlags`, passed to `train_epoch`): every switch changes how an epoch is
computed, never what. A tiny seeded run (tiny Wan DiT + LoRA, CFG, KL against the adapters-off reference) with every
switch on gives the default run's rewards, losses, KL and weights; a spy shows each switch is really in force, for
that epoch only, and that the trainer leaves the process-wide kernel switch alone."""

import dataclasses
import os
import threading

import pytest
import torch

from idgrpo.kernels.backend import ENV_VAR
from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
from idgrpo.models.wan_dit import WanAttention, WanConfig, WanDiT
from idgrpo.rl import BaselineFlags, GRPOTrainer, PhaseTimer, PromptRow, RecipeConfig
from idgrpo.rl import rollout as rollout_module
from idgrpo.rl.rollout import mp4_round_trip
from idgrpo.rl.sampler import cfg_conditioning
from idgrpo.rl.toy import brightness_score, prompt_context, toy_decode

SHAPE = (16, 2, 4, 6)  # (C, F, H, W): odd-sized frames after the toy decode (2 x 4 x 6 pixels per channel)
COMPARED = ("reward_mean", "reward_std", "loss", "kl", "clipfrac", "approx_kl", "grad_norm",
            "max_abs_ratio_minus_1_before_update")


def make_trainer(tmp_path, policy_spy=None, score=brightness_score):
    # adam_eps 1e-3: AdamW's first step is ~lr·sign(g), which turns float rounding on a near-zero gradient element
    # into a whole step; a large epsilon keeps the update proportional to the gradient, so comparing weights
    # compares the gradients the two modes computed.
    config = RecipeConfig.from_name("tiny", model="tiny", num_steps=3, guidance=4.5, prompts_per_epoch=2,
                                    group_size=2, rollout_batch_size=2, train_batch_size=1, kl_beta=0.05,
                                    reference="lora", lora_rank=4, lora_alpha=4.0, lr=3e-2, adam_eps=1e-3,
                                    clip_range=0.2, epochs=2, eval_every=0, resume=False, run_dir=str(tmp_path))
    torch.manual_seed(0)
    wan = WanConfig.from_name("tiny")
    policy = WanDiT(wan).init_weights()
    apply_lora(policy, config.lora_rank, config.lora_alpha, init="gaussian")
    mark_only_lora_trainable(policy)
    if policy_spy is not None:
        policy.register_forward_pre_hook(policy_spy)

    def build(rows):
        context = torch.stack([prompt_context(r.prompt, wan.text_dim) for r in rows])[:, None]  # (B, 1, D)
        return cfg_conditioning({"context": context}, {"context": -context}, config.guidance)

    rows = [PromptRow(f"prompt {i}") for i in range(3)]
    return GRPOTrainer(config.grpo, policy, score=score, decode=lambda x: toy_decode(x * 4.0),
                       build_conditioning=build, latent_shape=SHAPE, train_rows=rows, log=lambda m: None)


def test_every_baseline_switch_on_computes_the_same_training(tmp_path, monkeypatch):
    fast = make_trainer(tmp_path / "fast")
    initial = {k: v.clone() for k, v in fast.policy.full_state_dict(trainable_only=True).items()}
    fast_history = [fast.train_epoch(epoch) for epoch in range(2)]
    slow = make_trainer(tmp_path / "slow")
    monkeypatch.setenv(ENV_VAR, "reference")  # the benchmark's eager kernels: its own, process-wide switch
    slow_history = [slow.train_epoch(epoch, baseline=BaselineFlags.all_on()) for epoch in range(2)]
    assert len(fast_history) == len(slow_history) == 2
    for a, b in zip(fast_history, slow_history, strict=True):
        assert a["trained_samples"] == b["trained_samples"] == 4
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # The KL anchor matters in the second epoch (LoRA moved away from the adapters-off reference).
    assert fast_history[1]["kl"] > 1e-9 and fast_history[0]["grad_norm"] > 0
    a = fast.policy.full_state_dict(trainable_only=True)
    b = slow.policy.full_state_dict(trainable_only=True)
    assert a.keys() == b.keys() == initial.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-2  # the compared weights were trained


def test_each_switch_is_in_force_during_the_baseline_epoch(tmp_path, monkeypatch):
    calls = []

    def spy(module, args, kwargs):
        impls = {m.attention_impl for m in module.modules() if isinstance(m, WanAttention)}
        calls.append({"batch": args[0].shape[0], "impl": impls.pop(), "kernels": os.environ.get(ENV_VAR),
                      "grad": torch.is_grad_enabled()})

    round_trips, score_threads = [], []

    def counting_round_trip(frames):
        round_trips.append(tuple(frames.shape))
        return mp4_round_trip(frames)

    def score(frames, references, prompts):
        score_threads.append(threading.current_thread() is threading.main_thread())
        return brightness_score(frames)

    monkeypatch.setattr(rollout_module, "mp4_round_trip", counting_round_trip)
    monkeypatch.delenv(ENV_VAR, raising=False)

    trainer = make_trainer(tmp_path, policy_spy=None, score=score)
    trainer.policy.module.register_forward_pre_hook(spy, with_kwargs=True)
    timer = PhaseTimer(trainer.device)
    trainer.train_epoch(0, baseline=BaselineFlags.all_on(), timer=timer)
    # Two prompts x G 2 = 4 samples in 2 rollout batches of 2; 3 steps, all trained (tiny preset fraction 1.0).
    rollout = [c for c in calls if not c["grad"]]
    train = [c for c in calls if c["grad"]]
    assert {c["batch"] for c in calls} == {1, 2}  # never the batched 2B CFG forward
    assert {c["impl"] for c in calls} == {"sdpa"} and {c["kernels"] for c in calls} == {None}
    # rollout: 2 batches x 3 steps x 2 branches, no reference forward; update: 4 samples x 3 steps x 2 branches,
    # plus as many reference forwards (no grad) for the KL anchor at train time.
    assert len(train) == 4 * 3 * 2
    assert len(rollout) == 2 * 3 * 2 + 4 * 3 * 2
    assert round_trips == [(2, 2, 4, 6, 3)] * 2
    assert score_threads == [True, True]  # synchronous: on the main thread
    assert os.environ.get(ENV_VAR) is None and trainer.policy.module.config.attention_impl == "idgrpo"  # restored
    assert set(timer.seconds) == {"rollout", "reward", "advantage", "update"} and timer.reward_busy_s > 0

    # Default mode: one batched CFG forward per step, the anchor from the rollout, reward on the worker thread.
    calls.clear(), round_trips.clear(), score_threads.clear()
    trainer.train_epoch(1)
    assert {c["batch"] for c in calls if not c["grad"]} == {4}  # 2 branches x rollout batch 2
    assert {c["batch"] for c in calls if c["grad"]} == {2}  # 2 branches x micro-batch 1
    assert len([c for c in calls if c["grad"]]) == 4 * 3
    assert len([c for c in calls if not c["grad"]]) == 2 * 3 * 2  # policy + reference per trained step
    assert {c["impl"] for c in calls} == {"idgrpo"} and round_trips == [] and score_threads == [False, False]


def test_mp4_round_trip_is_exact():
    frames = torch.randint(0, 256, (2, 3, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mp4_round_trip(frames), frames)


def test_baseline_flags_validate():
    assert BaselineFlags.all_on().active and not BaselineFlags().active
    assert all(dataclasses.astuple(BaselineFlags.all_on()))
    with pytest.raises(ValueError, match="bool"):
        BaselineFlags(sdpa_attention=1)
