"""LoRA files through the ecosystem's own loaders (test oracles only): peft's `PeftModel.from_pretrained` and the Wan
pipelines' `load_lora_weights` give idgrpo's velocity from idgrpo's files (LoRA on every Linear, alpha != r), idgrpo
gives peft's and diffusers' velocity from the files they save; the GRPO run directory's exports (policy and EMA) and
`idgrpo export-lora`, also on a run written before target names were full; the VLM reward checkpoint's adapters in
peft and in transformers' own `load_adapter`."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from idgrpo.models.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    disable_lora,
    load_diffusers_lora,
    load_peft,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    save_diffusers_lora,
    save_peft,
)
from idgrpo.models.wan_dit import WanConfig, WanDiT
from idgrpo.models.weights import save_diffusers
from idgrpo.testing import randn

peft = pytest.importorskip("peft", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_qwen2_5_vl import hf_config  # noqa: E402
from test_qwen_processor import tiny_model_config, tiny_tokenizer  # noqa: E402

from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, save_qwen2_5_vl, to_new_hf_key  # noqa: E402
from idgrpo.models.qwen_processor import QwenProcessor  # noqa: E402
from idgrpo.reward.vlm import VLMRewardConfig, build_vlm_reward_for_training  # noqa: E402

PRESETS = {"vace": "tiny-vace", "t2v": "tiny"}


def tiny_model(kind: str, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(WanConfig.from_name(PRESETS[kind])).eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """The tiny DiTs' base weights in diffusers' layout (diffusers loads them into its own Wan transformers)."""
    root = tmp_path_factory.mktemp("base")
    return {kind: save_diffusers(tiny_model(kind), root / kind) for kind in PRESETS}


def theirs(kind: str, directory):
    cls = diffusers.WanVACETransformer3DModel if kind == "vace" else diffusers.WanTransformer3DModel
    return cls.from_pretrained(directory).eval()


def pipeline(kind: str, transformer):
    """The real pipeline class around the transformer; `load_lora_weights` only touches the transformer."""
    cls = diffusers.WanVACEPipeline if kind == "vace" else diffusers.WanPipeline
    return cls(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)


def inputs(kind: str, seed: int = 0):
    vace = randn(1, 96, 2, 4, 4, seed=seed + 2) if kind == "vace" else None
    return randn(1, 16, 2, 4, 4, seed=seed), torch.tensor([700]), randn(1, 6, 32, seed=seed + 1), vace


@torch.no_grad()
def ours_velocity(model, x, t, ctx, vace):
    return model(x, t, ctx, vace_context=vace)


@torch.no_grad()
def their_velocity(transformer, x, t, ctx, vace):
    padded = F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))  # diffusers' pipelines pad the text to 512 rows
    extra = {} if vace is None else {"control_hidden_states": vace}
    return transformer(x, t, padded, **extra).sample


def randomise(params, seed: int = 3, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def adapted_everywhere(kind: str, rank: int = 4, alpha: float = 10.0) -> WanDiT:
    """LoRA on every Linear (the fp32 time embedding and head included), alpha != r, random A and B."""
    model = tiny_model(kind)
    apply_lora(model, rank, alpha, targets=".*")
    randomise(lora_parameters(model))
    return model


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_peft_loads_our_adapters_also_after_a_load_and_save_here(base_dirs, tmp_path):
    model = adapted_everywhere("vace")
    args = inputs("vace")
    expected = ours_velocity(model, *args)
    with disable_lora(model):
        assert (ours_velocity(model, *args) - expected).abs().max() > 1e-2  # the adapters matter
    save_peft(model, tmp_path / "ours")
    wrapped = peft.PeftModel.from_pretrained(theirs("vace", base_dirs["vace"]), str(tmp_path / "ours"))
    close(their_velocity(wrapped.base_model.model, *args), expected)

    # load_peft -> save_peft: the re-saved file loads in peft too (its config is PEFT-valid, its names full).
    fresh = tiny_model("vace")
    load_peft(fresh, tmp_path / "ours")
    save_peft(fresh, tmp_path / "again")
    wrapped = peft.PeftModel.from_pretrained(theirs("vace", base_dirs["vace"]), str(tmp_path / "again"))
    close(their_velocity(wrapped.base_model.model, *args), expected)


def test_peft_adapts_exactly_the_modules_of_a_regex_target(base_dirs, tmp_path):
    # Only the head `proj_out` (as a list item peft would also take every `vace_blocks.N.proj_out`): the written
    # target is an exact regex, and peft adapts exactly these modules.
    args = inputs("vace")
    head = tiny_model("vace")
    apply_lora(head, 2, 6, targets=r"proj_out|condition_embedder\.time_proj")
    randomise(lora_parameters(head))
    save_peft(head, tmp_path / "head")
    wrapped = peft.PeftModel.from_pretrained(theirs("vace", base_dirs["vace"]), str(tmp_path / "head"))
    assert sorted({n.rsplit(".lora_", 1)[0] for n, _ in wrapped.base_model.model.named_parameters() if ".lora_" in n}
                  ) == ["condition_embedder.time_proj", "proj_out"]
    close(their_velocity(wrapped.base_model.model, *args), ours_velocity(head, *args))


def test_we_load_an_adapter_peft_created_and_saved(base_dirs, tmp_path):
    """Identity-GRPO's way of making its LoRA."""
    args = inputs("vace")
    config = peft.LoraConfig(r=8, lora_alpha=20, init_lora_weights="gaussian", target_modules=list(DEFAULT_TARGETS))
    peft_model = peft.get_peft_model(theirs("vace", base_dirs["vace"]), config)
    randomise(p for name, p in peft_model.named_parameters() if "lora_B" in name)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = tiny_model("vace")
    load_peft(ours, tmp_path / "peft")
    close(ours_velocity(ours, *args), their_velocity(peft_model.base_model.model, *args))


@pytest.mark.parametrize("kind", ["vace", "t2v"])
def test_wan_pipelines_load_our_diffusers_lora(base_dirs, tmp_path, kind):
    model = adapted_everywhere(kind)
    args = inputs(kind)
    save_diffusers_lora(model, tmp_path / "lora")
    pipe = pipeline(kind, theirs(kind, base_dirs[kind]))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    expected = ours_velocity(model, *args)
    close(their_velocity(pipe.transformer, *args), expected)
    # The header's alpha is what makes it right: without it diffusers takes alpha = r (10 / 4 -> 4 / 4).
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(file)), str(tmp_path / "bare.safetensors"), metadata={"format": "pt"})
    pipe = pipeline(kind, theirs(kind, base_dirs[kind]))
    pipe.load_lora_weights(str(tmp_path), weight_name="bare.safetensors")
    assert (their_velocity(pipe.transformer, *args) - expected).abs().max() > 1e-2


def test_we_load_the_lora_diffusers_saves_and_need_alpha_without_its_metadata(base_dirs, tmp_path):
    from peft.utils import get_peft_model_state_dict

    transformer = theirs("vace", base_dirs["vace"])
    transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights="gaussian",
                                            target_modules=[*DEFAULT_TARGETS, "proj_out", "time_proj"]))
    randomise(p for name, p in transformer.named_parameters() if "lora_B" in name)
    args = inputs("vace")
    expected = their_velocity(transformer, *args)
    layers = get_peft_model_state_dict(transformer)
    diffusers.WanVACEPipeline.save_lora_weights(
        tmp_path / "with", transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    ours = tiny_model("vace")
    loaded = load_diffusers_lora(ours, tmp_path / "with")
    assert "proj_out" in loaded and "vace_blocks.2.proj_out" in loaded and "condition_embedder.time_proj" in loaded
    close(ours_velocity(ours, *args), expected)

    # Saved without metadata (as diffusers' older training scripts do): alpha must be given.
    diffusers.WanVACEPipeline.save_lora_weights(tmp_path / "without", transformer_lora_layers=layers)
    with pytest.raises(ValueError, match="pass lora_alpha="):
        load_diffusers_lora(tiny_model("vace"), tmp_path / "without")
    ours = tiny_model("vace")
    load_diffusers_lora(ours, tmp_path / "without", lora_alpha=12)
    close(ours_velocity(ours, *args), expected)


def test_grpo_run_exports_policy_and_ema_adapters_that_peft_and_diffusers_load(tmp_path):
    from idgrpo.rl.config import RecipeConfig
    from idgrpo.rl.recipe import build_trainer

    run = tmp_path / "run"
    config = RecipeConfig.from_name("tiny", model="tiny", lora_rank=4, lora_alpha=12.0, ema_decay=0.9, kl_beta=0.004,
                                  reference="lora", run_dir=str(run), resume=False)
    trainer = build_trainer(config)
    randomise(trainer.params, seed=5)  # the trained adapters (B is zero at the start)
    trainer.ema.shadow = [torch.randn(p.shape, generator=torch.Generator().manual_seed(6)) * 0.05
                          for p in trainer.params]
    trainer.save()
    args = inputs("t2v")
    with torch.no_grad():
        expected = trainer.policy(*args[:3])
    module = trainer.policy.module
    adapted = sorted(name for name, _ in lora_modules(module))

    # Base weights of the run's policy, in diffusers' layout, for peft's and diffusers' own models.
    state = trainer.policy.full_state_dict()
    base = WanDiT(WanConfig.from_name("tiny"))
    base.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k})
    save_diffusers(base, tmp_path / "base")

    adapter_config = json.loads((run / "lora" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == adapted and adapter_config["lora_alpha"] == 12.0
    wrapped = peft.PeftModel.from_pretrained(theirs("t2v", tmp_path / "base"), str(run / "lora"))
    close(their_velocity(wrapped.base_model.model, *args), expected)
    pipe = pipeline("t2v", theirs("t2v", tmp_path / "base"))
    pipe.load_lora_weights(str(run / "lora_diffusers"))
    close(their_velocity(pipe.transformer, *args), expected)

    # The EMA's adapters, in both formats.
    ema = {k: v for k, v in load_file(str(run / "ema.safetensors")).items() if ".lora_" in k}
    assert not torch.equal(ema["blocks.0.attn1.to_q.lora_B.weight"],
                           state["blocks.0.attn1.to_q.lora_B.weight"])  # the EMA's, not the policy's
    for directory, load in ((run / "lora_ema", load_peft), (run / "lora_ema_diffusers", load_diffusers_lora)):
        ours = WanDiT(WanConfig.from_name("tiny"))
        load(ours, directory)
        loaded = lora_state_dict(ours)
        assert set(loaded) == set(ema) and all(torch.equal(v, ema[k]) for k, v in loaded.items())


def test_export_lora_rewrites_a_run_saved_before_target_names_were_full(base_dirs, tmp_path, capsys):
    from idgrpo.cli import main

    model = tiny_model("t2v")
    apply_lora(model, 4, 12, targets=[*DEFAULT_TARGETS, "ffn.net.0.proj", "ffn.net.2"])
    randomise(lora_parameters(model))
    args = inputs("t2v")
    expected = ours_velocity(model, *args)
    run = tmp_path / "old_run"
    save_peft(model, run / "lora")
    # What the trainer wrote then: last name components (peft matches "2" against the module `blocks.2` and
    # refuses it) and our init name, which peft's LoraConfig rejects.
    adapted = sorted(name for name, _ in lora_modules(model))
    config = json.loads((run / "lora" / "adapter_config.json").read_text())
    config["target_modules"] = sorted({n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0" for n in adapted})
    config["init_lora_weights"] = "kaiming"
    assert config["target_modules"] == ["2", "proj", "to_k", "to_out.0", "to_q", "to_v"]
    (run / "lora" / "adapter_config.json").write_text(json.dumps(config))

    main(["export-lora", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    main(["export-lora", str(run), "--format", "diffusers", "--out", str(tmp_path / "diffusers")])
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["target_modules"] == adapted and written["init_lora_weights"] is True
    wrapped = peft.PeftModel.from_pretrained(theirs("t2v", base_dirs["t2v"]), str(tmp_path / "peft"))
    close(their_velocity(wrapped.base_model.model, *args), expected)
    pipe = pipeline("t2v", theirs("t2v", base_dirs["t2v"]))
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    close(their_velocity(pipe.transformer, *args), expected)
    with pytest.raises(SystemExit):
        main(["export-lora", str(run), "--ema", "--out", str(tmp_path / "nothing")])
    assert "lora_ema/adapter_model.safetensors: missing" in capsys.readouterr().err


def test_vlm_reward_adapters_load_in_peft_and_transformers(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    save_qwen2_5_vl(Qwen2_5_VL(tiny_model_config(QwenProcessor(tokenizer))), tmp_path / "base")
    tokenizer.save(str(tmp_path / "base" / "tokenizer.json"))
    config = VLMRewardConfig(lora_rank=4, lora_alpha=12.0)
    reward = build_vlm_reward_for_training(tmp_path / "base", config, seed=0).eval()
    randomise(lora_parameters(reward.backbone), scale=0.1)
    saved = reward.save(tmp_path / "ckpt")
    targets = json.loads((saved / "adapter_config.json").read_text())["target_modules"]
    assert "model.language_model.layers.0.self_attn.q_proj" in targets
    ids = torch.randint(1, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reward.backbone(ids)
        with disable_lora(reward.backbone):
            assert (reward.backbone(ids) - expected).abs().max() > 1e-3

    backbone = reward.backbone
    state = {to_new_hf_key(k): v for k, v in backbone.state_dict().items() if ".lora_" not in k}

    def hf_model():
        model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(backbone.config)).eval()
        model.load_state_dict(state, strict=False)
        return model

    for model in (peft.PeftModel.from_pretrained(hf_model(), str(saved)), hf_model()):
        if not isinstance(model, peft.PeftModel):
            model.load_adapter(str(saved))  # transformers' own PEFT integration
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    adapters = load_file(str(saved / "adapter_model.safetensors"))
    assert all(".language_model." in k for k in adapters)
