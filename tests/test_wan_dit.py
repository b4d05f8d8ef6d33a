"""Wan2.1 DiT / VACE / Phantom against diffusers (the oracle), weight formats and their errors.

Tiny random configs (dim 64, 2 heads, 2-4 layers, 3x4x6 latents); the text context is padded to
the real 512 rows, as docs/models.md#pitfall-text-padding-is-attended
requires."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from idgrpo.models.wan_dit import (
    WanConfig,
    WanDiT,
    build_vace_context,
    phantom_model_input,
    vace_mask_latent,
    vace_reference_canvas,
)
from idgrpo.models.weights import (
    Checkpoint,
    CheckpointError,
    diffusers_config,
    diffusers_to_original_key,
    load_wan_dit,
    original_config,
    original_to_diffusers_key,
    save_diffusers,
    to_original_state_dict,
)
from idgrpo.testing import randn

diffusers = pytest.importorskip("diffusers")

LATENT = (2, 16, 3, 4, 6)  # (B, C, F, H, W) -> 3 x 2 x 3 = 18 tokens
TEXT_ROWS = 7  # true text length before padding


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def inputs(config: WanConfig, seed: int = 0, batch: int = 2):
    latents = randn(batch, *LATENT[1:], seed=seed)
    timestep = torch.tensor([999, 137, 500, 3][:batch])
    context = randn(batch, TEXT_ROWS, config.text_dim, seed=seed + 1)
    return latents, timestep, context


def padded(context: torch.Tensor, rows: int = 512) -> torch.Tensor:
    return F.pad(context, (0, 0, 0, rows - context.shape[1]))


def diffusers_model(config: WanConfig, seed: int = 0):
    torch.manual_seed(seed)
    raw = diffusers_config(config)
    cls = diffusers.WanVACETransformer3DModel if config.vace_layers else diffusers.WanTransformer3DModel
    return cls.from_config({k: v for k, v in raw.items() if not k.startswith("_")}).eval()


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """A diffusers T2V model saved in its own format."""
    config = WanConfig.from_name("tiny")
    ref = diffusers_model(config)
    path = tmp_path_factory.mktemp("t2v")
    ref.save_pretrained(path)
    return config, ref, path


@pytest.fixture(scope="module")
def vace(tmp_path_factory):
    config = WanConfig.from_name("tiny-vace")
    assert len(config.vace_layers) == 3
    ref = diffusers_model(config, seed=1)
    path = tmp_path_factory.mktemp("vace")
    ref.save_pretrained(path)
    return config, ref, path


@torch.no_grad()
def test_t2v_matches_diffusers_with_padded_text(t2v):
    config, ref, path = t2v
    model = load_wan_dit(path, dtype=torch.float32)
    assert model.config == config
    latents, timestep, context = inputs(config)
    expected = ref(latents, timestep, padded(context)).sample
    ours = model(latents, timestep, context)  # padded to text_len inside
    assert ours.dtype == torch.float32 and ours.shape == latents.shape
    close(ours, expected)
    close(model(latents, timestep, padded(context)), expected)
    # Pitfall 1: the padded rows are attended to, so unpadded text gives a different output...
    assert (ref(latents, timestep, context).sample - expected).abs().max() > 1e-3
    # ...and garbage in the padding is zeroed by context_lens.
    noisy = padded(context) + randn(2, 512, config.text_dim, seed=9) * (torch.arange(512) >= TEXT_ROWS)[:, None]
    close(model(latents, timestep, noisy, context_lens=torch.tensor([TEXT_ROWS, TEXT_ROWS])), expected)


@torch.no_grad()
def test_vace_matches_diffusers_with_several_vace_layers(vace):
    config, ref, path = vace
    model = load_wan_dit(path, dtype=torch.float32)
    assert model.config.vace_layers == (0, 1, 3)
    latents, timestep, context = inputs(config)
    vace_context = randn(2, 96, *LATENT[2:], seed=5)
    scale = torch.tensor([1.0, 0.5, 2.0])
    expected = ref(latents, timestep, padded(context), control_hidden_states=vace_context,
                   control_hidden_states_scale=scale).sample
    close(model(latents, timestep, context, vace_context=vace_context, vace_scale=scale), expected)
    # Hints matter: without them the output differs.
    assert (model(latents, timestep, context) - expected).abs().max() > 1e-3
    # A context shorter than the latent (fewer frames) is zero-padded in tokens, as in diffusers.
    short = vace_context[:, :, :2]
    close(model(latents, timestep, context, vace_context=short),
          ref(latents, timestep, padded(context), control_hidden_states=short).sample)


@torch.no_grad()
def test_original_format_keys_load_through_the_mapping(t2v, vace, tmp_path):
    for config, ref, _ in (t2v, vace):
        original = to_original_state_dict(ref.state_dict())
        # docs/models.md#dit-checkpoint-layouts spot checks, including the norm2/norm3 swap and the two proj_out's.
        assert "blocks.0.norm3.weight" in original and "blocks.0.norm2.weight" not in original
        assert torch.equal(original["head.head.weight"], ref.state_dict()["proj_out.weight"])
        assert {"head.modulation", "blocks.1.modulation", "time_projection.1.weight", "text_embedding.2.bias",
                "blocks.1.self_attn.o.weight", "blocks.1.cross_attn.norm_k.weight",
                "blocks.1.ffn.0.weight"} <= set(original)
        if config.vace_layers:
            assert {"vace_blocks.0.before_proj.weight", "vace_blocks.2.after_proj.bias"} <= set(original)
            assert "vace_blocks.1.before_proj.weight" not in original
        assert {original_to_diffusers_key(k) for k in original} == set(ref.state_dict())
        directory = tmp_path / ("vace" if config.vace_layers else "t2v")
        directory.mkdir()
        # Original layout: its own config.json and two safetensors shards without an index.
        keys = sorted(original)
        half = len(keys) // 2
        save_file({k: original[k].contiguous() for k in keys[:half]}, str(directory / "model-1.safetensors"))
        save_file({k: original[k].contiguous() for k in keys[half:]}, str(directory / "model-2.safetensors"))
        (directory / "config.json").write_text(json.dumps(original_config(config)))
        checkpoint = Checkpoint(directory)
        assert checkpoint.key_format == "original" and len(checkpoint) == len(original)
        assert torch.equal(checkpoint["blocks.0.norm2.weight"], original["blocks.0.norm3.weight"])  # lazy read
        model = load_wan_dit(directory, dtype=torch.float32)
        latents, timestep, context = inputs(config, seed=3)
        kwargs = {}
        if config.vace_layers:
            kwargs = {"vace_context": randn(2, 96, *LATENT[2:], seed=4)}
        theirs = ref(latents, timestep, padded(context),
                     **({"control_hidden_states": kwargs["vace_context"]} if kwargs else {})).sample
        close(model(latents, timestep, context, **kwargs), theirs)


@torch.no_grad()
def test_pth_state_dict_with_a_preset_config(t2v, tmp_path):
    """Phantom-Wan-1.3B ships a bare .pth of original keys; it loads with weights_only=True + a preset."""
    config, ref, _ = t2v
    torch.save(to_original_state_dict(ref.state_dict()), tmp_path / "phantom.pth")
    model = load_wan_dit(tmp_path / "phantom.pth", config="tiny", dtype=torch.float32)
    latents, timestep, context = inputs(config)
    close(model(latents, timestep, context), ref(latents, timestep, padded(context)).sample)


def test_key_renames_invert():
    for key in ["blocks.7.self_attn.norm_q.weight", "vace_blocks.0.after_proj.bias", "head.head.weight",
                "head.modulation", "blocks.2.modulation", "blocks.2.norm3.bias", "time_embedding.2.weight",
                "vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight", "blocks.0.ffn.2.bias"]:
        assert diffusers_to_original_key(original_to_diffusers_key(key)) == key
    assert original_to_diffusers_key("blocks.2.norm3.bias") == "blocks.2.norm2.bias"
    assert original_to_diffusers_key("vace_blocks.4.after_proj.weight") == "vace_blocks.4.proj_out.weight"
    assert original_to_diffusers_key("head.head.bias") == "proj_out.bias"
    assert original_to_diffusers_key("blocks.0.self_attn.o.weight") == "blocks.0.attn1.to_out.0.weight"


@torch.no_grad()
def test_saved_diffusers_layout_loads_in_diffusers_and_here(vace, tmp_path, monkeypatch):
    config, ref, path = vace
    model = load_wan_dit(path, dtype=torch.float32)
    out = save_diffusers(model, tmp_path / "saved", max_shard_bytes=200_000)  # force several shards
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanVACETransformer3DModel"
    # Without `accelerate` installed diffusers refuses fp32-kept modules; everything is fp32 here anyway.
    monkeypatch.setattr(diffusers.WanVACETransformer3DModel, "_keep_in_fp32_modules", None)
    reloaded = diffusers.WanVACETransformer3DModel.from_pretrained(out).eval()
    latents, timestep, context = inputs(config)
    vace_context = randn(2, 96, *LATENT[2:], seed=6)
    close(reloaded(latents, timestep, padded(context), control_hidden_states=vace_context).sample,
          ref(latents, timestep, padded(context), control_hidden_states=vace_context).sample)
    again = load_wan_dit(out, dtype=torch.float32)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_meta_construction_materialises_in_the_target_dtype(t2v):
    config, ref, path = t2v
    model = load_wan_dit(path, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.bfloat16 and not p.is_meta for p in params)
    latents, timestep, context = inputs(config)
    with torch.no_grad():
        out = model(latents, timestep, context)
        expected = ref(latents, timestep, padded(context)).sample
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 weights, fp32 glue


def test_wrong_checkpoints_raise_one_clear_error(t2v, vace, tmp_path):
    _, _, t2v_path = t2v
    _, _, vace_path = vace
    with pytest.raises(CheckpointError) as err:  # a VACE checkpoint into a T2V config
        load_wan_dit(vace_path, config="tiny")
    message = str(err.value)
    assert "unexpected keys" in message and "vace_blocks.0.proj_in.weight" in message and "vace-*" in message
    with pytest.raises(CheckpointError) as err:  # a T2V checkpoint into a VACE config
        load_wan_dit(t2v_path, config="tiny-vace")
    assert "missing keys" in str(err.value) and "vace_patch_embedding.weight" in str(err.value)
    with pytest.raises(CheckpointError) as err:  # wrong width
        load_wan_dit(t2v_path, config=WanConfig.from_name("tiny", dim=32))
    message = str(err.value)
    assert "mis-shaped" in message and "patch_embedding.weight: checkpoint (64, 16, 1, 2, 2) vs model (32" in message
    assert str(t2v_path) in message
    # A missing tensor and a stray one in the same file: both listed in one message.
    state = diffusers_model(WanConfig.from_name("tiny")).state_dict()
    state.pop("blocks.1.attn2.norm_k.weight")
    state["blocks.1.extra.weight"] = torch.ones(3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_wan_dit(tmp_path / "broken.safetensors", config="tiny")
    assert "blocks.1.attn2.norm_k.weight" in str(err.value) and "blocks.1.extra.weight" in str(err.value)
    with pytest.raises(CheckpointError) as err:  # extras may be ignored on request; a missing tensor never
        load_wan_dit(tmp_path / "broken.safetensors", config="tiny", ignore_unexpected=True)
    assert "blocks.1.attn2.norm_k.weight" in str(err.value) and "blocks.1.extra.weight" not in str(err.value)
    save_file({"encoder.weight": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan DiT"):
        load_wan_dit(tmp_path / "other.safetensors", config="tiny")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_wan_dit(tmp_path / "broken.safetensors")
    # A pickle that would run code is refused (weights_only=True), with the file named.
    torch.save({"blocks.0.modulation": Unsafe()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe.pth: cannot read as a weights-only"):
        load_wan_dit(tmp_path / "unsafe.pth", config="tiny")


class Unsafe:
    """Stands for an arbitrary pickled object (code on load)."""


@torch.no_grad()
def test_batched_cfg_equals_two_forwards(vace):
    config, ref, path = vace
    model = load_wan_dit(path, dtype=torch.float32)
    latents, timestep, context = inputs(config)
    neg = randn(2, 11, config.text_dim, seed=8)
    vace_context = randn(2, 96, *LATENT[2:], seed=7)
    calls = []
    handle = model.patch_embedding.register_forward_hook(lambda *a: calls.append(1))
    guidance = torch.tensor([4.5, 2.0])
    v = model.cfg_forward(latents, timestep, context, neg, guidance, vace_context=vace_context)
    handle.remove()
    assert len(calls) == 1  # one batched forward, not two
    cond = model(latents, timestep, context, vace_context=vace_context)
    uncond = model(latents, timestep, neg, vace_context=vace_context)
    close(v, uncond + guidance.view(-1, 1, 1, 1, 1) * (cond - uncond))
    close(model.cfg_forward(latents, timestep, context, neg, 4.5, vace_context=vace_context),
          uncond + 4.5 * (cond - uncond))


@torch.no_grad()
def test_phantom_reference_frames_and_three_way_guidance(t2v):
    config, ref, path = t2v
    model = load_wan_dit(path, dtype=torch.float32)
    latents, timestep, context = inputs(config)  # 3 latent frames = 2 video + 1 reference slot
    refs = randn(2, 16, 1, *LATENT[3:], seed=11)
    x = phantom_model_input(latents, refs)
    assert torch.equal(x[:, :, :2], latents[:, :, :2]) and torch.equal(x[:, :, 2:], refs)
    neg = randn(2, 5, config.text_dim, seed=12)
    v = model.phantom_cfg_forward(latents, refs, timestep, context, neg, guidance_img=5.0, guidance_text=7.5)
    pos_it = model(x, timestep, context)
    pos_i = model(x, timestep, neg)
    neg_v = model(phantom_model_input(latents, torch.zeros_like(refs)), timestep, neg)
    close(v, neg_v + 5.0 * (pos_i - neg_v) + 7.5 * (pos_it - pos_i))


def test_vace_mask_channels_follow_the_spec():
    F_, H, W = 9, 16, 24
    mask = (randn(2, 1, F_, H, W, seed=1) > 0).float()
    out = vace_mask_latent(mask)
    F_lat = (F_ + 3) // 4
    assert out.shape == (2, 64, F_lat, H // 8, W // 8)
    for i in range(F_lat):
        src = min(int((i + 0.5) * F_ / F_lat), F_ - 1)  # nearest-exact
        for a in (0, 3, 7):
            for b in (0, 5):
                torch.testing.assert_close(out[:, a * 8 + b, i], mask[:, 0, src, a::8, b::8], atol=0, rtol=0)


def test_vace_context_layout_and_reference_canvas():
    def encode(video):  # stand-in VAE: 16 channels, time (F+3)//4, space /8; remembers its inputs
        B, _, frames, H, W = video.shape
        pooled = F.avg_pool3d(video, (1, 8, 8))  # (B, 3, F, H/8, W/8)
        pooled = pooled[:, :, ::4] if frames > 1 else pooled
        return pooled.repeat(1, 6, 1, 1, 1)[:, :16] + 3.0

    video = torch.zeros(1, 3, 5, 16, 16)
    mask = torch.ones(1, 1, 5, 16, 16)
    image = torch.rand(3, 10, 20) * 2 - 1
    canvas = vace_reference_canvas(image, 16, 16)
    assert canvas.shape == (3, 16, 16)
    assert torch.all(canvas[:, :4] == 1) and torch.all(canvas[:, -4:] == 1)  # white bars above and below
    refs = [canvas[None], -canvas[None]]
    context = build_vace_context(encode, video, mask, refs)
    assert context.shape == (1, 96, 2 + 2, 2, 2)
    torch.testing.assert_close(context[:, :16, 0], encode(refs[0][:, :, None])[:, :, 0])  # list order kept
    torch.testing.assert_close(context[:, :16, 1], encode(refs[1][:, :, None])[:, :, 0])
    assert torch.all(context[:, 16:32, :2] == 0) and torch.all(context[:, 32:, :2] == 0)  # ref padding / mask
    assert torch.all(context[:, 32:, 2:] == 1)
    torch.testing.assert_close(context[:, :16, 2:], encode(video * 0))  # inactive = VAE(zeros) != 0
    assert torch.all(context[:, :16, 2:] != 0)


def test_gradients_reach_every_parameter():
    model = WanDiT(WanConfig.from_name("tiny-vace"))
    latents, timestep, context = inputs(model.config, batch=1)
    vace_context = randn(1, 96, *LATENT[2:], seed=2)
    model(latents, timestep, context, vace_context=vace_context).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert len(model.units) == 4 + 3


@torch.no_grad()
def test_sdpa_switch_gives_the_same_model(t2v):
    config, _, path = t2v
    model = load_wan_dit(path, dtype=torch.float32)
    latents, timestep, context = inputs(config)
    ours = model(latents, timestep, context)
    model.set_attention_impl("sdpa")
    assert model.blocks[0].attn2.attention_impl == "sdpa"
    close(model(latents, timestep, context), ours)


def test_config_validation():
    with pytest.raises(ValueError, match="vace_layers"):
        WanConfig.from_name("tiny", vace_layers=(1, 2), reference_mode="vace")
    with pytest.raises(ValueError, match="reference_mode"):
        WanConfig.from_name("tiny", vace_layers=(0,))
    with pytest.raises(ValueError, match="num_heads"):
        WanConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown Wan preset"):
        WanConfig.from_name("t2v-7b")
    presets = {n: WanConfig.from_name(n) for n in ("t2v-1.3b", "t2v-14b", "vace-1.3b", "vace-14b", "phantom-1.3b")}
    assert presets["vace-1.3b"].vace_layers == tuple(range(0, 30, 2)) and presets["vace-14b"].vace_layers[-1] == 35
    assert presets["t2v-14b"].dim == 5120 and presets["phantom-1.3b"].reference_mode == "phantom"
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in WanDiT(c).parameters()) for n, c in presets.items()
                  if n in ("t2v-1.3b", "vace-1.3b")}
    # docs/models.md#dit-configurations-and-presets
    assert counts == {"t2v-1.3b": 1_418_996_800, "vace-1.3b": 2_153_972_032}


def test_triton_kernels_inside_the_model_match_the_reference(monkeypatch):
    """The whole block graph through the Triton kernels (interpreter on CPU), forward and gradients."""
    torch.manual_seed(0)
    model = WanDiT(WanConfig.from_name("tiny-vace", num_layers=2, vace_layers=(0, 1)))
    latents, timestep, context = randn(1, 16, 2, 4, 4, seed=0), torch.tensor([500]), randn(1, 5, 32, seed=1)
    vace_context = randn(1, 96, 2, 4, 4, seed=2)

    def run(backend):
        monkeypatch.setenv("IDGRPO_KERNELS", backend)
        model.zero_grad()
        out = model(latents, timestep, context, vace_context=vace_context)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_out, ref_grads = run("reference")
    out, grads = run("triton")
    close(out, ref_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
