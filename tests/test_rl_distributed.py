"""N ranks equal 1 rank for the same global batch: sharded trainable weights (full fine-tuning) and replicated LoRA
adapters, with a NaN-reward row so that ranks keep different numbers of samples (weight-0 padding passes), and with
several optimizer steps per epoch (each step's samples are cut from one global order, whatever the world size) and
groups that share their initial latent."""

import pytest
import torch

from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow
from idgrpo.rl.toy import ToyFlowPolicy, brightness_score, toy_conditioning, toy_decode
from idgrpo.testing import run_distributed

SHAPE = (4, 2, 8, 8)


def _nan_for_prompt_1(frames, refs, prompts):
    r = brightness_score(frames)
    return torch.where(torch.tensor([p == "prompt 1" for p in prompts]), torch.full_like(r, float("nan")), r)


def _train(run_dir, lora: bool, epochs: int = 3, resume: bool = False, updates: int = 1, shared: bool = False,
           accumulation: str = "auto") -> dict:
    cfg = GRPOConfig.from_name("tiny", run_dir=run_dir, resume=resume, epochs=epochs, eval_every=0, save_every=1000,
                               prompts_per_epoch=2, group_size=4, rollout_batch_size=2, train_batch_size=1,
                               kl_beta=0.004, reference="lora", inner_epochs=2,
                               updates_per_epoch=updates, shared_initial_noise=shared,
                               grad_accumulation=accumulation)
    policy = ToyFlowPolicy(SHAPE, seed=1)
    if lora:  # real LoRALinear adapters on the base projection: replicated by FSDP, KL via disable_lora
        torch.manual_seed(0)  # the adapters' gaussian init draws from the global RNG
        apply_lora(policy, 2, 2.0, targets=["base"])
        mark_only_lora_trainable(policy)
    rows = [PromptRow(f"prompt {i}") for i in range(4)]
    trainer = GRPOTrainer(cfg, policy, score=_nan_for_prompt_1, decode=toy_decode,
                          build_conditioning=lambda rs: toy_conditioning([r.prompt for r in rs], 2.0),
                          latent_shape=SHAPE, train_rows=rows, log=lambda m: None)
    history = trainer.train()
    state = trainer.policy.full_state_dict(trainable_only=True)
    return {"rewards": [h["reward_mean"] for h in history], "dropped": [h["dropped"] for h in history],
            "kl": [h["kl"] for h in history], "ratio": [h["max_abs_ratio_minus_1_before_update"] for h in history],
            "state": {k: v.tolist() for k, v in state.items()},  # plain lists: tensors do not outlive the worker
            "replicated": [g.replicated for g in trainer.policy.groups if g.trainable],
            "steps": trainer.optimizer_steps, "local": trainer.accumulate_locally}


def _two_epochs_sharded(rank, world_size, run_dir):
    return _train(run_dir, lora=False, epochs=2)


def _both(rank, world_size, run_dir):
    # 3 optimizer steps per inner epoch over 5 to 8 kept samples: uneven chunks, some a rank has no sample of; the
    # groups share their initial latents. Sharded weights accumulate their gradients sharded (a reduce-scatter per
    # backward, the "auto" choice on 2 ranks) and, in "sharded_local", unsharded under no_sync.
    return {"sharded": _train(f"{run_dir}/sharded", lora=False), "lora": _train(f"{run_dir}/lora", lora=True),
            "chunks": _train(f"{run_dir}/chunks", lora=True, updates=3, shared=True),
            "sharded_local": _train(f"{run_dir}/sharded_local", lora=False, accumulation="local")}


def test_two_ranks_equal_one_rank(tmp_path):
    one = run_distributed(_both, 1, str(tmp_path / "w1"), timeout_s=150)[0]
    two = run_distributed(_both, 2, str(tmp_path / "w2"), timeout_s=150)
    assert one["chunks"]["steps"] > 2 * one["lora"]["steps"]  # several optimizer steps per inner epoch
    for variant, replicated in (("sharded", False), ("lora", True), ("chunks", True), ("sharded_local", False)):
        ref = one[variant]
        assert ref["local"]  # one rank: nothing to shard
        assert ref["replicated"] == [replicated]
        assert sum(ref["dropped"]) > 0  # the NaN row was drawn: uneven kept samples per rank
        assert max(ref["ratio"]) < 1e-5
        assert ref["kl"][-1] > 0  # the adapters moved away from the reference
        for result in two:
            got = result[variant]
            assert got["local"] == (variant != "sharded")  # "auto" shards the gradients of sharded weights
            assert got["replicated"] == [replicated]
            assert got["dropped"] == ref["dropped"]
            assert got["steps"] == ref["steps"]
            assert got["rewards"] == pytest.approx(ref["rewards"], rel=1e-5, abs=1e-6)
            for k, v in ref["state"].items():
                torch.testing.assert_close(torch.tensor(got["state"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6)
        assert any(torch.tensor(v).abs().max() > 0 for k, v in ref["state"].items()
                   if "lora_up" in k or "lora_B" in k)  # something was learned


def test_a_run_saved_at_two_ranks_resumes_at_one_rank_on_the_same_trajectory(tmp_path):
    run_distributed(_two_epochs_sharded, 2, str(tmp_path / "resumed"), timeout_s=150)
    resumed = _train(str(tmp_path / "resumed"), lora=False, epochs=4, resume=True)  # this process: 1 rank
    straight = _train(str(tmp_path / "straight"), lora=False, epochs=4)
    assert resumed["rewards"] == pytest.approx(straight["rewards"], rel=1e-5, abs=1e-6)
    for k, v in straight["state"].items():
        torch.testing.assert_close(torch.tensor(resumed["state"][k]), torch.tensor(v), rtol=1e-5, atol=1e-6)
