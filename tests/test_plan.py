"""`idgrpo plan`: its memory model against the real engine on CPU at tiny sizes (docs/scale-out.md#the-planners-model).

- parameters, gradients, optimizer state, EMA and the KL reference copy: to the byte, against the shards of the
  FSDP-wrapped tiny DiT that `train-grpo --model tiny` builds, on 1 and 2 ranks, with LoRA and full fine-tuning;
- activations: within 10% of what autograd saves in a tiny DiT forward (measured with
  `torch.autograd.graph.saved_tensors_hooks`, storages counted once, weights left out; with activation
  checkpointing, what each checkpointed unit keeps is its inputs, read by a forward pre-hook), on the Triton path the
  GPUs run (through the interpreter), with and without checkpointing, with LoRA and full fine-tuning, VACE, and a
  sequence-parallel rank;
- the targets of docs/scale-out.md: `vace-14b` with LoRA on 8 GPUs of 80 GB, `t2v-14b` full fine-tuning on 16.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from idgrpo import plan
from idgrpo.cli import main
from idgrpo.rl.config import RecipeConfig
from idgrpo.testing import randn, run_distributed

TOLERANCE = 0.10


# ----------------------------------------------------------------------------------------------------- state, exact


def _engine_state(rank: int, world_size: int, lora_rank: int) -> dict:
    """What the trainer's FSDP policy, optimizer, EMA and reference hold on this rank, in bytes."""
    from idgrpo.rl.recipe import build_trainer

    recipe = RecipeConfig.from_name("tiny", model="tiny", lora_rank=lora_rank, lora_alpha=8.0, kl_beta=0.004,
                                    ema_decay=0.9, reference="lora" if lora_rank else "copy")
    trainer = build_trainer(recipe)
    policy = trainer.policy
    units: dict[str, int] = {}
    for g in policy.groups:
        unit = g.key.rsplit("/", 1)[0]
        units[unit] = units.get(unit, 0) + g._nbytes
    root = units.pop("<root>")
    latents, context = randn(2, 16, 2, 4, 4, seed=rank), randn(2, 1, 32, seed=10 + rank)
    hold = policy.no_sync() if trainer.accumulate_locally else torch.enable_grad()
    with hold:
        policy(latents, torch.tensor([500, 600]), context=context).square().mean().backward()
    if trainer.accumulate_locally:
        grads = sum(g.grad_accum.nbytes for g in policy.groups if g.trainable)
        for g in policy.groups:  # what the last backward's reduction would leave, for the optimizer step below
            if g.trainable:
                g.master.grad, g.grad_accum = torch.zeros_like(g.master), None
    else:
        grads = sum(g.master.grad.nbytes for g in policy.groups if g.trainable)
    trainer.optimizer.step()
    reference = trainer.reference
    return {
        "params_sharded": sum(g.master.nbytes for g in policy.groups),
        "params_gathered": root + sum(sorted(units.values(), reverse=True)[:2]),
        "grads": grads,
        "optimizer": sum(t.nbytes for state in trainer.optimizer.state.values() for t in state.values()),
        "ema": sum(t.nbytes for t in trainer.ema.shadow),
        "reference": sum(g.master.nbytes for g in reference.groups) if hasattr(reference, "groups") else 0,
        "recipe": recipe,
    }


def _both_kinds(rank: int, world_size: int) -> list[dict]:
    return [_engine_state(rank, world_size, lora_rank) for lora_rank in (4, 0)]


def assert_state_matches(states: list[dict], world_size: int) -> None:
    for lora, full in states:
        for got in (lora, full):
            want = plan.state_bytes(got.pop("recipe"), world_size, compute_bytes=4)  # CPU: compute in fp32
            assert got == {k: getattr(want, k) for k in got}
        assert lora["reference"] == 0 and full["reference"] > 0  # LoRA's reference is the policy, adapters off
        assert all(v > 0 for k, v in lora.items() if k != "reference")
        assert full["optimizer"] > 5 * lora["optimizer"]  # moments of every weight, not of the adapters


def test_state_bytes_equal_the_trainers_shards_on_one_rank():
    from idgrpo.engine import init_distributed

    init_distributed()
    assert_state_matches([_both_kinds(0, 1)], 1)


def test_state_bytes_equal_the_trainers_shards_on_two_ranks():
    """Padding to a multiple of the world, sharded full fine-tuning (a reduce-scatter per backward), replicated LoRA
    (a local unsharded accumulation)."""
    assert_state_matches(run_distributed(_both_kinds, 2, timeout_s=180), 2)


# ------------------------------------------------------------------------------------------- activations, measured


def _saved_bytes(preset: str, batch: int, latent: tuple, lora_rank: int, checkpointing: bool, sp_size: int) -> int:
    """Bytes autograd keeps after one forward of the FSDP-wrapped model (see the module docstring)."""
    from idgrpo.engine import FSDP
    from idgrpo.engine.sequence_parallel import parallel_layout
    from idgrpo.models.lora import apply_lora, mark_only_lora_trainable
    from idgrpo.models.wan_dit import WanConfig, WanDiT

    torch.manual_seed(0)
    config = WanConfig.from_name(preset, text_len=16)
    model = WanDiT(config).init_weights()
    if lora_rank:
        apply_lora(model, lora_rank, 8.0)
        mark_only_lora_trainable(model)
    model.set_sequence_parallel(parallel_layout(sp_size).sp)
    fsdp = FSDP(model, activation_checkpointing=checkpointing)
    kwargs = {"vace_context": randn(batch, 96, *latent[1:], seed=3)} if config.vace_layers else {}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in {g.full.untyped_storage().data_ptr()
                                                           for g in fsdp.groups if g.gathered}:
            kept[storage.data_ptr()] = storage.nbytes()

    def pack(t):
        keep(t)
        return t

    def unit_inputs(module, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                keep(a)

    hooks = [u.register_forward_pre_hook(unit_inputs, with_kwargs=True) for u in model.units] if checkpointing else []
    with saved_tensors_hooks(pack, lambda t: t):
        fsdp(randn(batch, *latent, seed=1), torch.tensor([500] * batch), randn(batch, 3, config.text_dim, seed=2),
             **kwargs)
    for h in hooks:
        h.remove()
    return sum(kept.values())


def _modelled_bytes(preset: str, batch: int, latent: tuple, lora_rank: int, checkpointing: bool, sp_size: int) -> int:
    from idgrpo.models.wan_dit import WanConfig

    config = WanConfig.from_name(preset, text_len=16)
    parts = plan.saved_activation_bytes(config, plan.tokens(config, latent, sp_size), batch=batch, compute_bytes=4,
                                        lora_rank=lora_rank, full_finetune=lora_rank == 0, sp_size=sp_size,
                                        checkpointing=checkpointing, latent_shape=latent,
                                        vace=bool(config.vace_layers))
    return sum(parts.values())


CASES = {  # (preset, batch, latent (C, F, H, W), LoRA rank (0: full fine-tuning), activation checkpointing)
    "lora": ("tiny", 2, (16, 3, 6, 6), 4, False),
    "lora-checkpointed": ("tiny", 2, (16, 3, 6, 6), 4, True),
    "full": ("tiny", 2, (16, 3, 6, 6), 0, False),
    "full-checkpointed": ("tiny", 2, (16, 3, 6, 6), 0, True),
    "vace-lora": ("tiny-vace", 1, (16, 2, 4, 6), 4, False),
    "vace-full-checkpointed": ("tiny-vace", 1, (16, 2, 4, 6), 0, True),
}


@pytest.fixture
def triton_path(monkeypatch):
    """The kernels GPUs run (the Triton autograd Functions decide what is saved), through the interpreter here."""
    monkeypatch.setenv("IDGRPO_KERNELS", "triton")


@pytest.mark.parametrize("case", list(CASES))
def test_activation_model_matches_what_autograd_saves(case, triton_path):
    from idgrpo.engine import init_distributed

    init_distributed()
    measured = _saved_bytes(*CASES[case], sp_size=1)
    modelled = _modelled_bytes(*CASES[case], sp_size=1)
    assert abs(modelled / measured - 1) <= TOLERANCE, f"{case}: modelled {modelled} B, autograd saved {measured} B"


def _sp_rank_saves(rank: int, world_size: int) -> list[tuple[int, int]]:
    import os

    os.environ["IDGRPO_KERNELS"] = "triton"
    return [(_saved_bytes("tiny", 2, (16, 3, 6, 6), 4, ac, sp_size=2),
             _modelled_bytes("tiny", 2, (16, 3, 6, 6), 4, ac, sp_size=2)) for ac in (False, True)]


def test_activation_model_matches_a_sequence_parallel_rank():
    """27 tokens over 2 ranks: 14 per rank (one padding token), the all-to-all copies, the padded rotary tables."""
    for rank in run_distributed(_sp_rank_saves, 2, timeout_s=180):
        for measured, modelled in rank:
            assert abs(modelled / measured - 1) <= TOLERANCE, rank
    one_rank = _modelled_bytes("tiny", 2, (16, 3, 6, 6), 4, False, sp_size=1)
    assert rank[0][1] < 0.7 * one_rank  # sequence parallelism does cut the activations


# ------------------------------------------------------------------------------------------------ the plan itself


def test_the_14b_targets_fit_80gb_gpus():
    """docs/scale-out.md's targets, with the identity VLM reward resident for vace-14b."""
    vace = plan.make_plan("vace-14b", RecipeConfig.from_name("vace-14b", sp_size=4,
                                                             reward="idgrpo.reward.factories:vlm"),
                          plan.Layout(8, 1, 4), flops=False)
    assert vace.recipe.lora_rank > 0 and vace.fits(80)
    t2v = plan.make_plan("t2v-14b", RecipeConfig.from_name("t2v-14b", sp_size=4), plan.Layout(8, 2, 4), flops=False)
    assert t2v.recipe.lora_rank == 0 and t2v.fits(80)
    # Without checkpointing neither fits: the presets' defaults matter.
    assert not plan.make_plan("vace-14b", RecipeConfig.from_name("vace-14b", sp_size=4, activation_checkpointing=False),
                              plan.Layout(8, 1, 4), flops=False).fits(141)


def test_rollout_and_update_flops_follow_the_epoch(capsys):
    recipe = RecipeConfig.from_name("tiny", model="tiny", lora_rank=4, guidance=2.0)
    p = plan.make_plan("tiny", recipe, plan.Layout(2, 1, 1))
    forward = plan.dit_forward_flops(plan.wan_config(recipe), plan.latent_shape(recipe, plan.wan_config(recipe), 0))
    grpo, samples = recipe.grpo, recipe.grpo.prompts_per_epoch * recipe.grpo.group_size
    assert p.flops["rollout: policy"] == grpo.num_steps * 2 * forward * samples  # two guidance branches
    assert p.flops["update: forward + backward"] == samples * grpo.num_trained_steps * 2 * forward * 3


def test_plan_command_prints_memory_flops_and_the_launch_line(capsys):
    main(["plan", "tiny", "--model", "tiny", "--lora-rank", "4", "--nproc-per-node", "2", "--nnodes", "2",
          "--sp-size", "2"])
    out = capsys.readouterr().out
    for row in ("parameters, sharded", "optimizer state", "EMA", "activations, training, no checkpointing",
                "activations, rollout", "VAE", "reward", "peak", "fits 80 GB", "one epoch", "update: forward"):
        assert row in out, row
    assert ("torchrun --nnodes 2 --node-rank $NODE_RANK --master-addr $MASTER_ADDR --master-port 29500 "
            "--nproc-per-node 2 -m idgrpo train-grpo tiny --model tiny --lora-rank 4 --sp-size 2") in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--nproc-per-node", "4", "--sp-size", "3"], "--sp-size 3 must divide the world size 4"),
    (["--model", "tiny", "--nproc-per-node", "4", "--sp-size", "4"], "must divide the 2 attention heads"),
    (["--nproc-per-node", "1"], "the planner models the Wan DiT"),
])
def test_plan_refuses_layouts_that_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "tiny", "--no-flops", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
