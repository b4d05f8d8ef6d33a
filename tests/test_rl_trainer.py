"""The GRPO trainer on the toy flow policy (CPU): on-policy ratio, N ranks = 1 rank, learning, edge cases, resume,
hooks and plots."""

import json
import math

import pytest
import torch

from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow, read_prompts
from idgrpo.rl.data import assign_epoch
from idgrpo.rl.toy import ToyFlowPolicy, brightness_score, toy_conditioning, toy_decode
from idgrpo.rl.update import Meters

SHAPE = (4, 2, 8, 8)  # (C, F, H, W) latent of the toy policy


def make_trainer(tmp_path, *, score=brightness_score, rows=4, eval_rows=0, **overrides):
    settings = dict(run_dir=str(tmp_path), resume=False, epochs=2, eval_every=0, save_every=1000, prompts_per_epoch=2,
                    group_size=4, rollout_batch_size=4, train_batch_size=2)
    settings.update(overrides)
    guidance = settings.pop("guidance", 1.0)  # the conditioning's, not the algorithm's
    cfg = GRPOConfig.from_name("tiny", **settings)
    prompts = [PromptRow(f"prompt {i}") for i in range(rows)]
    return GRPOTrainer(cfg, ToyFlowPolicy(SHAPE, seed=1), score=score, decode=toy_decode,
                       build_conditioning=lambda rs: toy_conditioning([r.prompt for r in rs], guidance),
                       latent_shape=SHAPE, train_rows=prompts, eval_rows=prompts[:eval_rows], log=lambda m: None)


def trainable(trainer):
    return {k: v.clone() for k, v in trainer.policy.full_state_dict(trainable_only=True).items()}


def test_group_sampler_repeats_rows_and_splits_evenly():
    full = assign_epoch(5, 3, 4, epoch=2, seed=7, rank=0, world_size=1)
    assert len(set(full.row_ids)) == 3
    assert sorted(full.row_ids) == sorted(r for r in set(full.row_ids) for _ in range(4))
    assert len(set(full.seeds)) == 12
    parts = [assign_epoch(5, 3, 4, epoch=2, seed=7, rank=r, world_size=3) for r in range(3)]
    assert sum((p.local_rows for p in parts), []) == full.row_ids
    assert sum((p.local_seeds for p in parts), []) == full.seeds
    assert assign_epoch(5, 3, 4, epoch=3, seed=7, rank=0, world_size=1).seeds != full.seeds
    with pytest.raises(ValueError, match="divisible"):
        assign_epoch(5, 3, 4, epoch=0, seed=0, rank=0, world_size=5)


def test_shared_initial_noise_gives_a_group_one_starting_latent_on_any_world_size():
    full = assign_epoch(5, 3, 4, epoch=2, seed=7, rank=0, world_size=1, shared_initial_noise=True)
    assert full.seeds == assign_epoch(5, 3, 4, epoch=2, seed=7, rank=0, world_size=1).seeds
    by_row = {}
    for row, initial in zip(full.row_ids, full.initial_seeds, strict=True):
        by_row.setdefault(row, set()).add(initial)
    assert all(len(v) == 1 for v in by_row.values()) and len(set.union(*by_row.values())) == 3
    assert not set(full.initial_seeds) & set(full.seeds)
    parts = [assign_epoch(5, 3, 4, epoch=2, seed=7, rank=r, world_size=2, shared_initial_noise=True) for r in range(2)]
    assert sum((p.local_initial_seeds for p in parts), []) == full.initial_seeds
    assert assign_epoch(5, 3, 4, epoch=2, seed=7, rank=0, world_size=1).local_initial_seeds is None


def test_shared_initial_noise_rollout_starts_each_group_from_one_latent(tmp_path):
    trainer = make_trainer(tmp_path, shared_initial_noise=True, sde_window_size=2, sde_window_start=0,
                           timestep_fraction=1.0)
    rollout = trainer.rollout(0)
    assignment, rewards = rollout.assignment, rollout.rewards
    first = rollout.states[:, 0]  # x before the first (trained) step = the initial latent
    rows = torch.tensor(assignment.row_ids)
    for row in set(assignment.row_ids):
        group = first[rows == row]
        assert (group - group[0]).abs().max() == 0
        assert rewards[rows == row].std() > 0  # the SDE steps still make the videos differ
    a, b = sorted(set(assignment.row_ids))[:2]
    assert (first[rows == a][0] - first[rows == b][0]).abs().max() > 1e-3


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_on_policy_ratio_is_one_when_rollout_and_train_micro_batches_differ(tmp_path, kernels, monkeypatch):
    # CFG on (batched branches), rollout batch 3 vs training micro-batch 2, KL against the adapters-off reference;
    # with the fused Triton step + loss (the interpreter on CPU) as well as the PyTorch references.
    monkeypatch.setenv("IDGRPO_KERNELS", kernels)
    trainer = make_trainer(tmp_path, guidance=4.5, rollout_batch_size=3, train_batch_size=2, prompts_per_epoch=3,
                           group_size=3, kl_beta=0.004, reference="lora", epochs=1)
    record = trainer.train_epoch(0)
    assert record["trained_samples"] == 9 and record["dropped"] == 0
    assert record["max_abs_ratio_minus_1_first_inner"] < 1e-6
    assert record["clipfrac"] == 0.0 and record["approx_kl"] < 1e-12
    assert record["kl"] < 1e-10  # zero-initialised adapters: the policy IS the reference before the first update
    assert trainer.optimizer_steps == 1 and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0


def test_sliding_window_frozen_copy_reference_several_updates_and_reward_thread(tmp_path):
    import threading

    threads = set()

    def score(frames, refs, prompts):
        threads.add(threading.current_thread().name)
        return brightness_score(frames)

    trainer = make_trainer(tmp_path, score=score, num_steps=8, sde_window_size=2, sde_window_slide_every=1,
                           sde_window_stride=3, kl_beta=0.01, reference="copy", updates_per_epoch=2,
                           inner_epochs=2, epochs=3, rollout_batch_size=2)
    history = trainer.train()
    assert [h["sde_window_start"] for h in history] == [0, 3, 6]
    assert all(name.startswith("reward") for name in threads)  # scored on the worker thread, not the main one
    assert trainer.optimizer_steps == 3 * 2 * 2
    assert all(h["max_abs_ratio_minus_1_before_update"] < 1e-6 for h in history)
    assert history[-1]["kl"] > 0  # the policy drifts from the frozen copy once updated
    assert history[0]["max_abs_ratio_minus_1_first_inner"] > 1e-6  # later micro-batches see the updated policy


def test_reference_means_come_from_the_frozen_copy_during_rollout(tmp_path):
    from idgrpo.kernels.grpo_loss import grpo_step
    from idgrpo.rl.sampler import guided_velocity

    trainer = make_trainer(tmp_path, kl_beta=0.01, reference="copy", guidance=3.0)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(0.05)  # move the policy away from the copy
    rollout = trainer.rollout(0)
    cond, plan = rollout.conditioning, rollout.plan
    assert rollout.ref_means.shape == rollout.states[:, 1:].shape
    k = plan.trained[0]
    sigma, sigma_next, std, t = trainer.step_schedule.at(k, 8)
    x = rollout.states[:, 0]
    eps = torch.zeros_like(x)
    ref_mean = grpo_step(x, guided_velocity(trainer.reference, x, t, cond), sigma, sigma_next, std, eps)[2]
    policy_mean = grpo_step(x, guided_velocity(trainer.policy, x, t, cond), sigma, sigma_next, std, eps)[2]
    torch.testing.assert_close(rollout.ref_means[:, 0], ref_mean, rtol=1e-5, atol=1e-5)
    assert (policy_mean - ref_mean).abs().max() > 1e-3


def test_tiny_run_raises_the_brightness_reward(tmp_path):
    trainer = make_trainer(tmp_path, epochs=20, eval_every=10, eval_rows=2, eval_steps=8, save_every=10, seed=0)
    history = trainer.train()
    rewards = [h["reward_mean"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.03, rewards
    evals = [h["eval_reward"] for h in history if "eval_reward" in h]
    assert len(evals) == 2 and evals[1] > evals[0]
    assert (tmp_path / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "ema.safetensors").is_file() and (tmp_path / "checkpoints").is_dir()
    assert sorted(p.suffix for p in (tmp_path / "samples").iterdir()).count(".gif") == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and "zero_std_fraction" in json.loads(lines[-1])


def test_zero_variance_groups_are_dropped_and_make_no_update(tmp_path):
    trainer = make_trainer(tmp_path, score=lambda frames, refs, prompts: torch.full((frames.shape[0],), 0.5))
    before = trainable(trainer)
    record = trainer.train_epoch(0)
    assert record["zero_std_fraction"] == 1.0 and record["dropped"] == 8 and record["trained_samples"] == 0
    assert trainer.optimizer_steps == 0
    for k, v in trainable(trainer).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_nan_rewards_are_left_out_and_counted(tmp_path):
    import threading

    def score(frames, refs, prompts):
        assert threading.current_thread() is threading.main_thread()  # overlap_reward=False scores inline
        r = brightness_score(frames)
        bad = torch.tensor([p == "prompt 0" for p in prompts])
        return torch.where(bad, torch.full_like(r, float("nan")), r)

    trainer = make_trainer(tmp_path, score=score, rows=2, overlap_reward=False)  # both rows drawn: one group NaN
    record = trainer.train_epoch(0)
    assert record["nonfinite_rewards"] == 4 and record["dropped"] == 4 and record["trained_samples"] == 4
    assert math.isfinite(record["reward_mean"]) and math.isfinite(record["grad_norm"])
    assert all(torch.isfinite(v).all() for v in trainable(trainer).values())


def test_a_crashing_reward_call_gives_nan_rewards_counts_and_eventually_aborts(tmp_path, capsys):
    calls = {"n": 0}

    def flaky(frames, refs, prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("reward server unavailable")
        return brightness_score(frames)

    trainer = make_trainer(tmp_path, score=flaky, rollout_batch_size=2, max_reward_failures=1)
    record = trainer.train_epoch(0)
    assert record["reward_failures"] == 1 and record["nonfinite_rewards"] == 2
    assert record["dropped"] >= 2 and math.isfinite(record["reward_mean"])
    assert "reward server unavailable" in capsys.readouterr().err
    calls["n"] = 1  # the next call fails again: 2 failures > max_reward_failures = 1
    with pytest.raises(RuntimeError, match="failed 2 times"):
        trainer.train_epoch(1)


def test_a_non_finite_gradient_undoes_the_update(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_epoch(0)  # creates the AdamW state
    before = trainable(trainer)
    moments = [t.clone() for s in trainer.optimizer.state.values() for t in s.values() if t.ndim > 0]
    for p in trainer.params:
        p.grad = torch.full_like(p, float("nan"))
    meters = Meters(trainer.device)
    trainer._optimizer_step(meters)
    assert meters.means()["skipped_update"] == 1.0 and int(trainer.skipped_updates) == 1
    for k, v in trainable(trainer).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    after = [t for s in trainer.optimizer.state.values() for t in s.values() if t.ndim > 0]
    for a, b in zip(after, moments, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_continues_the_same_trajectory(tmp_path):
    straight = make_trainer(tmp_path / "a", epochs=4, kl_beta=0.004, reference="lora")
    straight.train()
    first = make_trainer(tmp_path / "b", epochs=2, kl_beta=0.004, reference="lora")
    first.train()
    resumed = make_trainer(tmp_path / "b", epochs=4, kl_beta=0.004, reference="lora", resume=True)
    history = resumed.train()
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    logged = [json.loads(line)["epoch"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]  # each epoch logged once across the two runs
    make_trainer(tmp_path / "b", epochs=1).train()  # a fresh run (resume off) in the same directory
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 1
    assert [h["reward_mean"] for h in history] == pytest.approx([h["reward_mean"] for h in straight.history],
                                                                rel=1e-6)
    for k, v in trainable(straight).items():
        torch.testing.assert_close(trainable(resumed)[k], v, rtol=1e-6, atol=1e-7)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_training_plot_has_a_panel_per_curve_and_survives_extreme_values(tmp_path):
    from idgrpo.rl.plots import plot_training

    history = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "kl": 1e-4 * e, "clipfrac": 0.01 * e,
                **({"eval_reward": 0.2 * e} if e % 2 else {})} for e in range(6)]
    width, height = _png_size(plot_training(history, tmp_path / "all.png"))
    reward_only = [{"epoch": e, "reward_mean": 0.1 * e} for e in range(6)]
    narrow, same_height = _png_size(plot_training(reward_only, tmp_path / "reward.png"))
    assert same_height == height and width == 3 * narrow  # one panel per curve family: reward, KL, clip fraction
    # A reward of 1e38 (the old hand-drawn plot divided by zero on it), NaN/Inf values and a lone epoch still plot.
    odd = [{"epoch": 0, "reward_mean": 1e38, "reward_std": float("inf"), "kl": float("nan")},
           {"epoch": 1, "reward_mean": -1e38, "eval_reward": float("inf"), "clipfrac": 0.5}]
    assert _png_size(plot_training(odd, tmp_path / "odd.png"))[0] == 2 * narrow  # reward and clip fraction
    assert plot_training([{"epoch": 3, "reward_mean": 1e38}], tmp_path / "one.png") is not None
    assert plot_training([{"epoch": 0, "reward_mean": float("nan")}], tmp_path / "none.png") is None


def test_a_failing_plot_is_logged_and_counted_and_never_stops_training(tmp_path, monkeypatch):
    from idgrpo.rl import trainer as trainer_module

    def broken(history, path, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(trainer_module, "plot_training", broken)
    trainer = make_trainer(tmp_path, epochs=2, eval_every=1, eval_rows=1, eval_steps=2, eval_videos=0)
    lines = []
    trainer.log = lines.append
    history = trainer.train()
    assert len(history) == 2 and trainer.plot_failures == 2  # one per evaluation; the last epoch plots once
    assert sum("could not write the training plot" in line and "ZeroDivisionError" in line for line in lines) == 2


def test_train_calls_the_hooks_and_the_demo_loop_needs_nothing_else(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, eval_every=2, eval_rows=2, eval_steps=2, eval_videos=0)
    seen, evaluations = [], []
    history = trainer.train(on_epoch_end=lambda t, record: seen.append((t.epoch, record["epoch"])),
                            on_evaluate=lambda t, epoch, reward: evaluations.append((epoch, reward)))
    assert seen == [(1, 0), (2, 1), (3, 2)]  # the trainer's epoch counter has advanced when the hook runs
    assert [e for e, _ in evaluations] == [1, 2]
    assert [r for _, r in evaluations] == [h["eval_reward"] for h in history if "eval_reward" in h]
    assert (tmp_path / "reward_curve.png").is_file() and (tmp_path / "checkpoints").is_dir()


def test_state_dict_snapshot_replays_the_same_epoch(tmp_path):
    import copy

    trainer = make_trainer(tmp_path, kl_beta=0.004, reference="lora")
    trainer.train_epoch(0)
    snapshot = copy.deepcopy(trainer.state_dict())
    first = trainer.train_epoch(1)
    weights = trainable(trainer)
    trainer.load_state_dict(snapshot)
    assert trainer.optimizer_steps == snapshot["optimizer_steps"]
    again = trainer.train_epoch(1)
    assert again == first
    for k, v in trainable(trainer).items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    other = make_trainer(tmp_path / "other", rows=4)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({**snapshot, "params": [p[:1] for p in snapshot["params"]]})


def test_an_update_that_would_leave_weights_non_finite_is_skipped(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_epoch(0)
    before = trainable(trainer)
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")  # a finite gradient, an infinite step
    record = trainer.train_epoch(1)
    assert record["skipped_update"] == 1.0 and record["skipped_updates_total"] == 1.0
    for k, v in trainable(trainer).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # max_undone_steps in a row stop the run (the engine's NonFiniteGuard, as in train-reward).
    from idgrpo.engine import NonFiniteError

    stopped = make_trainer(tmp_path / "stopped", updates_per_epoch=2, max_undone_steps=2)
    for group in stopped.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteError, match="2 updates in a row were undone.*--max-undone-steps"):
        stopped.train_epoch(0)
    assert all(torch.isfinite(v).all() for v in trainable(stopped).values())


def test_train_rows_load_their_reference_images(tmp_path):
    """train-grpo reads its CSV with the shared reader (tests/test_prompts.py covers the format); references are
    loaded as uint8 images, absolute paths kept, and a missing one is named with its line."""
    pytest.importorskip("av")
    from idgrpo.media import write_image

    image = torch.randint(0, 256, (6, 10, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_image(tmp_path / "a.png", image)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(f'ref_paths,prompt\n"a.png;{tmp_path / "b.png"}",two people talk\n,a person walks\n')
    rows = read_prompts(csv_path)
    assert [r.prompt for r in rows] == ["two people talk", "a person walks"]
    assert rows[0].ref_paths == [tmp_path / "a.png", tmp_path / "b.png"] and rows[1].ref_paths == []
    with pytest.raises(FileNotFoundError, match="train.csv line 2: reference image .*b.png not found"):
        read_prompts(csv_path, references="load")
    csv_path.write_text("ref_paths,prompt\na.png,one person\n")
    (row,) = read_prompts(csv_path, references="load")
    assert torch.equal(row.references[0], image)


def test_cli_train_grpo_tiny_toy_and_tiny_wan_dit_with_lora(tmp_path):
    from idgrpo.cli import main

    main(["train-grpo", "tiny", "--epochs", "2", "--eval-every", "2", "--run-dir", str(tmp_path / "toy")])
    assert len((tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()) == 2
    # The real model path: Wan DiT + LoRA, KL against the adapters switched off, PEFT export.
    main(["train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4", "--lora-alpha", "4", "--kl-beta", "0.004",
          "--reference", "lora", "--num-steps", "3", "--epochs", "1", "--eval-every", "0", "--guidance", "3.0",
          "--prompts-per-epoch", "1", "--group-size", "2", "--rollout-batch-size", "2", "--train-batch-size", "1",
          "--run-dir", str(tmp_path / "dit")])
    record = json.loads((tmp_path / "dit" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["max_abs_ratio_minus_1_first_inner"] < 1e-5 and record["kl"] < 1e-8
    config = json.loads((tmp_path / "dit" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "blocks.0.attn1.to_q" in config["target_modules"]  # full names (docs/lora.md)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "dit" / "lora" / "adapter_model.safetensors"))
    assert weights and all(k.startswith("base_model.model.blocks.") for k in weights)
