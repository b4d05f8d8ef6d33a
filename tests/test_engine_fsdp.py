"""FSDP engine: N ranks match 1 rank, activation checkpointing, bf16, LoRA on a frozen base,
several forwards before one backward, gradient accumulation without communication."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from idgrpo.engine import FSDP, build_optimizer, clip_grad_norm_, init_distributed
from idgrpo.testing import randn, run_distributed  # noqa: F401

WIDTH, HEADS, TOKENS, BATCH = 24, 2, 7, 4


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)  # a key bias has zero true grad; Adam amplifies noise
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width + 3)  # odd sizes: flat buffers need padding
        self.fc2 = nn.Linear(2 * width + 3, width)

    def forward(self, x):  # (B, L, C)
        b, l, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, l, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, width: int = WIDTH, heads: int = HEADS, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # (B, L, 5) -> (B, L, 3) fp32
        h = self.embed(x.to(self.embed.weight.dtype))
        for block in self.blocks:
            h = block(h)
        return self.head(h).float()


class LoRALinear(nn.Module):
    """Minimal LoRA for the test (the real one lives in idgrpo.models.lora)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.qkv = LoRALinear(block.qkv)
        block.fc2 = LoRALinear(block.fc2)
    return model


def batch(step: int, n: int = BATCH):
    x = randn(n, TOKENS, 5, seed=100 + step)
    y = randn(n, TOKENS, 3, seed=200 + step)
    return x, y


def local_slice(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per = t.shape[0] // world_size
    return t[rank * per:(rank + 1) * per]


def train(model, steps, rank, world_size, *, forwards=1, micro=1, clip=None, lr=1e-2, no_sync=True):
    """Steps of AdamW on an MSE loss; each rank takes its slice of the same global batch."""
    opt = build_optimizer(model.trainable_parameters() if isinstance(model, FSDP)
                          else [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        x, y = local_slice(x, rank, world_size), local_slice(y, rank, world_size)
        for m in range(micro):
            xm, ym = local_slice(x, m, micro), local_slice(y, m, micro)
            last = m == micro - 1
            ctx = model.no_sync() if (isinstance(model, FSDP) and not last and no_sync) else _nullcontext()
            with ctx:
                # several forwards before one backward (as GRPO does with the policy)
                loss = sum(F.mse_loss(model(xm * (1 + 0.1 * f)), ym) for f in range(forwards)) / (forwards * micro)
                loss.backward()
            losses.append(loss.detach())
        if clip is not None:
            clip_grad_norm_(model if isinstance(model, FSDP) else model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def params_of(model) -> dict[str, torch.Tensor]:
    if isinstance(model, FSDP):
        return {k: v.float() for k, v in model.full_state_dict().items()}
    return {k: v.detach().clone().float() for k, v in model.named_parameters()}


def portable(obj):
    """Tensors -> numpy for the trip back from a spawned rank (shared-memory tensors do not
    survive their process exiting)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def unportable(obj):
    if hasattr(obj, "__array__") and not isinstance(obj, torch.Tensor):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: unportable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unportable(v) for v in obj)
    return obj


def run(fn, world_size, *args):
    return unportable(run_distributed(fn, world_size, *args))


def _fsdp_train(rank, world_size, kwargs, train_kwargs, lora):
    torch.manual_seed(0)
    model = TinyTransformer()
    if lora:
        add_lora(model)
    model = FSDP(model, **kwargs)
    losses = train(model, 5, rank, world_size, **train_kwargs)
    return params_of(model), losses


def _grads_once(rank, world_size, kwargs):
    model = FSDP(TinyTransformer(), **kwargs)
    x, y = batch(0)
    F.mse_loss(model(local_slice(x, rank, world_size)), local_slice(y, rank, world_size)).backward()
    grads = {g.key: g.master.grad.clone() for g in model.groups}
    return grads, {g.key: (g.trainable, g.replicated, g.shard_numel, g.numel) for g in model.groups}


def _inference():
    """Outputs under no_grad / inference_mode / grad-enabled-but-unused forwards, and of the plain model."""
    model = FSDP(TinyTransformer(), prefetch=True)
    x, _ = batch(0)
    with torch.no_grad():
        no_grad = model(x)
    with torch.inference_mode():
        inference = model(x)
    unused = model(x).detach()  # a graph that is never backpropagated
    gathered_after_forwards = any(g.gathered for g in model.groups)
    model(x).sum().backward()
    return {"no_grad": no_grad, "inference": inference.clone(), "unused": unused,
            "gathered_after": gathered_after_forwards or any(g.gathered for g in model.groups)}


class InPlaceStack(TinyTransformer):
    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            out = block(h)
            out.mul_(0.5)  # in place on a unit's output
            h = out
        return self.head(h)


def _inplace_on_unit_outputs():
    """Gradients when the caller modifies unit outputs in place, vs the plain module."""
    plain = InPlaceStack()
    model = FSDP(InPlaceStack())
    x, y = batch(0)
    F.mse_loss(plain(x), y).backward()
    F.mse_loss(model(x), y).backward()
    return {"plain": {k: p.grad for k, p in plain.named_parameters()},
            "ours": {g.key: g.master.grad for g in model.groups}, "layout": {g.key: g.table() for g in model.groups}}


def _meta_then_load():
    with torch.device("meta"):
        model = TinyTransformer()
    model = FSDP(model)
    model.load_full_state_dict(TinyTransformer().state_dict())
    return params_of(model)


def _suite(rank, world_size):
    """Every configuration in one spawn per world size: process start-up dominates these tests."""
    init_distributed()
    out = {
        "fp32": _fsdp_train(rank, world_size, {}, {"clip": 0.5}, False),
        "grads_ac_off": _grads_once(rank, world_size, {}),
    }
    if world_size > 1:
        accum = {"forwards": 2, "micro": 2}
        out.update({
            "accum_plain": _fsdp_train(rank, world_size, {}, accum, False),
            "accum_ckpt": _fsdp_train(rank, world_size, {"activation_checkpointing": True}, accum, False),
            "grads_ac_on": _grads_once(rank, world_size, {"activation_checkpointing": True}),
            "accum_prefetch": _fsdp_train(rank, world_size, {"prefetch": True}, accum, False),
            "grads_bf16": _grads_once(rank, world_size, {"compute_dtype": torch.bfloat16}),
            "grads_bf16_reduce": _grads_once(rank, world_size, {"compute_dtype": torch.bfloat16,
                                                                "reduce_dtype": torch.bfloat16}),
            "bf16": _fsdp_train(rank, world_size, {"compute_dtype": torch.bfloat16}, {}, False),
            "lora_sharded": _fsdp_train(rank, world_size, {}, {}, True),
            "lora_replicated": _fsdp_train(rank, world_size, {"replicate_trainable_below": 10_000}, {}, True),
            "lora_layout": {g.key: (g.trainable, g.replicated, g.shard_numel, g.numel)
                            for g in FSDP(add_lora(TinyTransformer()), replicate_trainable_below=10_000).groups},
            "lora_ckpt_bf16": _fsdp_train(rank, world_size, {"activation_checkpointing": True,
                                                             "compute_dtype": torch.bfloat16}, {"forwards": 2}, True),
            "lora_ckpt": _fsdp_train(rank, world_size, {"activation_checkpointing": True}, {"forwards": 2}, True),
            "inference": _inference(),
            "meta_loaded": _meta_then_load(),
            "inplace": _inplace_on_unit_outputs(),
        })
    return portable(out)


@pytest.fixture(scope="module")
def two_ranks():
    return run(_suite, 2)


@pytest.fixture(scope="module")
def one_rank():
    return run(_suite, 1)[0]


def reference(lora=False, **train_kwargs):
    """The plain module trained in this process on the whole global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only contend (30x slower on a loaded CI box)
    try:
        model = TinyTransformer()
        if lora:
            add_lora(model)
        losses = train(model, 5, 0, 1, **train_kwargs)
        return params_of(model), losses
    finally:
        torch.set_num_threads(threads)


def assert_close_rel(got: dict, want: dict, rtol: float):
    assert got.keys() == want.keys()
    for k in want:
        err = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
        assert err <= rtol, f"{k}: relative error {err:.3g} > {rtol}"


def test_two_ranks_match_one_rank_fp32(two_ranks, one_rank):
    want, want_losses = reference(clip=0.5)
    assert_close_rel(one_rank["fp32"][0], want, 1e-6)
    assert_close_rel(two_ranks[0]["fp32"][0], want, 1e-6)
    for k in want:  # every rank holds the same model
        assert torch.equal(two_ranks[0]["fp32"][0][k], two_ranks[1]["fp32"][0][k])
    # losses: rank-local halves of the global batch average to the 1-rank loss
    two_losses = (two_ranks[0]["fp32"][1] + two_ranks[1]["fp32"][1]) / 2
    torch.testing.assert_close(two_losses, want_losses, rtol=1e-6, atol=0)
    # training moved the parameters (the test is not vacuous)
    init = params_of(TinyTransformer())
    assert max((want[k] - init[k]).norm() / init[k].norm() for k in init) > 1e-3


def test_gradients_are_the_mean_over_ranks(two_ranks, one_rank):
    one_grads, layout = one_rank["grads_ac_off"]
    two = [two_ranks[r]["grads_ac_off"][0] for r in range(2)]
    for key, (trainable, _, _, numel) in layout.items():
        if trainable:
            full = torch.cat([two[0][key], two[1][key]])[:numel]
            torch.testing.assert_close(full, one_grads[key][:numel], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_identical_gradients(two_ranks):
    off, on = two_ranks[0]["grads_ac_off"][0], two_ranks[0]["grads_ac_on"][0]
    assert len(off) == len(on) == 4  # the root unit and 3 blocks, one trainable group each
    for k in off:
        assert torch.equal(off[k], on[k]), k


def test_several_forwards_and_accumulation_with_and_without_checkpointing(two_ranks):
    # two forwards before each backward; no_sync gradient accumulation over 2 micro-steps
    want, _ = reference(forwards=2, micro=2)
    plain, ckpt = two_ranks[0]["accum_plain"][0], two_ranks[0]["accum_ckpt"][0]
    prefetch = two_ranks[0]["accum_prefetch"][0]  # gathers moved ahead of use (the CUDA schedule)
    for k in want:
        assert torch.equal(plain[k], ckpt[k]), k
        assert torch.equal(plain[k], prefetch[k]), k
    assert_close_rel(plain, want, 1e-6)


def test_bf16_compute_stays_close(two_ranks):
    fp32 = two_ranks[0]["grads_ac_off"][0]
    for name in ("grads_bf16", "grads_bf16_reduce"):  # bf16 compute; fp32 / bf16 reductions
        bf16 = two_ranks[0][name][0]
        for k in fp32:
            assert bf16[k].dtype == torch.float32  # fp32 master gradients
            err = (bf16[k] - fp32[k]).norm() / fp32[k].norm()
            assert 0 < err < 5e-2, f"{name} {k}: relative error {err:.3g}"
    _, want_losses = reference()
    losses = (two_ranks[0]["bf16"][1] + two_ranks[1]["bf16"][1]) / 2
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, want_losses, rtol=3e-2, atol=0)
    assert all(v.dtype == torch.float32 for v in two_ranks[0]["bf16"][0].values())


def test_lora_only_training_with_sharded_frozen_base(two_ranks):
    want, _ = reference(lora=True)
    base = params_of(add_lora(TinyTransformer()))
    for name in ("lora_sharded", "lora_replicated"):
        got = two_ranks[0][name][0]
        assert_close_rel(got, want, 1e-6)
        for k in want:
            if "lora" not in k:
                assert torch.equal(got[k], base[k]), f"frozen {k} changed"
        assert all(not torch.equal(got[k], base[k]) for k in want if "lora" in k)
    layout = two_ranks[0]["lora_layout"]
    trainable, replicated, shard, numel = layout["blocks.0/frozen"]
    assert not trainable and not replicated and shard * 2 >= numel > shard
    trainable, replicated, shard, numel = layout["blocks.0/trainable"]
    assert trainable and replicated and shard == numel


def test_rejects_nested_units():
    model = TinyTransformer()
    with pytest.raises(ValueError, match="nest"):
        FSDP(model, units=[model.blocks[0], model.blocks[0].qkv])


def test_lora_with_activation_checkpointing_and_bf16(two_ranks):
    want, want_losses = reference(lora=True, forwards=2)
    assert_close_rel(two_ranks[0]["lora_ckpt"][0], want, 1e-6)
    bf16, bf16_losses = two_ranks[0]["lora_ckpt_bf16"]
    losses = (bf16_losses + two_ranks[1]["lora_ckpt_bf16"][1]) / 2
    torch.testing.assert_close(losses, want_losses, rtol=3e-2, atol=0)
    base = params_of(add_lora(TinyTransformer()))
    for k in want:
        if "lora" not in k:
            assert torch.equal(bf16[k], base[k].to(torch.bfloat16).float()), k  # frozen base stored in bf16


def test_inference_forwards_match_the_plain_model(two_ranks):
    with torch.no_grad():
        want = TinyTransformer()(batch(0)[0])
    got = two_ranks[1]["inference"]
    for k in ("no_grad", "inference", "unused"):
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    assert not got["gathered_after"]  # every unit's gathered weights were released


def test_meta_device_model_loaded_after_wrapping(two_ranks):
    want = params_of(TinyTransformer())
    for r in range(2):
        got = two_ranks[r]["meta_loaded"]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_in_place_ops_on_unit_outputs_keep_gradients_right(two_ranks):
    parts = [two_ranks[r]["inplace"] for r in range(2)]
    plain = parts[0]["plain"]
    for key, table in parts[0]["layout"].items():
        flat = torch.cat([parts[0]["ours"][key], parts[1]["ours"][key]])
        for row in table:
            n = torch.Size(row["shape"]).numel()
            got = flat[row["offset"]:row["offset"] + n].view(row["shape"])
            torch.testing.assert_close(got, plain[row["name"]], rtol=1e-5, atol=1e-7)
