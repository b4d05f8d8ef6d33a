"""NaN/Inf never enter or leave a run: an update that would leave a weight non-finite is undone (on every rank, with
no copy of the state), a run whose updates keep being undone stops, and no checkpoint, export or loaded model holds a
NaN/Inf (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from idgrpo.cli import main
from idgrpo.engine import (
    FSDP,
    CheckpointDamaged,
    Checkpointer,
    NonFiniteError,
    NonFiniteGuard,
    build_optimizer,
    export_full_weights,
    nonfinite_summary,
    step_if_finite,
)
from idgrpo.testing import randn, run_distributed

# ---------------------------------------------------------------------------------------------- the step


def _params(seed=0):
    ps = [torch.nn.Parameter(randn(5, 3, seed=seed)), torch.nn.Parameter(randn(7, seed=seed + 1))]
    for i, p in enumerate(ps):
        p.grad = randn(*p.shape, seed=seed + 10 + i)
    return ps


OPTIMIZERS = {
    "foreach AdamW": lambda ps: build_optimizer(ps, lr=0.1, weight_decay=0.01),
    "fused AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, fused=True),
    "Adam, L2 decay": lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01, foreach=True),
}


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_finite_updates_equal_a_plain_step(kind):
    ours, theirs = _params(), _params()
    opt_ours, opt_theirs = OPTIMIZERS[kind](ours), OPTIMIZERS[kind](theirs)
    for _ in range(3):
        assert step_if_finite(opt_ours, torch.tensor(1.0)).item() == 0.0
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert all(torch.equal(opt_ours.state[a][k], opt_theirs.state[b][k]) for k in opt_theirs.state[b])


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("lr", [float("inf"), 1e38])  # 1e38: finite, but the update overflows
def test_an_update_that_would_leave_a_weight_non_finite_is_undone(kind, lr):
    ps = _params()
    opt = OPTIMIZERS[kind](ps)
    step_if_finite(opt, torch.tensor(1.0))  # moments and step count exist
    weights, state = _snapshot(ps, opt)
    for pg in opt.param_groups:
        pg["lr"] = lr
    skipped = step_if_finite(opt, torch.tensor(1.0), torch.tensor(2.0))  # every checked value is finite
    assert skipped.item() == 1.0
    for p, w, s in zip(ps, weights, state):
        assert torch.equal(p.detach(), w)
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())  # moments and step count too
    for pg in opt.param_groups:
        pg["lr"] = 0.1
    assert step_if_finite(opt, torch.tensor(1.0)).item() == 0.0
    assert all(torch.isfinite(p).all() and not torch.equal(p.detach(), w) for p, w in zip(ps, weights))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sync-free path is fused AdamW on CUDA")
def test_the_check_and_the_skip_need_no_host_sync_on_cuda():
    ps = [torch.nn.Parameter(randn(1 << 20, seed=0, device="cuda")), torch.nn.Parameter(randn(33, seed=1,
                                                                                          device="cuda"))]
    opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)  # (build_optimizer prefers apex, which costs one host read)
    for lr in (1e-3, float("inf"), 1e-3):
        for i, p in enumerate(ps):
            p.grad = randn(*p.shape, seed=10 + i, device="cuda")
        for pg in opt.param_groups:
            pg["lr"] = lr
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard = NonFiniteGuard(5)
            guard.update(step_if_finite(opt, torch.ones((), device="cuda")))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert guard.check() == (1 if lr == float("inf") else 0)
    assert all(torch.isfinite(p).all() for p in ps)


def test_guard_counts_streaks_across_checks_and_stops_the_run():
    guard = NonFiniteGuard(3, hint="lower --lr")
    for skipped in (0, 1, 1, 0, 1, 1):
        guard.update(torch.tensor(float(skipped)))
    assert guard.check(6) == 4  # two streaks of 2: not yet
    guard.update(torch.tensor(1.0))  # the streak goes on across the check: 3
    with pytest.raises(NonFiniteError, match=r"3 updates in a row were undone .* \(checked at step 7\); the run is "
                                             r"stopped \(limit 3\).*; lower --lr"):
        guard.check(7)
    never = NonFiniteGuard(0)
    for _ in range(50):
        never.update(torch.tensor(1.0))
    assert never.check() == 50
    assert NonFiniteGuard(2).check() == 0  # nothing stepped yet


def test_nonfinite_summary_counts():
    values = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert nonfinite_summary(values) == "1 NaN, 2 Inf of 4 values"
    assert nonfinite_summary(values.to(torch.float8_e4m3fn)) is not None
    assert nonfinite_summary(torch.ones(3, dtype=torch.bfloat16)) is None
    assert nonfinite_summary(torch.arange(3)) is None


# ---------------------------------------------------------------------------------------------- checkpoints


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = FSDP(Tiny())
    opt = build_optimizer(model.trainable_parameters(), lr=1e-2)
    for p in model.trainable_parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, opt


def _poison_param(model, name):
    """NaN into parameter `name`'s slice of its group's master shard."""
    for g in model.groups:
        if name in g.names:
            i = g.names.index(name)
            with torch.no_grad():
                g.master[g.offsets[i]] = float("nan")
            return
    raise KeyError(name)


def test_checkpoints_with_nan_are_neither_written_nor_loaded(tmp_path):
    model, opt = _trained()
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(1, model, opt)
    _poison_param(model, "b.weight")
    with pytest.raises(NonFiniteError, match=r"step_00000002: checkpoint not written: master weights of b\.weight "
                                             r"\(1 NaN of \d+ values\)"):
        ck.save(2, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]

    clean, clean_opt = _trained()
    group = clean.groups[0]
    clean_opt.state[group.master]["exp_avg"][0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"not written: optimizer state 'exp_avg' of {group.names[0]} \\(1 Inf"):
        ck.save(2, clean, clean_opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]

    # A checkpoint written by older code with a NaN in it: refused on load, naming the file and the parameter
    bad = tmp_path / "step_00000001" / "rank_00000.safetensors"
    tensors = load_file(bad)
    key = next(k for k in tensors if k.endswith("::master"))
    tensors[key][-1] = float("nan")
    save_file(tensors, str(bad), metadata={"format": "idgrpo-checkpoint"})
    fresh, fresh_opt = _trained(1)
    with pytest.raises(CheckpointDamaged, match=r"rank_00000\.safetensors: master weights of '.*' hold non-finite "
                                                r"values \(1 NaN of"):
        ck.load(tmp_path / "step_00000001", fresh, fresh_opt)


def test_exports_refuse_nan(tmp_path):
    from idgrpo.models.wan_dit import WanConfig, WanDiT
    from idgrpo.models.weights import save_diffusers
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

    model, _ = _trained()
    _poison_param(model, "a.bias")
    with pytest.raises(NonFiniteError, match=r"model\.safetensors: not written: tensor 'a\.bias' holds non-finite"):
        export_full_weights(model, tmp_path / "full" / "model.safetensors")
    assert not any((tmp_path / "full").iterdir())

    reward = IdentityRewardModel(RewardModelConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2, parts=2))
    with torch.no_grad():
        reward.score_head[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"reward_model\.safetensors: not written: tensor 'score_head\.1\.weight'"):
        reward.save(tmp_path / "reward")
    assert not any((tmp_path / "reward").iterdir())

    dit = WanDiT(WanConfig.from_name("tiny"))
    with torch.no_grad():
        dit.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not written: tensor 'proj_out\.weight'"):
        save_diffusers(dit, tmp_path / "dit")
    assert not any((tmp_path / "dit").iterdir())


# ---------------------------------------------------------------------------------------------- loaders


def _poison_file(file, key):
    tensors = load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_model_loaders_refuse_nan_weights(tmp_path):
    from idgrpo.models.wan_dit import WanConfig, WanDiT
    from idgrpo.models.weights import CheckpointError, WeightFiles, load_wan_dit, save_diffusers

    save_diffusers(WanDiT(WanConfig.from_name("tiny")), tmp_path / "dit")
    weights = tmp_path / "dit" / "diffusion_pytorch_model.safetensors"
    _poison_file(weights, "blocks.0.attn1.to_q.weight")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: tensor "
                                              r"'blocks\.0\.attn1\.to_q\.weight' holds non-finite values \(1 NaN of"):
        load_wan_dit(tmp_path / "dit")

    pth = tmp_path / "weights.pth"
    torch.save({"x": torch.ones(2), "y": torch.tensor([1.0, float("inf")])}, pth)
    files = WeightFiles([pth])
    assert torch.equal(files["x"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"weights\.pth: tensor 'y' holds non-finite values \(1 Inf of 2"):
        dict(files.items())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    main(["synth-pairs", "--out", str(out), "--num-videos", "6", "--pairs-per-video", "4", "--num-frames", "9",
          "--seed", "3"])
    return out


TRAIN = ["--held-out-fraction", "0.34", "--batch-size", "8", "--threads", "1", "--epochs", "2", "--model.image-size",
         "16", "--model.patch-size", "8", "--model.dim", "16", "--model.depth", "1", "--model.heads", "2",
         "--model.parts", "2"]


def test_train_reward_stops_when_every_update_is_undone(pairs, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteError, match=r"2 updates in a row were undone .*--max-undone-steps"):
        main(["train-reward", "--data", str(pairs / "pairs.jsonl"), "--out", str(out), *TRAIN, "--lr", "1e38",
              "--max-undone-steps", "2"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == 1.0 and record["step"] == 2
    assert not list((out / "checkpoints").glob("step_*"))
    assert not (out / "final").exists()


def test_reward_model_with_nan_weights_is_refused_by_score_and_init_from(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train-reward", "--data", str(pairs / "pairs.jsonl"), "--out", str(out), *TRAIN])
    final = out / "final" / "reward_model.safetensors"
    _poison_file(final, "score_head.1.weight")
    rows = [json.loads(line) for line in (pairs / "pairs.jsonl").read_text().splitlines()]
    refs = [str(pairs / p) for p in rows[0]["refs_a"].split(";")]
    for argv in (["score", "--model", str(out / "final"), "--videos", str(pairs / rows[0]["video_a"]), "--refs", *refs,
                  "--out", str(tmp_path / "scores.csv")],
                 ["train-reward", "--data", str(pairs / "pairs.jsonl"), "--out", str(tmp_path / "ft"), *TRAIN,
                  "--init-from", str(out / "final")]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        line = capsys.readouterr().err.strip()
        assert f"{final}: tensor 'score_head.1.weight' holds non-finite values (1 NaN of" in line, line
    assert not (tmp_path / "scores.csv").exists()


# ---------------------------------------------------------------------------------------------- two ranks


def _two_ranks(rank, world_size, directory):
    torch.manual_seed(0)
    model = FSDP(Tiny())
    opt = build_optimizer(model.trainable_parameters(), lr=1e-2)
    for p in model.trainable_parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)  # only rank 1 sees a bad loss
    skipped = step_if_finite(opt, loss).item()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.trainable_parameters(), before))
    g = next(g for g in model.groups if g.trainable and not g.replicated and g.shard_numel)
    if rank == 1:
        with torch.no_grad():
            g.master[0] = float("inf")  # rank 1's shard only
    try:
        Checkpointer(directory, keep=2).save(1, model, opt)
        error = None
    except NonFiniteError as e:
        error = str(e)
    return {"skipped": skipped, "unchanged": unchanged, "error": error}


def test_two_ranks_skip_together_and_refuse_a_save_together(tmp_path):
    results = run_distributed(_two_ranks, 2, tmp_path, timeout_s=120)
    assert [r["skipped"] for r in results] == [1.0, 1.0] and all(r["unchanged"] for r in results)
    assert results[0]["error"] == results[1]["error"] is not None
    assert "rank 1: master weights of " in results[0]["error"] and "1 Inf of" in results[0]["error"]
    assert not list(tmp_path.glob("step_*"))
