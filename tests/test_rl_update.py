"""The pure pieces of the GRPO update and its configuration, without a model: the micro-batch planner (world-size
invariance, padding passes, loss weights), the config split and its flat overrides, and the trainer's docstring
example."""

import dataclasses
import re

import pytest
import torch

from idgrpo.errors import UsageError
from idgrpo.rl import GRPOConfig, GRPOTrainer, RecipeConfig
from idgrpo.rl.update import plan_update


def _plans(kept, world_size, **settings):
    samples = kept.numel() // world_size
    return [plan_update(kept, samples_per_rank=samples, rank=r, world_size=world_size, **settings)
            for r in range(world_size)]


SETTINGS = dict(micro_batch=2, updates_per_epoch=3, trained_steps=4, seed=5, epoch=2, inner_epochs=2)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_plan_cuts_the_same_global_steps_at_any_world_size(world_size):
    kept = torch.tensor([True, False, True, True, True, True, False, True, True, True, True, False])  # 9 of 12
    plans = _plans(kept, world_size, **SETTINGS)
    reference = _plans(kept, 1, **SETTINGS)[0]
    samples = kept.numel() // world_size
    for inner in range(SETTINGS["inner_epochs"]):
        steps = [p[inner].steps for p in plans]
        assert len({len(s) for s in steps}) == 1 and len(steps[0]) == 3  # min(updates_per_epoch, kept) steps
        for step in range(3):
            sizes = [len(s[step]) for s in steps]
            assert len(set(sizes)) == 1  # every rank runs as many micro-batches: the collectives stay matched
            # The samples a step trains, over all ranks, in global ids: those of the one-rank plan.
            trained = sorted(int(samples * rank + plans[rank][inner].order[m.start + i])
                             for rank in range(world_size) for m in steps[rank][step] for i in range(m.size))
            one = reference[inner]
            expected = sorted(int(one.order[m.start + i]) for m in one.steps[step] for i in range(m.size))
            assert trained == expected and all(kept[trained])
            # Weights: world·size / (share·K) per micro-batch, so that the rank-mean of the summed weights is 1/K.
            total = sum(m.weight for s in steps for m in s[step])
            assert total / world_size == pytest.approx(1 / SETTINGS["trained_steps"])
            for s in steps:
                for m in s[step]:
                    assert (m.size == 0) == (m.weight == 0.0) and m.size <= SETTINGS["micro_batch"]
    flat = sorted(int(samples * r + i) for r, p in enumerate(plans) for i in p[0].order.tolist())
    assert flat == kept.nonzero().flatten().tolist()  # each kept sample once per inner epoch, on its own rank


def test_a_rank_without_kept_samples_runs_padding_passes_and_nothing_kept_makes_no_step():
    kept = torch.tensor([True, True, True, False, False, False])  # rank 1 of 2 rolled out only dropped samples
    busy, idle = _plans(kept, 2, micro_batch=1, updates_per_epoch=1, trained_steps=2, seed=0, epoch=0, inner_epochs=1)
    assert [m.size for m in busy[0].steps[0]] == [1, 1, 1]
    assert [(m.size, m.weight) for m in idle[0].steps[0]] == [(0, 0.0)] * 3 and idle[0].order.numel() == 0
    assert _plans(torch.zeros(6, dtype=torch.bool), 2, **SETTINGS) == [[], []]


def test_plan_is_seeded_by_seed_epoch_and_inner_epoch():
    kept = torch.ones(16, dtype=torch.bool)
    plan = _plans(kept, 1, **SETTINGS)[0]
    assert not torch.equal(plan[0].order, plan[1].order)
    assert torch.equal(plan[0].order, _plans(kept, 1, **SETTINGS)[0][0].order)
    assert not torch.equal(plan[0].order, _plans(kept, 1, **{**SETTINGS, "epoch": 3})[0][0].order)


def test_configs_are_split_by_component_and_flat_overrides_find_their_component():
    recipe = RecipeConfig.from_name("vace-1.3b", train_csv="rows.csv", lr=5e-5, guidance=3.0)
    assert (recipe.train_csv, recipe.guidance, recipe.grpo.lr) == ("rows.csv", 3.0, 5e-5)
    assert recipe.grpo == dataclasses.replace(GRPOConfig.from_name("vace-1.3b"), lr=5e-5)
    assert not {f.name for f in dataclasses.fields(GRPOConfig)} & {"model", "height", "guidance", "lora_rank"}
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        RecipeConfig.from_name("tiny", learning_rate=1.0)
    with pytest.raises(UsageError, match="lr must be a finite number"):
        GRPOConfig(lr=float("inf"))
    with pytest.raises(UsageError, match="needs reference='copy'"):  # a check across both components
        RecipeConfig.from_name("vace-1.3b", lora_rank=0)


def test_the_trainer_docstring_example_runs(tmp_path, monkeypatch, capsys):
    example = re.search(r"\n\n((?:        .*\n|\n)+?)\n    What you plug in", GRPOTrainer.__doc__).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(line[8:] for line in example.splitlines()), "GRPOTrainer docstring", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if re.fullmatch(r"0\.\d+", line)]) == 3  # the hook printed each reward
    assert (tmp_path / "runs" / "toy" / "metrics.jsonl").is_file()
