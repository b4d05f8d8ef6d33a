"""Ulysses sequence parallelism on gloo: the collectives' layouts, and the Wan DiT (T2V, VACE, Phantom) split
over 2 and 4 ranks against the same model in one process (forward, input and weight gradients, fp32), with
padding, the dp x sp layout on 4 processes, FSDP over the whole world, and the errors.

One spawn of 4 ranks runs everything (process start-up dominates); the 1-process references run here.
Convention under test (docs/sequence-parallel.md): every rank of a group returns the full output, and the
gradients of a rank sum over its group to the 1-process gradient."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from test_engine_fsdp import portable, run

import bench.__main__ as bench_main
from bench.sp_comm import all_to_all_bytes, measure
from idgrpo.engine import FSDP
from idgrpo.engine.sequence_parallel import parallel_layout
from idgrpo.models.wan_dit import WanConfig, WanDiT
from idgrpo.testing import randn

WORLD = 4
RTOL = 1e-5

# name -> (preset, config overrides, latent (C, F, H, W) per sample, batch). Tokens = F * H/2 * W/2.
CASES = {
    "t2v": ("tiny", {}, (16, 3, 4, 6), 2),  # 18 tokens: no padding over 2 ranks
    "t2v_padded": ("tiny", {}, (16, 3, 2, 6), 1),  # 9 tokens -> 10
    "t2v_padded_sdpa": ("tiny", {"attention_impl": "sdpa"}, (16, 3, 2, 6), 1),
    "vace": ("tiny-vace", {}, (16, 3, 2, 6), 2),  # 9 tokens; the VACE context has 2 frames (6 tokens), zero-padded
    "phantom": ("tiny", {"reference_mode": "phantom"}, (16, 4, 2, 6), 1),  # 3 video + 1 reference frame
}
SP4_CASE = ("tiny", {"num_heads": 4}, (16, 5, 2, 2), 1)  # 5 tokens over 4 ranks -> 8: the last rank is all padding


def build(preset: str, overrides: dict) -> WanDiT:
    torch.manual_seed(0)
    # Note: 16 text rows, not 512: with hundreds of identical zero rows the cross-attention weight gradients of
    # one process already differ by ~3e-5 between a batch and its samples one by one (fp32 rounding), more
    # than RTOL; sequence parallelism leaves cross-attention local, so the shorter text loses no coverage.
    return WanDiT(WanConfig.from_name(preset, **{"text_len": 16, **overrides}))


def sample_inputs(name: str, latent: tuple, batch: int, seed: int) -> dict:
    """Seeded inputs of one data-parallel group (the seed differs between groups)."""
    c, frames, h, w = latent
    inputs = {"latents": randn(batch, c, frames, h, w, seed=seed), "timestep": torch.tensor([999, 137][:batch]),
              "context": randn(batch, 7, 32, seed=seed + 1)}
    if name == "vace":
        inputs["vace_context"] = randn(batch, 96, frames - 1, h, w, seed=seed + 2)
        inputs["vace_scale"] = torch.tensor([1.0, 0.5, 2.0])
    if name == "phantom":
        inputs["ref_latents"] = randn(batch, c, 1, h, w, seed=seed + 3)
    return inputs


def forward_backward(model, name: str, inputs: dict, seed: int, loss_scale: float = 1.0) -> dict:
    """Velocity, and the gradients of sum(velocity * w) (w seeded) w.r.t. the latents and every weight."""
    latents = inputs["latents"].clone().requires_grad_(True)
    if name == "phantom":
        neg = torch.zeros_like(inputs["context"])
        v = model.phantom_cfg_forward(latents, inputs["ref_latents"], inputs["timestep"], inputs["context"], neg)
    else:
        v = model(latents, inputs["timestep"], inputs["context"], inputs.get("vace_context"),
                  inputs.get("vace_scale", 1.0))
    ((v * randn(*v.shape, seed=seed + 10)).sum() * loss_scale).backward()
    return {"v": v.detach(), "latents": latents.grad,
            "weights": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _collectives(sp) -> dict:
    """sequence_to_heads / heads_to_sequence / gather / broadcast_ against slices of one full tensor."""
    full = randn(2, 6, 4, 3, seed=5)  # (B, L, H, D), identical on every rank
    local = sp.shard(full)  # tokens [3r, 3r + 3)
    heads = sp.sequence_to_heads(local)
    mine = slice(sp.rank * 4 // sp.size, (sp.rank + 1) * 4 // sp.size)
    odd = randn(1, 5, 2, seed=6)  # 5 rows over the group: padded
    value = torch.full((3,), float(sp.ranks[0] * 100 + dist.get_rank()))
    return {"heads_ok": torch.equal(heads, full[:, :, mine]),
            "back_ok": torch.equal(sp.heads_to_sequence(heads), local),
            "gather_ok": torch.equal(sp.gather(sp.shard(odd), 5), odd),
            "broadcast": sp.broadcast_(value)}


def _suite(rank: int, world_size: int) -> dict:
    layout = parallel_layout(sp_size=2)
    sp = layout.sp
    out = {"layout": (layout.dp_rank, layout.dp_size, layout.sp_rank, layout.sp_size, sp.ranks),
           "collectives": _collectives(sp)}
    for name, (preset, overrides, latent, batch) in CASES.items():
        model = build(preset, overrides)
        model.set_sequence_parallel(sp)
        seed = 100 * (layout.dp_rank + 1)
        out[name] = forward_backward(model, name, sample_inputs(name, latent, batch, seed), seed)

    # FSDP over the whole world (activation checkpointing re-runs the all-to-alls in backward), loss scaled.
    model = build("tiny", {})
    model.set_sequence_parallel(sp)
    model = FSDP(model, activation_checkpointing=True)
    seed = 100 * (layout.dp_rank + 1)
    forward_backward(model, "t2v", sample_inputs("t2v", CASES["t2v"][2], 2, seed), seed, layout.loss_scale)
    fsdp_grads = {}
    for group in model.groups:
        flat = group.master.grad.new_empty(group.padded)
        dist.all_gather_into_tensor(flat, group.master.grad)
        for n, shape, offset in zip(group.names, group.shapes, group.offsets):
            fsdp_grads[n] = flat[offset:offset + torch.Size(shape).numel()].view(shape).clone()
    out["fsdp"] = fsdp_grads

    sp4 = parallel_layout(sp_size=4).sp
    preset, overrides, latent, batch = SP4_CASE
    model = build(preset, overrides)
    model.set_sequence_parallel(sp4)
    out["sp4"] = forward_backward(model, "t2v", sample_inputs("t2v", latent, batch, 7), 7)
    try:
        build("tiny", {}).set_sequence_parallel(sp4)  # 2 heads over 4 ranks
    except ValueError as e:
        out["heads_error"] = str(e)
    try:
        parallel_layout(sp_size=3)
    except ValueError as e:
        out["divisor_error"] = str(e)
    out["bench"] = measure(10, 4, 2, torch.float32, "cpu", warmup=0, iters=1)
    return portable(out)


@pytest.fixture(scope="module")
def ranks():
    return run(_suite, WORLD)


def reference(name: str, preset: str, overrides: dict, latent: tuple, batch: int, seed: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only contend
    try:
        return forward_backward(build(preset, overrides), name, sample_inputs(name, latent, batch, seed), seed)
    finally:
        torch.set_num_threads(threads)


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str):
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"


def assert_matches(results: list[dict], want: dict, what: str):
    """Every rank returns the reference output; the ranks' gradients sum to the reference gradients."""
    for r, res in enumerate(results):
        assert_rel(res["v"], want["v"], f"{what} velocity on group rank {r}")
    assert_rel(sum(res["latents"] for res in results), want["latents"], f"{what} d/dlatents")
    assert results[0]["weights"].keys() == want["weights"].keys()
    for n, g in want["weights"].items():
        assert_rel(sum(res["weights"][n] for res in results), g, f"{what} d/d{n}")
    # Not vacuous: each rank holds only its chunk's share of the gradient.
    assert not torch.allclose(results[0]["latents"], want["latents"])


def test_layout_puts_consecutive_ranks_in_a_group(ranks):
    assert [r["layout"] for r in ranks] == [(0, 2, 0, 2, (0, 1)), (0, 2, 1, 2, (0, 1)),
                                            (1, 2, 0, 2, (2, 3)), (1, 2, 1, 2, (2, 3))]


def test_collectives_swap_sequence_and_heads_and_gather(ranks):
    for r in ranks:
        c = r["collectives"]
        assert c["heads_ok"] and c["back_ok"] and c["gather_ok"]
    # broadcast_ takes the group's first rank's value: 0 in group (0, 1), 202 in group (2, 3)
    assert [r["collectives"]["broadcast"][0].item() for r in ranks] == [0.0, 0.0, 202.0, 202.0]


@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_groups_match_one_process(ranks, name):
    """dp 2 x sp 2: each group gets its own samples and equals one process on them."""
    preset, overrides, latent, batch = CASES[name]
    velocities = []
    for dp_rank, group in enumerate((ranks[0:2], ranks[2:4])):
        want = reference(name, preset, overrides, latent, batch, seed=100 * (dp_rank + 1))
        assert_matches([r[name] for r in group], want, f"{name} dp group {dp_rank}")
        velocities.append(want["v"])
    assert not torch.allclose(velocities[0], velocities[1])


def test_four_ranks_with_a_rank_holding_only_padding(ranks):
    preset, overrides, latent, batch = SP4_CASE
    want = reference("t2v", preset, overrides, latent, batch, seed=7)
    assert_matches([r["sp4"] for r in ranks], want, "sp 4")


def test_fsdp_over_the_world_with_the_loss_scale_gives_the_mean_over_dp_groups(ranks):
    refs = [reference("t2v", "tiny", {}, CASES["t2v"][2], 2, seed=100 * (d + 1)) for d in range(2)]
    got = ranks[0]["fsdp"]
    assert got.keys() == refs[0]["weights"].keys()
    for n in got:
        assert_rel(got[n], (refs[0]["weights"][n] + refs[1]["weights"][n]) / 2, f"FSDP d/d{n}")
    for r in ranks[1:]:  # every rank gathered the same full gradient
        assert all(torch.equal(r["fsdp"][n], got[n]) for n in got)


def test_heads_not_divisible_and_bad_sp_size_are_clear_errors(ranks):
    assert "num_heads=2" in ranks[0]["heads_error"] and "multiple of 4" in ranks[0]["heads_error"]
    assert "sp_size=3" in ranks[0]["divisor_error"] and "world size 4" in ranks[0]["divisor_error"]


def test_one_rank_group_is_the_plain_path():
    """A size-1 group is dropped: the model keeps the exact single-process code path."""
    from idgrpo.engine.sequence_parallel import SequenceParallel

    model = build("tiny", {})
    model.set_sequence_parallel(SequenceParallel(group=None, rank=0, size=1, ranks=(0,)))
    assert model.sequence_parallel is None and all(b.attn1.sequence_parallel is None for b in model.blocks)


def test_bench_measures_every_sp_size_dividing_the_world(ranks):
    rows = ranks[0]["bench"]
    assert [r["sp"] for r in rows] == [2, 4]
    for r in rows:
        assert r["ms"] > 0 and r["mib_sent"] * 2**20 == all_to_all_bytes(10, 8, r["sp"], 4)


def test_bench_cost_model_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("IDGRPO_BENCH_DIR", str(tmp_path))
    assert bench_main.main(["--quick", "sp_comm"]) == 0
    (path,) = tmp_path.glob("sp_comm-*.json")
    result = json.loads(path.read_text())
    rows, a2a = result["rows"], result["all_to_alls_per_block"]
    assert result["measured"] == []  # one process: nothing to time
    # 12 heads: no sp 8 for the 1.3B models; 40 heads: sp 2, 4, 8 for 14B
    assert {r["sp"] for r in rows if r["heads"] == 12} == {2, 4}
    assert {r["sp"] for r in rows if r["heads"] == 40} == {2, 4, 8}
    for r in rows:
        assert r["train_block_mib"] == pytest.approx(a2a["train"] * r["a2a_mib"])
        # a rank sends (sp - 1) / sp of its chunk: more ranks, smaller chunks
        assert r["a2a_mib"] == pytest.approx(-(-r["tokens"] // r["sp"]) * r["heads"] * 128 * 2 * (r["sp"] - 1)
                                             / r["sp"] / 2**20)
