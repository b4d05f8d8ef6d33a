"""The three model loaders (Wan DiT, Wan VAE, umT5) on the folders the ecosystem writes: a diffusers pipeline root
laid out by diffusers' and transformers' own save_pretrained (sharded where they shard), the original Wan2.1
folder; the one default-dtype rule; and errors that name the damaged file."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from idgrpo.models.umt5 import UMT5Encoder, to_wan_layout
from idgrpo.models.wan_dit import WanConfig
from idgrpo.models.wan_vae import WanVAE, WanVAEConfig, diffusers_to_original_key
from idgrpo.models.weights import (
    CheckpointError,
    default_dtype,
    diffusers_config,
    load_wan_dit,
    original_config,
    to_original_state_dict,
)
from idgrpo.testing import randn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LOADERS = {"transformer": load_wan_dit, "vae": WanVAE.from_pretrained, "text_encoder": UMT5Encoder.from_pretrained}
MODEL_INDEX = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
               "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
               "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
               "scheduler": ["diffusers", "UniPCMultistepScheduler"]}  # fmt: skip


def _randomise(model, seed):
    """Random weights beyond the default init (unit gammas and zero biases hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(root, {component: reference model}): a tiny Wan pipeline folder written component by component."""
    torch.manual_seed(0)
    raw = {k: v for k, v in diffusers_config(WanConfig.from_name("tiny")).items() if not k.startswith("_")}
    models = {
        "transformer": _randomise(diffusers.WanTransformer3DModel.from_config(raw), 1),
        "vae": _randomise(diffusers.AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                                     latents_mean=[0.1] * 16, latents_std=[2.0] * 16), 2),
        "text_encoder": _randomise(transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            dropout_rate=0.0)), 3),
    }  # fmt: skip
    root = tmp_path_factory.mktemp("Wan-tiny-Diffusers")
    models["transformer"].save_pretrained(root / "transformer", max_shard_size="100KB")
    models["vae"].save_pretrained(root / "vae", max_shard_size="100KB")
    models["text_encoder"].save_pretrained(root / "text_encoder", max_shard_size="20KB")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root, models


def _dit_output(model, ours: bool):
    latents, timestep, context = randn(1, 16, 3, 4, 6, seed=4), torch.tensor([700]), randn(1, 7, 32, seed=5)
    with torch.no_grad():
        if ours:
            return model(latents, timestep, context)
        return model(latents, timestep, F.pad(context, (0, 0, 0, 512 - 7))).sample  # diffusers takes it padded


def _vae_output(model, ours: bool):
    z = randn(1, 16, 2, 2, 2, seed=6)
    with torch.no_grad():
        return model.decode(z) if ours else model.decode(z * 2.0 + 0.1).sample  # the config's latents_std / mean


def _text_output(model, ours: bool):
    ids = torch.tensor([[5, 9, 33, 1]])
    with torch.no_grad():
        return model(ids, ids > 0) if ours else model(input_ids=ids).last_hidden_state


OUTPUTS = {"transformer": _dit_output, "vae": _vae_output, "text_encoder": _text_output}


def test_pipeline_root_loads_every_component(pipeline):
    root, refs = pipeline
    for component in LOADERS:
        assert len(list((root / component).glob("*.safetensors"))) > 1, component  # sharded, with an index
    for component, load in LOADERS.items():
        for path in (root, root / component):  # the pipeline root and the component's own folder
            model = load(path)
            assert all(p.dtype == torch.float32 for p in model.parameters())  # as stored
            output = OUTPUTS[component]
            torch.testing.assert_close(output(model, True), output(refs[component], False), rtol=1e-4, atol=1e-5)


def test_original_wan_folder(pipeline, tmp_path):
    """Wan2.1-T2V-1.3B's own layout: the DiT's config.json and weights beside Wan2.1_VAE.pth and the T5 .pth."""
    _, refs = pipeline
    vae_config = WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=(0.1,) * 16,
                              latents_std=(2.0,) * 16)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(original_config(WanConfig.from_name("tiny"))))
    save_file({k: v.contiguous() for k, v in to_original_state_dict(refs["transformer"].state_dict()).items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    torch.save({diffusers_to_original_key(k, vae_config): v for k, v in refs["vae"].state_dict().items()},
               tmp_path / "Wan2.1_VAE.pth")  # fmt: skip
    torch.save(to_wan_layout(refs["text_encoder"].state_dict()), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    models = {"transformer": load_wan_dit(tmp_path), "vae": WanVAE.from_pretrained(tmp_path, vae_config),
              "text_encoder": UMT5Encoder.from_pretrained(tmp_path)}  # config from the .pth's shapes
    for component, model in models.items():
        output = OUTPUTS[component]
        torch.testing.assert_close(output(model, True), output(refs[component], False), rtol=1e-4, atol=1e-5)


def test_one_default_dtype_rule(pipeline, tmp_path):
    """dtype=None keeps what the checkpoint stores (bf16 here); an explicit dtype converts while loading."""
    _, refs = pipeline
    for component, load in LOADERS.items():
        copy.deepcopy(refs[component]).to(torch.bfloat16).save_pretrained(tmp_path / component)
        assert {p.dtype for p in load(tmp_path / component).parameters()} == {torch.bfloat16}, component
        assert {p.dtype for p in load(tmp_path / component, dtype=torch.float16).parameters()} == {torch.float16}
    assert default_dtype([torch.float32, torch.int64]) == torch.float32
    assert default_dtype([torch.bfloat16, torch.float16]) == torch.float32  # mixed: float32
    assert default_dtype([torch.float8_e4m3fn]) == torch.float32  # not a compute dtype: float32
    assert default_dtype([torch.float16, torch.float16]) == torch.float16


class Unsafe:
    """Stands for an arbitrary pickled object (code on load)."""


def _damage(folder, how):
    """Damage a copied component folder; returns the file the error must name."""
    weights = sorted(folder.glob("*.safetensors"))
    index = next(folder.glob("*.index.json"), None)
    if how == "empty":
        weights[0].write_bytes(b"")
        return weights[0]
    if how == "truncated":
        weights[-1].write_bytes(weights[-1].read_bytes()[:-64])
        return weights[-1]
    if how == "missing shard":
        weights[0].unlink()
        return index
    if how == "bad index":
        index.write_text('{"weight_map": ')
        return index
    if how == "bad json":
        (folder / "config.json").write_text('{"_class_name": ')
        return folder / "config.json"
    if how == "bad field":
        raw = json.loads((folder / "config.json").read_text())
        if "latents_std" in raw:
            raw["latents_std"][3] = -1.0
        else:
            raw.pop("num_layers")
        (folder / "config.json").write_text(json.dumps(raw))
        return folder / "config.json"
    if how == "unsafe pickle":
        for file in [*weights, *folder.glob("*.index.json")]:
            file.unlink()
        torch.save({"weight": Unsafe()}, folder / "weights.pth")
        return folder / "weights.pth"
    if how == "another model's config":
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage"}))
        return folder / "config.json"
    raise ValueError(how)


@pytest.mark.parametrize("component", LOADERS)
@pytest.mark.parametrize("how, message", [
    ("empty", "not a readable safetensors file"), ("truncated", "not a readable safetensors file"),
    ("missing shard", "shard"), ("bad index", "not valid JSON"), ("bad json", "not valid JSON"),
    ("bad field", "num_layers|latents_std must be positive"), ("unsafe pickle", "cannot read as a weights-only"),
    ("another model's config", "not a .* config \\(AutoencoderKLQwenImage\\)"),
])  # fmt: skip
def test_unreadable_checkpoints_name_the_file(pipeline, tmp_path, component, how, message):
    root, _ = pipeline
    shutil.copytree(root / component, tmp_path / component)
    culprit = _damage(tmp_path / component, how)
    with pytest.raises(CheckpointError, match=message) as err:
        LOADERS[component](tmp_path / component)
    assert str(culprit) in str(err.value)


def test_pipeline_root_without_the_component(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    for component, load in LOADERS.items():
        with pytest.raises(CheckpointError, match=f"pipeline root .*without a {component}/ folder"):
            load(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent: Wan VAE weights not found"):
        WanVAE.from_pretrained(tmp_path / "absent")
