"""umT5 encoder: parity with transformers UMT5EncoderModel at a tiny random config (padded batch), the
trim-and-zero-pad output convention, bucket function, key renames and the local tokenizer.json wrapper."""

import math

import pytest
import torch

from idgrpo.models.umt5 import (
    UMT5Config,
    UMT5Encoder,
    UMT5Tokenizer,
    clean_prompt,
    hf_to_wan_key,
    relative_position_bucket,
)

WORDS = "a cat dog two people talk walk in the park red blue man woman smile at camera".split()


def make_tokenizer_json(path, words=WORDS):
    """A tiny word-level tokenizer.json with umT5's special tokens (<pad>=0, </s>=1, <unk>=2) and `$A </s>`."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = UMT5Config.from_name("tiny", text_len=16)
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    ref = transformers.UMT5EncoderModel(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # unit norm weights / default init hide mistakes: make everything random
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    ours = UMT5Encoder(cfg).eval()
    ours.load_state_dict_any(ref.state_dict())
    return ref, ours


def test_matches_transformers_with_padding(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (3, 16), generator=g)
    lengths = torch.tensor([16, 9, 1])  # a full row, a padded row, a single token
    mask = torch.arange(16)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    hidden = ours(ids, mask)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(hidden[b, :n], expected[b, :n], rtol=1e-4, atol=1e-5)
    context, got_lengths = ours.encode(ids, mask)
    assert context.shape == (3, 16, 32) and got_lengths.tolist() == lengths.tolist()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(context[b, :n], expected[b, :n], rtol=1e-4, atol=1e-5)
        assert torch.all(context[b, n:] == 0)


def test_encode_pads_short_batches_to_text_len(pair):
    _, ours = pair
    ids = torch.tensor([[5, 6, 1]])
    context, lengths = ours.encode(ids, torch.ones_like(ids, dtype=torch.bool))
    assert context.shape == (1, ours.config.text_len, 32) and lengths.tolist() == [3]
    assert torch.all(context[0, 3:] == 0) and torch.all(context[0, :3].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="text_len"):
        ours.encode(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.bool))


def test_bucket_function_matches_spec_formula():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel, 32, 128)
    for r, b in zip(rel.tolist(), got.tolist()):
        n = abs(r)
        expected = n if n < 8 else min(15, 8 + int(math.log(n / 8) / math.log(128 / 8) * 8))
        assert b == expected + (16 if r > 0 else 0), (r, b)


def test_hf_key_renames():
    assert hf_to_wan_key("shared.weight") == "token_embedding.weight"
    assert hf_to_wan_key("encoder.block.3.layer.0.SelfAttention.q.weight") == "blocks.3.attn.q.weight"
    assert hf_to_wan_key("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") == (
        "blocks.0.pos_embedding.embedding.weight"
    )
    assert hf_to_wan_key("encoder.block.1.layer.1.DenseReluDense.wi_0.weight") == "blocks.1.ffn.gate.0.weight"
    assert hf_to_wan_key("encoder.block.1.layer.1.DenseReluDense.wi_1.weight") == "blocks.1.ffn.fc1.weight"
    assert hf_to_wan_key("encoder.block.1.layer.1.layer_norm.weight") == "blocks.1.norm2.weight"
    assert hf_to_wan_key("encoder.final_layer_norm.weight") == "norm.weight"


def test_from_pretrained_directory(tmp_path, pair):
    ref, ours = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    loaded = UMT5Encoder.from_pretrained(tmp_path, UMT5Config.from_name("tiny", text_len=16), dtype=torch.float32)
    ids = torch.tensor([[4, 9, 1, 0]])
    mask = ids != 0
    torch.testing.assert_close(loaded.encode(ids, mask)[0], ours.encode(ids, mask)[0], rtol=0, atol=0)
    # config.json is read when no config is given (the text length stays configurable)
    assert UMT5Encoder.from_pretrained(tmp_path, dtype=torch.float32).config.dim == 32
    # the Wan layout (models_t5_umt5-xxl-enc-bf16.pth) loads with weights_only
    torch.save(ours.state_dict(), tmp_path / "models_t5_umt5-tiny-enc.pth")
    wan = UMT5Encoder.from_pretrained(tmp_path / "models_t5_umt5-tiny-enc.pth", ours.config, dtype=torch.float32)
    torch.testing.assert_close(wan.encode(ids, mask)[0], ours.encode(ids, mask)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        UMT5Encoder(UMT5Config.from_name("tiny")).load_state_dict_any({"shared.weight": torch.zeros(384, 32)})


def test_config_json_of_another_model_or_another_t5(tmp_path, pair):
    """Beside the DiT's config.json (the original Wan2.1 folder) the T5 .pth loads with its shapes as the config;
    a T5 config.json whose FFN is not gated-gelu is refused, naming the file."""
    from idgrpo.models.weights import CheckpointError

    ref, ours = pair
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "dim": 1536, "num_heads": 12}')
    torch.save(ours.state_dict(), tmp_path / "models_t5_umt5-tiny-enc.pth")
    loaded = UMT5Encoder.from_pretrained(tmp_path / "models_t5_umt5-tiny-enc.pth", dtype=torch.float32)
    assert loaded.config.dim == 32 and loaded.config.num_layers == 2
    ref.save_pretrained(tmp_path / "t5")
    config = tmp_path / "t5" / "config.json"
    config.write_text(config.read_text().replace('"gated-gelu"', '"relu"'))
    with pytest.raises(CheckpointError, match=r"t5/config.json: feed_forward_proj='relu'"):
        UMT5Encoder.from_pretrained(tmp_path / "t5")


def test_tokenizer(tmp_path):
    tok = UMT5Tokenizer(make_tokenizer_json(tmp_path / "tokenizer.json"), text_len=6)
    batch = tok(["a cat", "two  people &amp;amp; walk", "a cat a cat a cat a cat"])
    assert batch.ids.shape == (3, 6) and batch.ids.dtype == torch.long
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    assert batch.ids[0].tolist() == [vocab["a"], vocab["cat"], 1, 0, 0, 0]
    assert batch.mask[0].tolist() == [True, True, True, False, False, False]
    # cleaned: whitespace collapsed, double-escaped '&' is one unknown token
    assert batch.ids[1].tolist() == [vocab["two"], vocab["people"], 2, vocab["walk"], 1, 0]
    # truncated to text_len, still ending in </s>, and reported
    assert batch.ids[2].tolist() == [vocab["a"], vocab["cat"], vocab["a"], vocab["cat"], vocab["a"], 1]
    assert batch.truncated == [False, False, True] and batch.mask[2].all()
    assert clean_prompt("  x &amp;amp; \n y ") == "x & y"
    with pytest.raises(FileNotFoundError):
        UMT5Tokenizer(tmp_path / "nope.json")
