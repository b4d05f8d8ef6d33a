"""`idgrpo demo --quick` end to end: every stage runs and writes sane outputs (not the improvement figure, which
the full demo reports), and 2 gloo ranks give the same result as 1."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from idgrpo.demo import DemoConfig, decode_latents, demo, encode_frames, grpo_config, layout_maps, vace_context_of
from idgrpo.media import read_image
from idgrpo.testing import run_distributed


def test_trivial_latent_round_trip_and_vace_context():
    from idgrpo.synth import World, WorldConfig
    from idgrpo.synth.oracle import sprite_box

    scene = World(WorldConfig(seed=3, grid=4)).scene(1)
    frames = scene.frames[None]  # (1, T, H, W, 3)
    latent = encode_frames(frames, 4)
    assert latent.shape == (1, 48, 9, 8, 8)
    assert torch.equal(decode_latents(latent, 4), frames)
    maps = layout_maps(scene.boxes, 32)  # (T, 3P, H, W)
    x0, y0, x1, y1 = scene.boxes[1, 0].tolist()
    inside = maps[0, 3]
    assert inside.sum() == (min(x1, 32) - x0) * (min(y1, 32) - y0)
    assert inside[y0, x0] == 1 and maps[0, 4, y0, x0] < -0.8 and maps[0, 5, y1 - 1, x0] > 0.8
    blank = vace_context_of(scene.frames, scene.boxes, scene.references, 4, guide="blank")
    assert blank.shape == (48 * 3, 2 + 9, 8, 8)
    # Reference slots hold the reference latents; the blank guide never shows a pixel inside a person's box.
    assert torch.allclose(blank[:48, 0], encode_frames(scene.references[0][None, None], 4)[0, :, 0])
    boxed = F_unshuffle_mask(maps)
    assert (blank[:48, 2:][boxed] == 0).all()
    # Reference slot p is tagged in person p's layout channels only, with its own sprite's box.
    for p in range(2):
        tag = F.pixel_shuffle(blank[48:, p][None], 4)[0]  # (6, H, W)
        ref_box = sprite_box(scene.references[p])
        assert torch.equal(tag[3 * p], layout_maps(ref_box[None, None], 32)[0, 0])
        assert (tag[3 * (1 - p):3 * (1 - p) + 3] == 0).all()
    # The composite guide: outside the boxes the background, inside them the pasted sprites, which for this clean
    # scene (people on the latent grid, no distortion) rebuild every person pixel of the video exactly.
    composite = vace_context_of(scene.frames, scene.boxes, scene.references, 4)
    assert torch.equal(composite[:, :2], blank[:, :2]) and torch.equal(composite[48:], blank[48:])
    guide = decode_latents(composite[None, :48, 2:], 4)[0]  # (T, H, W, 3)
    assert torch.equal(guide[~pixel_box_mask(maps)], scene.frames[~pixel_box_mask(maps)])
    # The front person (drawn last) is never hidden: in every frame its box shows exactly its reference sprite.
    rx0, ry0, rx1, ry1 = sprite_box(scene.references[1]).tolist()
    sprite = scene.references[1][ry0:ry1, rx0:rx1]
    on = (sprite != torch.tensor((128, 128, 128), dtype=torch.uint8)).any(-1)
    for t in range(9):
        bx0, by0, bx1, by1 = scene.boxes[1, t].tolist()
        assert torch.equal(guide[t, by0:by1, bx0:bx1][on], sprite[on])
        assert torch.equal(scene.frames[t, by0:by1, bx0:bx1][on], sprite[on])
    with pytest.raises(ValueError, match="guide"):
        vace_context_of(scene.frames, scene.boxes, scene.references, 4, guide="paste")


def test_annotated_pairs_are_labelled_by_the_oracle_of_the_policy_samples():
    import dataclasses

    from idgrpo.demo import annotated_pairs, build_policy, concat_pairs, sample_videos, scene_row
    from idgrpo.reward.data import LABELS
    from idgrpo.synth import World, WorldConfig, oracle_consistency

    cfg = DemoConfig(quick=True, annotated_seeds=3, annotation_tie=0.0)
    world = World(WorldConfig(frame_size=32, num_frames=cfg.num_frames, seed=5, grid=4))
    rows = [scene_row(world.scene(i), 4) for i in range(3)]
    policy = build_policy(cfg, torch.device("cpu")).requires_grad_(False)
    pairs = annotated_pairs(cfg, policy, rows, torch.device("cpu"), seed_base=11)
    assert len(pairs) == 3 * 3  # C(3, 2) pairs per row
    assert pairs.kinds == ["annotated"] * 9 and pairs.ref_mask.all()
    # The same draws again: seed_base + 100_003 * k + row.
    draws = [sample_videos(cfg, policy, rows, torch.device("cpu"), 11 + 100_003 * k) for k in range(3)]
    diffs, n = [], 0
    for i, row in enumerate(rows):
        scores = [oracle_consistency(d[i], row.boxes, row.references).video for d in draws]
        for a, b in ((0, 1), (0, 2), (1, 2)):
            diffs.append(scores[a] - scores[b])
            assert torch.equal(pairs.frames_a[n], draws[a][i]) and torch.equal(pairs.frames_b[n], draws[b][i])
            assert torch.equal(pairs.refs_a[n], torch.stack(row.references))
            n += 1
    assert all(d != 0 for d in diffs)
    assert pairs.labels.tolist() == [LABELS["a"] if d > 0 else LABELS["b"] for d in diffs]  # the better one wins
    # A tie threshold between the smallest and the largest difference: the small ones become `same`.
    middle = sorted(abs(d) for d in diffs)[4]
    tied = annotated_pairs(dataclasses.replace(cfg, annotation_tie=middle), policy, rows, torch.device("cpu"), 11)
    assert tied.labels.tolist() == [LABELS["same"] if abs(d) < middle else label
                                    for d, label in zip(diffs, pairs.labels.tolist())]
    assert (tied.labels == LABELS["same"]).sum() == 4
    both = concat_pairs(pairs, tied)
    assert len(both) == 18 and both.kinds == pairs.kinds * 2 and torch.equal(both.labels[9:], tied.labels)
    with pytest.raises(ValueError, match="--annotated-seeds"):
        DemoConfig(annotated_seeds=1)


def pixel_box_mask(maps):
    return maps[:, 0::3].amax(1) > 0  # (T, H, W)


def F_unshuffle_mask(maps):
    import torch.nn.functional as F

    in_box = (maps[:, 0::3].amax(1, keepdim=True) > 0).float().expand(-1, 3, -1, -1)  # (T, 3, H, W)
    return (F.pixel_unshuffle(in_box, 4) > 0).transpose(0, 1)  # (48, T, h, w)


def test_grpo_settings_follow_the_demo_knobs():
    for shared in (True, False):
        cfg = DemoConfig(quick=True, shared_initial_noise=shared, kl_beta=0.03, updates_per_epoch=2)
        g = grpo_config(cfg)
        assert g.shared_initial_noise is shared
        assert (g.kl_beta, g.updates_per_epoch, g.group_size) == (0.03, 2, cfg.group_size)
        assert (g.num_steps, g.sde_window_size) == (cfg.num_steps, cfg.sde_window_size)  # CFG-free: the builder's
    assert DemoConfig().shared_initial_noise  # on by default in the demo (off in GRPOConfig)
    assert not grpo_config(DemoConfig(shared_initial_noise=False)).shared_initial_noise


def _run_quick(run_dir):
    created = not dist.is_initialized()
    try:
        assert demo(DemoConfig(quick=True, threads=1, run_dir=run_dir)) == 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def test_demo_quick_end_to_end(tmp_path, capsys):
    _run_quick(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "oracle identity consistency" in out and "learned identity reward" in out
    assert 0.0 <= summary["reward_model"]["val_acc_non_tie"] <= 1.0
    assert summary["reward_model"]["val_non_tie_pairs"] > 0
    annotated = summary["reward_model"]["annotated"]  # pairs of the pretrained policy's samples, labelled by the oracle
    assert annotated["train_pairs"] > 0 and annotated["val_pairs"] > 0
    assert math.isfinite(summary["reward_change"]) and math.isfinite(summary["oracle_change_relative"])
    for when in ("before", "after"):
        oracle, reward = summary[when]["oracle"], summary[when]["reward"]
        assert len(oracle) == len(reward) == DemoConfig(quick=True).eval_prompts
        assert all(0.0 <= v <= 1.0 for v in oracle)
        assert all(math.isfinite(v) for v in reward)
    assert len(summary["grpo"]["train_reward"]) == DemoConfig(quick=True).grpo_epochs
    assert all(math.isfinite(v) for v in summary["grpo"]["train_reward"])
    assert summary["pretrain"]["last_loss"] < summary["pretrain"]["first_loss"] * 1.5
    assert (tmp_path / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = read_image(tmp_path / "before_after.png")
    cfg = DemoConfig(quick=True)
    shown = min(cfg.gif_videos, cfg.eval_prompts)
    assert sheet.shape[0] == 3 * (shown * cfg.frame_size + (shown - 1) * 4)
    for name in ("sample0_before.gif", "sample0_after.gif", "sample0_refs_before_after.gif"):
        assert (tmp_path / name).read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert (tmp_path / "reward_model" / "reward_model.safetensors").is_file()
    assert (tmp_path / "grpo" / "lora" / "adapter_model.safetensors").is_file()


def _demo_rank(rank, world_size, run_dir):
    assert demo(DemoConfig(quick=True, threads=1, run_dir=run_dir)) == 0
    return None


@pytest.mark.slow
def test_demo_two_ranks_match_one(tmp_path):
    _run_quick(tmp_path / "one")
    run_distributed(_demo_rank, 2, str(tmp_path / "two"), timeout_s=600)
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2
    assert one["reward_model"]["val_acc_non_tie"] == two["reward_model"]["val_acc_non_tie"]
    for when in ("before", "after"):
        assert one[when]["oracle"] == pytest.approx(two[when]["oracle"], abs=1e-4)
        assert one[when]["reward"] == pytest.approx(two[when]["reward"], abs=1e-4)
    assert one["grpo"]["train_reward"] == pytest.approx(two["grpo"]["train_reward"], abs=1e-4)


def test_the_stage_cache_and_the_curve_leave_the_trained_policy_unchanged(tmp_path):
    """Stages 2-3 read back from the cache give stage 4 the same policy and reward model, and stage 4 draws from its
    own seed, so a cached run equals the run that built the cache; the oracle curve's evaluations change nothing
    either. An NFT arm runs on the same cache and records its own diagnostics."""
    created = not dist.is_initialized()
    try:
        cache = tmp_path / "cache"
        settings = dict(quick=True, threads=1, stage_cache=cache)
        assert demo(DemoConfig(run_dir=tmp_path / "built", curve_every=1, **settings)) == 0
        assert len(list(cache.iterdir())) == 1
        assert demo(DemoConfig(run_dir=tmp_path / "cached", curve_every=0, **settings)) == 0
        assert demo(DemoConfig(run_dir=tmp_path / "nft", objective="nft", **settings)) == 0
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    built, cached, nft = (json.loads((tmp_path / name / "summary.json").read_text())
                          for name in ("built", "cached", "nft"))
    assert "cache_load_s" in cached["timings_s"] and "pretrain_s" in built["timings_s"]
    assert cached["before"] == built["before"] and cached["after"] == built["after"]
    assert cached["grpo"]["train_reward"] == built["grpo"]["train_reward"]
    curve = [h for h in built["grpo"]["history"] if "eval_oracle" in h]
    assert len(curve) == DemoConfig(quick=True).grpo_epochs
    assert curve[-1]["eval_oracle"] == built["after"]["oracle_mean"]
    assert all(h["policy_forwards"] > 0 and h["train_wall_s"] > 0 for h in built["grpo"]["history"])
    assert nft["before"] == built["before"]  # the same pretrained policy and reward model
    assert all("old_deviation" in h and "clipfrac" not in h for h in nft["grpo"]["history"])
    assert nft["grpo"]["history"][-1]["zero_std_fraction"] < 1  # its groups vary: no shared initial latent


def test_the_objective_study_reports_time_to_the_paper_arms_gain_and_reward_hacking():
    from bench.objectives import analyse, table

    def run(arm, seed, curve, after, reward_change):
        points = [{"train_wall_s": float(t), "policy_forwards": 10 * t, "oracle": o, "reward": 0.0} for t, o in curve]
        return {"arm": arm, "seed": seed, "oracle_before": 0.5, "oracle_after": after,
                "oracle_gain": after / 0.5 - 1, "reward_change": reward_change, "train_wall_s": curve[-1][0],
                "policy_forwards": 10 * curve[-1][0], "curve": [{"train_wall_s": 0.0, "policy_forwards": 0,
                                                                 "oracle": 0.5, "reward": 0.0}, *points]}

    results = [run("full", 0, [(50, 0.55), (100, 0.6)], 0.6, 1.0),
               run("nft", 0, [(20, 0.61), (40, 0.62)], 0.62, 1.0),      # reaches 0.6 at 20 s: 0.2 of 100 s
               run("window2", 0, [(30, 0.58), (60, 0.59)], 0.59, 1.0),  # never reaches it
               run("sliding", 0, [(30, 0.45), (60, 0.4)], 0.4, 2.0)]    # reward up, oracle down
    analysis = analyse(results)
    assert analysis["full"]["fraction_of_paper_time_to_paper_gain"] == [1.0]
    assert analysis["nft"]["fraction_of_paper_time_to_paper_gain"] == [0.2]
    assert analysis["nft"]["reaches_paper_gain_in_half_the_time_on_every_seed"]
    assert analysis["window2"]["fraction_of_paper_time_to_paper_gain"] == [None]
    assert analysis["sliding"]["reward_hacking_seeds"] == [0] and analysis["nft"]["reward_hacking_seeds"] == []
    text = table(analysis, results)
    assert "never" in text and "seed 0" in text and "+24.0%" in text
