"""LoRA: targets, exact switch-off, merge/unmerge on every Linear of every model (the DiT's fp32 layers included),
the PEFT and diffusers file formats and their errors. Loading by peft's and diffusers' own loaders:
tests/test_lora_interop.py."""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from idgrpo.models.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    disable_lora,
    load_diffusers_lora,
    load_peft,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_diffusers_lora,
    save_peft,
    unmerge_lora,
)
from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from idgrpo.models.wan_dit import WanConfig, WanDiT, _linear_fp32
from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig
from idgrpo.testing import randn


def tiny_model(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(WanConfig.from_name("tiny-vace")).eval()


def inputs(config, seed: int = 0):
    return (randn(1, 16, 2, 4, 4, seed=seed), torch.tensor([700]), randn(1, 6, config.text_dim, seed=seed + 1),
            randn(1, 96, 2, 4, 4, seed=seed + 2))


def run(model, x, t, ctx, vace):
    return model(x, t, ctx, vace_context=vace)


def randomise_adapters(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_default_targets_are_the_attention_projections_of_main_and_vace_blocks():
    model = tiny_model()
    names = apply_lora(model, rank=4, alpha=8)
    # (4 main + 3 VACE blocks) x (attn1, attn2) x (q, k, v, out)
    assert len(names) == 7 * 2 * 4
    assert "blocks.0.attn1.to_out.0" in names and "vace_blocks.2.attn2.to_k" in names
    assert not any("ffn" in n or n == "proj_out" or n.endswith("proj_in") for n in names)
    layer = model.get_submodule("blocks.0.attn1.to_q")
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (64, 4)
    assert torch.all(layer.lora_B.weight == 0)  # a fresh adapter is a no-op
    assert abs(layer.lora_A.weight.std().item() - 1 / 4) < 0.05  # PEFT "gaussian": N(0, 1/r)
    # Regex targets (PEFT's string form) and a target list that matches nothing.
    other = tiny_model()
    assert apply_lora(other, 2, 2, targets=r"blocks\.1\.ffn\.net\.2") == ["blocks.1.ffn.net.2"]
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(tiny_model(), 2, 2, targets=["to_nothing"])


@torch.no_grad()
def test_disabled_adapters_reproduce_the_base_model_exactly():
    base = tiny_model()
    x, t, ctx, vace = inputs(base.config)
    expected = run(base, x, t, ctx, vace)
    apply_lora(base, rank=4, alpha=4)
    randomise_adapters(base)
    adapted = run(base, x, t, ctx, vace)
    assert (adapted - expected).abs().max() > 1e-3
    with disable_lora(base):
        assert torch.equal(run(base, x, t, ctx, vace), expected)
    assert torch.equal(run(base, x, t, ctx, vace), adapted)  # switched back on


@torch.no_grad()
def test_merge_equals_the_unmerged_forward_and_unmerge_restores():
    model = tiny_model()
    x, t, ctx, vace = inputs(model.config)
    base = run(model, x, t, ctx, vace)
    apply_lora(model, rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"])
    randomise_adapters(model)
    unmerged = run(model, x, t, ctx, vace)
    merge_lora(model)
    torch.testing.assert_close(run(model, x, t, ctx, vace), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge first"):
        with disable_lora(model):
            pass
    unmerge_lora(model)
    torch.testing.assert_close(run(model, x, t, ctx, vace), unmerged, atol=1e-5, rtol=1e-5)
    with disable_lora(model):
        torch.testing.assert_close(run(model, x, t, ctx, vace), base, atol=1e-5, rtol=1e-5)


def qwen_case():
    """Qwen2.5-VL with an image and an untied LM head (so `lm_head` is a Linear too): hidden states and logits."""
    config = dataclasses.replace(Qwen2_5_VLConfig.from_name("tiny"), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VL(config)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 290, (1, 12), generator=gen)
    ids[0, 2:6] = config.image_token_id  # a 4x4-patch image = 4 merged tokens
    position_ids = torch.arange(12).view(1, 1, 12).expand(3, 1, 12)
    pixels = torch.randn(16, config.vision.patch_dim, generator=gen)

    def forward():
        hidden = model(ids, position_ids, pixel_values=pixels, image_grid_thw=[(1, 4, 4)])
        return torch.cat([hidden.flatten(), model.lm_logits(hidden).flatten()])

    return model, forward


def reward_case():
    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig.from_name("tiny"))
    gen = torch.Generator().manual_seed(8)
    frames = torch.randint(0, 256, (1, 3, 32, 32, 3), generator=gen).float()
    references = torch.randint(0, 256, (1, 2, 32, 32, 3), generator=gen).float()

    def forward():
        out = model(frames, references)
        return torch.cat([out["reward"], out["per_frame"].flatten()])

    return model, forward


def dit_case():
    model = tiny_model()
    args = inputs(model.config)
    return model, lambda: run(model, *args)


@pytest.mark.parametrize("case", [dit_case, qwen_case, reward_case], ids=["wan-dit-vace", "qwen2.5-vl", "reward"])
def test_every_linear_of_every_model_acts_the_same_unmerged_as_merged(case):
    """LoRA on every nn.Linear (alpha != r). Unmerged and merged give the same output, and per Linear the
    adapter's gradients are those the merged weight implies: dL/dB = s G A^T and dL/dA = s B^T G with G = dL/dW'
    of the merged model. An adapter the forward skipped would have no gradient."""
    model, forward = case()
    model.eval()
    linears = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)
    assert sorted(apply_lora(model, rank=2, alpha=6, targets=".*")) == linears
    randomise_adapters(model)
    mark_only_lora_trainable(model)
    with torch.no_grad(), disable_lora(model):
        base = forward()
    unmerged = forward()
    weights = torch.randn(unmerged.shape, generator=torch.Generator().manual_seed(11))
    (unmerged * weights).sum().backward()
    assert (unmerged - base).abs().max() > 1e-2

    merge_lora(model)
    adapters = dict(lora_modules(model))
    for m in adapters.values():
        m.weight.requires_grad_(True)
    merged = forward()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    (merged * weights).sum().backward()
    for name, m in adapters.items():
        g = m.weight.grad
        assert g is not None and g.abs().max() > 0, name
        a, b = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        for got, want in ((m.lora_B.weight.grad, m.scaling * g @ a.T), (m.lora_A.weight.grad, m.scaling * b.T @ g)):
            assert got is not None, f"{name}: the adapter got no gradient"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)


def test_the_dit_s_fp32_layers_add_the_adapter_in_fp32():
    """proj_out and the time embedding run in fp32 whatever the weights' dtype; their adapters' term too."""
    model = tiny_model().to(torch.bfloat16)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and (n == "proj_out" or ".time_" in n)]
    assert names == ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                     "condition_embedder.time_proj", "proj_out"]
    apply_lora(model, rank=4, alpha=8, targets="|".join(re.escape(n) for n in names))  # fp32 adapters
    randomise_adapters(model)
    for name in names:
        layer = model.get_submodule(name)
        x = randn(3, layer.in_features, seed=4, dtype=torch.bfloat16)
        out = _linear_fp32(x, layer)
        base = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        delta = F.linear(F.linear(x.float(), layer.lora_A.weight), layer.lora_B.weight) * layer.scaling
        assert out.dtype == torch.float32 and torch.equal(out, base + delta), name


def test_only_adapters_train():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2)
    randomise_adapters(model)
    mark_only_lora_trainable(model)
    run(model, *inputs(model.config)).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 56
    assert all(p.grad is not None for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@torch.no_grad()
def test_peft_round_trip(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, init="kaiming")
    randomise_adapters(model)
    x, t, ctx, vace = inputs(model.config)
    expected = run(model, x, t, ctx, vace)
    save_peft(model, tmp_path / "lora", base_model_name_or_path="Wan-AI/Wan2.1-VACE-1.3B-diffusers")

    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "base_model.model.vace_blocks.2.attn2.to_out.0.lora_B.weight" in tensors
    assert len(tensors) == 2 * 56 and all(k.startswith("base_model.model.") for k in tensors)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    # Full module names, exactly the adapted ones; PEFT's name for the kaiming-uniform init.
    assert config["target_modules"] == sorted(name for name, _ in lora_modules(model))
    assert "vace_blocks.2.attn2.to_out.0" in config["target_modules"]
    assert config["init_lora_weights"] is True

    fresh = tiny_model()  # same base weights (same seed), no LoRA yet: load_peft applies it
    loaded = load_peft(fresh, tmp_path / "lora")
    assert len(loaded) == 56
    assert torch.equal(run(fresh, x, t, ctx, vace), expected)
    # load -> save writes the same config (loading's all-zero start is not an init PEFT knows).
    save_peft(fresh, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == {**config,
                                                                                  "base_model_name_or_path": None}

    # PEFT's in-memory names carry the adapter name (`lora_A.default.weight`): accepted too.
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "lora" / "adapter_model.safetensors"))
    other = tiny_model()
    load_peft(other, tmp_path / "lora")
    assert torch.equal(run(other, x, t, ctx, vace), expected)


@torch.no_grad()
def test_a_name_peft_would_also_find_elsewhere_is_written_as_an_exact_regex(tmp_path):
    # The head `proj_out` only: as a list item PEFT would also match every `vace_blocks.N.proj_out`.
    model = tiny_model()
    assert apply_lora(model, 2, 6, targets=r"proj_out|condition_embedder\.time_proj") == [
        "condition_embedder.time_proj", "proj_out"]
    randomise_adapters(model)
    args = inputs(model.config)
    save_peft(model, tmp_path / "peft")
    save_diffusers_lora(model, tmp_path / "diffusers")
    targets = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str)
    matched = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
    assert matched == ["condition_embedder.time_proj", "proj_out"]
    for directory, load in ((tmp_path / "peft", load_peft), (tmp_path / "diffusers", load_diffusers_lora)):
        fresh = tiny_model()
        assert load(fresh, directory) == ["condition_embedder.time_proj", "proj_out"]
        assert torch.equal(run(fresh, *args), run(model, *args))


@torch.no_grad()
def test_diffusers_format_round_trip_records_alpha_and_refuses_a_file_without_it(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=10, targets=[*DEFAULT_TARGETS, "ffn.net.2"], use_rslora=True)
    randomise_adapters(model)
    args = inputs(model.config)
    expected = run(model, *args)
    file = save_diffusers_lora(model, tmp_path / "lora") / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == {"transformer." + k for k in lora_state_dict(model)}
    metadata = json.loads(header["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 10
    assert metadata["transformer.use_rslora"] is True
    assert metadata["transformer.target_modules"] == sorted(name for name, _ in lora_modules(model))

    fresh = tiny_model()
    assert len(load_diffusers_lora(fresh, tmp_path / "lora")) == 56 + 7  # attention projections + ffn.net.2 of 7 blocks
    assert torch.equal(run(fresh, *args), expected)
    with pytest.raises(ValueError, match="lora_alpha=3 given, but the file records 10"):
        load_diffusers_lora(tiny_model(), file, lora_alpha=3)

    # Without the metadata (older diffusers training scripts) the scale is unknown: the error says what to pass.
    save_file(load_file(str(file)), str(tmp_path / "bare.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no lora_adapter_metadata .* lora_alpha = r = 4\): pass lora_alpha="):
        load_diffusers_lora(tiny_model(), tmp_path / "bare.safetensors")
    fresh = tiny_model()
    load_diffusers_lora(fresh, tmp_path / "bare.safetensors", lora_alpha=10, use_rslora=True)
    assert torch.equal(run(fresh, *args), expected)

    # Adapters already in place with another scale, and a file of another component.
    other = tiny_model()
    apply_lora(other, rank=4, alpha=4, targets=[*DEFAULT_TARGETS, "ffn.net.2"])
    with pytest.raises(ValueError, match="63 adapters of the model scale by other than the file's alpha/r"):
        load_diffusers_lora(other, file)
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(4, 2)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="not under `transformer.`"):
        load_diffusers_lora(tiny_model(), tmp_path / "te.safetensors")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_diffusers_lora(tiny_model(), tmp_path / "nowhere")


def test_save_from_gathered_tensors_checks_them_against_the_model(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2)
    randomise_adapters(model)
    state = {k: v.detach().clone() + 1 for k, v in lora_state_dict(model).items()}
    save_peft(model, tmp_path / "a", tensors={**state, "blocks.0.norm2.weight": torch.ones(64)})  # extras ignored
    written = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(torch.equal(written["base_model.model." + k], v) for k, v in state.items())
    state.pop("blocks.1.attn2.to_v.lora_B.weight")
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn2.to_v.lora_B.weight'\]"):
        save_diffusers_lora(model, tmp_path / "b", tensors=state)


def test_peft_file_for_a_different_model_fails_clearly(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=4)
    save_peft(model, tmp_path / "lora")
    t2v = WanDiT(WanConfig.from_name("tiny"))  # no VACE blocks, fewer layers
    with pytest.raises(ValueError) as err:
        load_peft(t2v, tmp_path / "lora")
    assert "unexpected adapter tensors" in str(err.value) and "vace_blocks.0.attn1.to_q.lora_A.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft(t2v, tmp_path / "nowhere")


def test_lora_dit_under_the_engine_fsdp_matches_the_plain_module():
    """Blocks as FSDP units with per-block checkpointing (world size 1): same output, adapter
    gradients, and disable_lora still gives the base model."""
    from idgrpo.engine import FSDP, init_distributed

    init_distributed()
    model = tiny_model()
    apply_lora(model, rank=4, alpha=4)
    randomise_adapters(model)
    mark_only_lora_trainable(model)
    args = inputs(model.config)
    with torch.no_grad():
        expected = run(model, *args)
        with disable_lora(model):
            base = run(model, *args)
    sharded = FSDP(model, compute_dtype=torch.float32, activation_checkpointing=True, replicate_trainable_below=1 << 24)
    out = sharded(*args[:3], vace_context=args[3])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    out.square().mean().backward()
    grads = [p.grad for p in sharded.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), disable_lora(model):
        torch.testing.assert_close(sharded(*args[:3], vace_context=args[3]), base, atol=1e-6, rtol=1e-6)
