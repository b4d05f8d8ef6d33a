"""encode-prompts and PromptCache: input formats, exactness against the encoder, truncation, resume after an
interruption, never a half-written cache, hash checks; plus the tiny end-to-end path
prompts -> cache -> DiT forward -> VAE decode -> mp4 -> frames."""

import importlib.util
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from idgrpo.models import prompt_cache as pc
from idgrpo.models.prompt_cache import EncodePromptsConfig, PromptCache, encode_prompts

PROMPTS = ["a man and a woman talk in the park", "two people walk, smiling", "a dog", "a cat on a red chair"]


def _cfg(tmp_path, prompts_file, **kw):
    base = dict(prompts=prompts_file, output=tmp_path / "cache" / "c.safetensors", model="tiny", text_len=64,
                dtype="float32", device="cpu", negative_prompt="blurry, low quality")  # fmt: skip
    return EncodePromptsConfig(**{**base, **kw})


def _txt(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")
    return path


def test_csv_input_and_its_references(tmp_path, capsys):
    """encode-prompts reads the reference CSV with the shared reader (tests/test_prompts.py); a missing reference
    image stops it before anything is written, unless --check-references is off."""
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(b"x")
    csv_path = tmp_path / "data.csv"
    csv_path.write_bytes('\ufeffref_paths, prompt\r\nrefs/a.png,"two people, talking"\r\nrefs/nope.png,a dog\r\n'
                         .encode())
    cfg = _cfg(tmp_path, csv_path)
    with pytest.raises(FileNotFoundError, match="data.csv line 3: reference image .*nope.png"):
        encode_prompts(cfg)
    assert not cfg.output.parent.exists()
    encode_prompts(_cfg(tmp_path, csv_path, check_references=False))
    assert PromptCache(cfg.output).prompts == ["two people, talking", "a dog"]
    assert "2 prompts" in capsys.readouterr().out


def test_cache_is_exact_and_zero_padded(tmp_path, capsys):
    cfg = _cfg(tmp_path, _txt(tmp_path, PROMPTS + [PROMPTS[0]]))  # a duplicate is encoded once
    assert encode_prompts(cfg) == 0
    assert "5 encoded" in capsys.readouterr().out  # 4 unique prompts + the negative prompt
    cache = PromptCache(cfg.output)
    assert len(cache) == 5 and cache.text_len == 64 and cache.dim == 32
    encoder, tokenizer = pc.build_text_encoder(cfg, torch.device("cpu"))
    tokens = tokenizer(PROMPTS)
    expected, lengths = encoder.encode(tokens.ids, tokens.mask)
    got = cache.lookup(PROMPTS)
    assert got.shape == (4, 64, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(got[b, n:] == 0) and torch.all(got[b, :n].abs().sum(-1) > 0)
    torch.testing.assert_close(cache.rows([4, 1]), expected[[0, 1]], rtol=0, atol=0)
    neg_tokens = tokenizer(["blurry, low quality"])
    neg, _ = encoder.encode(neg_tokens.ids, neg_tokens.mask)
    torch.testing.assert_close(cache.negative(3), neg.expand(3, -1, -1), rtol=0, atol=0)
    cache.verify(PROMPTS + [PROMPTS[0]])
    with pytest.raises(ValueError, match="row 1"):
        cache.verify([PROMPTS[0], "something else", *PROMPTS[2:], PROMPTS[0]])
    with pytest.raises(KeyError, match="not cached"):
        cache.lookup(["never encoded"])


def test_long_prompt_is_truncated_warned_and_counted(tmp_path):
    long = "word " * 100  # 500 bytes > 64 tokens with the byte tokenizer
    cfg = _cfg(tmp_path, _txt(tmp_path, ["short one", long]))
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 64 tokens were truncated.*line 2"):
        encode_prompts(cfg)
    cache = PromptCache(cfg.output)
    assert cache.truncated.tolist() == [0, 1] and cache.metadata["truncated"] == "1"
    assert cache.lengths.tolist()[1] == 64


def test_resume_after_interruption_never_half_writes(tmp_path, capsys, monkeypatch):
    prompts = [f"prompt number {i} about people" for i in range(7)]
    cfg = _cfg(tmp_path, _txt(tmp_path, prompts), batch_size=2, save_every=1)
    real_build = pc.build_text_encoder
    calls = {"n": 0}

    def flaky_build(c, device):
        encoder, tokenizer = real_build(c, device)
        real_encode = encoder.encode

        def encode(ids, mask):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
            return real_encode(ids, mask)

        encoder.encode = encode
        return encoder, tokenizer

    monkeypatch.setattr(pc, "build_text_encoder", flaky_build)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_prompts(cfg)
    assert not cfg.output.exists()  # no half-written cache
    partial = cfg.output.with_name("c.partial.safetensors")
    assert len(PromptCache(partial)) == 3  # negative + 3 prompts done in 2 batches, saved after each
    assert not list(cfg.output.parent.glob(".*tmp*"))
    capsys.readouterr()
    encode_prompts(cfg)  # resumes (the flaky encoder only fails on call 3, already spent)
    out = capsys.readouterr().out
    assert re.search(r"7 prompts -> .* \(4 encoded, 3 reused", out), out
    assert not partial.exists()
    monkeypatch.setattr(pc, "build_text_encoder", real_build)
    clean = _cfg(tmp_path, cfg.prompts, output=tmp_path / "clean.safetensors")
    encode_prompts(clean)
    a, b = load_file(str(cfg.output)), load_file(str(clean.output))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*were truncated")  # text_len=32 cuts the longest prompt
def test_tampered_or_mismatched_cache_is_refused(tmp_path):
    cfg = _cfg(tmp_path, _txt(tmp_path))
    encode_prompts(cfg)
    with safe_open(str(cfg.output), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(cfg.output))
    metadata["prompts"] = metadata["prompts"].replace("a dog", "a wolf")
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=metadata)
    with pytest.raises(ValueError, match="row 2: stored hash does not match"):
        PromptCache(tampered)
    truncated_file = tmp_path / "cut.safetensors"
    truncated_file.write_bytes(cfg.output.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        PromptCache(truncated_file)
    with pytest.raises(ValueError, match="other settings"):
        encode_prompts(_cfg(tmp_path, cfg.prompts, text_len=32))
    assert PromptCache(cfg.output).text_len == 64  # the refused run left the old cache untouched
    encode_prompts(_cfg(tmp_path, cfg.prompts, text_len=32, overwrite=True))
    assert PromptCache(cfg.output).text_len == 32
    bad_csv = tmp_path / "nop.csv"
    bad_csv.write_text("caption\nhello\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        encode_prompts(_cfg(tmp_path, bad_csv, output=tmp_path / "never.safetensors"))
    assert not (tmp_path / "never.safetensors").exists()


def test_cli_registration():
    from idgrpo.cli import COMMANDS

    module, function = COMMANDS["encode-prompts"][0].split(":")
    assert module == "idgrpo.models.prompt_cache" and function == "encode_prompts"


def test_end_to_end_prompts_to_mp4(tmp_path):
    """prompts -> cache -> DiT forward (when idgrpo.models.wan_dit is present) -> VAE decode -> mp4 -> frames."""
    pytest.importorskip("av")
    from idgrpo.media import read_video, write_video
    from idgrpo.models.wan_vae import WanVAE, WanVAEConfig

    cfg = _cfg(tmp_path, _txt(tmp_path, PROMPTS[:2]), text_len=512)
    encode_prompts(cfg)
    cache = PromptCache(cfg.output)
    context, negative = cache.lookup(PROMPTS[:2]), cache.negative(2)
    assert context.shape == (2, 512, 32)
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 2, 4, 4)  # 5 frames of 32 x 32
    if importlib.util.find_spec("idgrpo.models.wan_dit") is not None:
        from idgrpo.models.wan_dit import WanConfig, WanDiT

        dit = WanDiT(WanConfig.from_name("tiny", text_dim=cache.dim)).eval()
        sigma = 0.8
        with torch.no_grad():
            velocity = dit(latents, torch.full((2,), int(sigma * 1000)), context)
            velocity_neg = dit(latents, torch.full((2,), int(sigma * 1000)), negative)
        assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
        assert not torch.allclose(velocity, velocity_neg)  # the cached text reaches the model
        latents = latents - sigma * (velocity_neg + 4.5 * (velocity - velocity_neg))  # x0 = x_sigma - sigma * v
    vae = WanVAE(WanVAEConfig.from_name("tiny")).eval()
    video = vae.decode(latents, chunk_frames=1)  # (2, 3, 5, 32, 32) in [-1, 1]
    assert video.shape == (2, 3, 5, 32, 32)
    all_frames = vae.decode_frames(latents)  # (2, 5, 32, 32, 3) uint8
    expected = ((video.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(all_frames, expected, rtol=0, atol=0)
    frames = all_frames[0]
    path = write_video(tmp_path / "sample.mp4", frames, fps=16)
    back = read_video(path)
    assert back.shape == (5, 32, 32, 3) and back.dtype == torch.uint8
    assert (back.float() - frames.float()).abs().mean() < 20


def test_model_directory_in_wan_layout(tmp_path):
    """A Wan checkpoint directory (T5 .pth next to the VAE, tokenizer under google/umt5-xxl/) gives the same
    cache as the same weights and tokenizer in memory; the config is read off the weight shapes."""
    from idgrpo.models.umt5 import byte_tokenizer

    prompts = _txt(tmp_path, PROMPTS[:3])
    tiny = _cfg(tmp_path, prompts, output=tmp_path / "tiny.safetensors")
    encoder, _ = pc.build_text_encoder(tiny, torch.device("cpu"))
    wan = tmp_path / "Wan2.1-T2V-tiny"
    (wan / "google" / "umt5-xxl").mkdir(parents=True)
    torch.save(encoder.state_dict(), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save({"decoy": torch.zeros(1)}, wan / "Wan2.1_VAE.pth")  # must not be mistaken for the T5
    byte_tokenizer().save(str(wan / "google" / "umt5-xxl" / "tokenizer.json"))
    encode_prompts(tiny)
    from_dir = _cfg(tmp_path, prompts, output=tmp_path / "dir.safetensors", model=str(wan))
    encode_prompts(from_dir)
    a, b = PromptCache(tiny.output), PromptCache(from_dir.output)
    torch.testing.assert_close(a.lookup(PROMPTS[:3]), b.lookup(PROMPTS[:3]), rtol=0, atol=0)
    torch.testing.assert_close(a.negative(), b.negative(), rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no umT5 weights"):
        encode_prompts(_cfg(tmp_path, prompts, output=tmp_path / "x.safetensors", model=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="model path not found"):
        encode_prompts(_cfg(tmp_path, prompts, output=tmp_path / "x.safetensors", model=str(tmp_path / "absent")))
