"""LoRA: targets, exact switch-off, merge/unmerge, the PEFT file format and its errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from idgrpo.models.lora import (
    LoRALinear,
    apply_lora,
    disable_lora,
    load_peft,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_peft,
    unmerge_lora,
)
from idgrpo.models.wan_dit import WanConfig, WanDiT
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
    assert config["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config["init_lora_weights"] == "kaiming"

    fresh = tiny_model()  # same base weights (same seed), no LoRA yet: load_peft applies it
    loaded = load_peft(fresh, tmp_path / "lora")
    assert len(loaded) == 56
    assert torch.equal(run(fresh, x, t, ctx, vace), expected)

    # PEFT's in-memory names carry the adapter name (`lora_A.default.weight`): accepted too.
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "lora" / "adapter_model.safetensors"))
    other = tiny_model()
    load_peft(other, tmp_path / "lora")
    assert torch.equal(run(other, x, t, ctx, vace), expected)


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


def test_peft_reads_our_adapter_and_we_read_peft_s(tmp_path, monkeypatch):
    """Cross-check with the real `peft` on the diffusers model when both are installed (skipped
    otherwise): our file loads through PeftModel.from_pretrained, and an adapter PEFT wrote loads here."""
    peft = pytest.importorskip("peft", exc_type=ImportError)
    diffusers = pytest.importorskip("diffusers")
    from idgrpo.models.weights import save_diffusers

    monkeypatch.setattr(diffusers.WanVACETransformer3DModel, "_keep_in_fp32_modules", None)
    model = tiny_model()
    save_diffusers(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    save_peft(model, tmp_path / "ours")
    x, t, ctx, vace = inputs(model.config)
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, 506))
    theirs = diffusers.WanVACETransformer3DModel.from_pretrained(tmp_path / "base").eval()
    wrapped = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "ours"))
    with torch.no_grad():
        expected = wrapped.base_model.model(x, t, padded, control_hidden_states=vace).sample
        torch.testing.assert_close(run(model, x, t, ctx, vace), expected, atol=2e-5, rtol=1e-5)

    # The other way: an adapter created and saved by PEFT (Identity-GRPO's way) loads here.
    base = diffusers.WanVACETransformer3DModel.from_pretrained(tmp_path / "base").eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    peft_model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        peft_model.save_pretrained(str(tmp_path / "peft"))
        expected = peft_model.base_model.model(x, t, padded, control_hidden_states=vace).sample
        ours = tiny_model()
        load_peft(ours, tmp_path / "peft")
        torch.testing.assert_close(run(ours, x, t, ctx, vace), expected, atol=2e-5, rtol=1e-5)


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
