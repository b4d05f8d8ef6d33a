"""Reward scoring throughput: videos scored per second, idgrpo attention vs torch SDPA.

Usage:
    python -m bench reward            # Qwen2.5-VL-3B reward + compact presets, 240x416 and 480x832, bf16 (GPU)
    python -m bench reward --quick    # tiny presets on tiny frames, fp32 on CPU: checks the path runs

What one "video scored" is: `reward.score(frames, references, prompts)` on a batch of videos of 5
uint8 frames (B, 5, H, W, 3) on the device, each with two uint8 reference images of REFERENCE_SIZE,
returning (B,) rewards. The timing includes everything the GRPO trainer pays per call: frame
sampling (5 -> 4 frames for the VLM, docs/models.md#qwen-input-pipeline), resizing and patchifying on the device, the
chat template, tokenization and M-RoPE positions on the host, the forward. `forward_ms` is the model
alone on an already encoded batch.

(a) VLMReward on a Qwen2.5-VL-3B backbone (the `3b` preset, 3.75B parameters) with random bf16
    weights and no LoRA (a merged adapter costs the same; unmerged rank-64 adapters would add a
    little). The weights are random: the cost of the forward does not depend on them.
    Tokenizer: the published Qwen tokenizer.json is not shipped here, so a stand-in byte-level BPE
    is trained (in milliseconds) on the text being scored (system prompt, chat template, instruction,
    prompts). Its pre-tokenizer splits words as Qwen's does and its merges reach whole words, so the
    text part of a row has about as many tokens as Qwen's tokenizer gives (vision tokens, which
    dominate, are exact: 270 + 2 x 144 at 240x416, 986 + 2 x 144 at 480x832). Token ids do not change
    the cost. Set IDGRPO_QWEN_TOKENIZER=/path/to/tokenizer.json to use the real one.
(b) The compact identity reward model (idgrpo/reward/model.py) presets at the same inputs (it
    samples 5 frames and resizes frames and references to its own image_size).

Both rows of a pair run in the same process on the same inputs and the same weights; "sdpa" swaps
only the attention function (`set_attention_impl("sdpa")` of either reward model: for the VLM transformers'
sdpa path, one call per vision window sequence and a boolean causal+padding mask in the LLM; for the
compact model plain torch SDPA). `score_diff` is the largest |reward difference| of the sdpa row against
the idgrpo row (a sanity check that both compute the same).
Peak memory: CUDA max_memory_allocated over the timed calls, weights included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os

import torch

from bench.common import report, time_fn
from idgrpo.models.wan_dit import ATTENTION_IMPLS

FRAMES = 5
REFERENCES = 2
REFERENCE_SIZE = (336, 336)  # a portrait crop: 24 x 24 patches -> 144 LLM tokens per reference
# (label, (H, W), batch)
FULL_SHAPES = [("240x416", (240, 416), 8), ("480x832", (480, 832), 8)]
QUICK_SHAPES = [("56x84 (tiny)", (56, 84), 2)]
QUICK_REFERENCE_SIZE = (56, 56)
COMPACT_PRESETS = ["tiny", "small", "base"]
PROMPTS = [
    "A man in a red jacket and a woman with short grey hair talk on a park bench in autumn.",
    "Two friends walk side by side along a beach at sunset, laughing.",
    "A chef in a white uniform hands a plate to a young waiter in a busy kitchen.",
    "An old man and a girl play chess by a window, rain on the glass.",
]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


# ----------------------------------------------------------------------------- inputs


def stand_in_tokenizer(texts: list[str]):
    """A byte-level BPE with Qwen's special tokens, trained on `texts` until every word is one token
    (what Qwen's 151k-entry tokenizer does for common English words). See the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def _tokenizer(reward_config) -> tuple[object, str]:
    from tokenizers import Tokenizer

    from idgrpo.models.qwen_processor import SYSTEM_PROMPT

    path = os.environ.get("IDGRPO_QWEN_TOKENIZER")
    if path:
        return Tokenizer.from_file(path), f"Qwen tokenizer.json ({path})"
    texts = [SYSTEM_PROMPT, "system user assistant Picture 1: Picture 2: Video 1: "]
    texts += [reward_config.instruction.replace("{prompt}", p) for p in PROMPTS]
    return stand_in_tokenizer(texts), "stand-in byte-level BPE trained on the scored text (word ~ 1 token)"


def make_inputs(batch: int, size: tuple[int, int], reference_size: tuple[int, int], device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, list[list[torch.Tensor]], list[str]]:
    """frames uint8 (B, FRAMES, H, W, 3), REFERENCES uint8 (h, w, 3) images per video, prompts; on device."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, FRAMES, *size, 3), dtype=torch.uint8, generator=gen).to(device)
    references = [[torch.randint(0, 256, (*reference_size, 3), dtype=torch.uint8, generator=gen).to(device)
                   for _ in range(REFERENCES)] for _ in range(batch)]
    return frames, references, [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


# ----------------------------------------------------------------------------- models


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_vlm_reward(preset: str, device: torch.device, dtype: torch.dtype, quick: bool):
    """VLMReward on a random `preset` backbone, built directly on the device in `dtype` (no fp32 copy),
    with the tokenizer's special-token ids."""
    from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
    from idgrpo.models.qwen_processor import QwenProcessor
    from idgrpo.reward.vlm import VLMReward, VLMRewardConfig

    # Quick: keep tiny frames tiny (the default 100k-pixel video minimum would upscale them).
    reward_config = VLMRewardConfig(video_min_pixels=56 * 56, max_pixels=84 * 112) if quick else VLMRewardConfig()
    tokenizer, tokenizer_note = _tokenizer(reward_config)
    processor = QwenProcessor(tokenizer, extra_special_tokens=[reward_config.reward_token])
    base = Qwen2_5_VLConfig.from_name(preset)
    rows = tokenizer.get_vocab_size(with_added_tokens=True)
    config = dataclasses.replace(
        base, vocab_size=max(base.vocab_size, rows), image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id, vision_start_token_id=processor.ids["<|vision_start|>"],
        vision_end_token_id=processor.ids["<|vision_end|>"], pad_token_id=processor.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        backbone = Qwen2_5_VL(config)
    model = VLMReward(backbone, processor, reward_config).eval()
    return model, tokenizer_note


# ----------------------------------------------------------------------------- timing


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(row: dict, score, forward, inputs, device, warmup: int, iters: int) -> torch.Tensor | None:
    """Fill `row` with score / forward timings and peak memory; return the rewards (None on OOM)."""
    frames = inputs[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.no_grad():
            rewards = score(*inputs)
            timed = time_fn(lambda: score(*inputs), warmup=warmup, iters=iters, device=device)
            row.update(status="ok", videos_per_s=frames.shape[0] * 1e3 / timed["ms_median"],
                       ms_per_batch=timed["ms_median"])
            if forward is not None:
                row["forward_ms"] = time_fn(forward, warmup=1, iters=iters, device=device)["ms_median"]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
        rewards = None
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return rewards


def _pair(rows: list[dict], results: dict[str, torch.Tensor | None]) -> None:
    """Speedup of idgrpo over sdpa and the reward difference between them."""
    ours, sdpa = rows
    if ours["status"] == sdpa["status"] == "ok":
        ours["speedup_vs_sdpa"] = sdpa["ms_per_batch"] / ours["ms_per_batch"]
        sdpa["score_diff"] = (results["sdpa"].float() - results["idgrpo"].float()).abs().max().item()


def run_vlm(preset: str, shapes, reference_size, device, dtype, quick) -> tuple[list[dict], str]:
    model, tokenizer_note = build_vlm_reward(preset, device, dtype, quick)
    warmup, iters = (1, 2) if quick else (2, 5)
    label_model = "qwen2.5-vl-3b" if preset == "3b" else f"qwen2.5-vl-{preset}"
    rows = []
    for label, size, batch in shapes:
        inputs = make_inputs(batch, size, reference_size, device)
        encoded = model.encode(*inputs)
        lengths = encoded.lengths.tolist()
        vision = int(((encoded.input_ids == model.backbone.config.image_token_id)
                      | (encoded.input_ids == model.backbone.config.video_token_id)).sum()) // batch
        pair, results = [], {}
        for impl in ATTENTION_IMPLS:
            model.set_attention_impl(impl)
            row = {"model": label_model, "shape": f"{FRAMES}x{label}+{REFERENCES}ref", "batch": batch,
                   "tokens": max(lengths), "vision_tokens": vision, "dtype": str(dtype).removeprefix("torch."),
                   "device": device.type, "impl": impl}
            results[impl] = _measure(row, model.score, functools.partial(model, encoded), inputs, device, warmup, iters)
            pair.append(row)
            _free(device)
        _pair(pair, results)
        rows += pair
    model.set_attention_impl("idgrpo")
    return rows, tokenizer_note  # the caller frees the device memory once `model` is gone


def run_compact(preset: str, shapes, reference_size, device, dtype, quick) -> list[dict]:
    from idgrpo.reward.model import IdentityRewardModel, RewardModelConfig

    torch.manual_seed(0)
    model = IdentityRewardModel(RewardModelConfig.from_name(preset)).to(device=device, dtype=dtype).eval()
    warmup, iters = (1, 3) if quick else (3, 10)
    rows = []
    for label, size, batch in shapes:
        inputs = make_inputs(batch, size, reference_size, device)
        pair, results = [], {}
        for impl in ATTENTION_IMPLS:
            row = {"model": f"compact-{preset}", "shape": f"{FRAMES}x{label}+{REFERENCES}ref", "batch": batch,
                   "tokens": (model.config.image_size // model.config.patch_size) ** 2,
                   "dtype": str(dtype).removeprefix("torch."), "device": device.type, "impl": impl}
            model.set_attention_impl(impl)
            results[impl] = _measure(row, model.score, None, inputs, device, warmup, iters)
            pair.append(row)
            _free(device)
        _pair(pair, results)
        rows += pair
    return rows


def main(quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = quick or device.type != "cuda"  # the 3B model is never built on a CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = QUICK_SHAPES if small else FULL_SHAPES
    reference_size = QUICK_REFERENCE_SIZE if small else REFERENCE_SIZE
    rows, tokenizer_note = run_vlm("tiny" if small else "3b", shapes, reference_size, device, dtype, small)
    _free(device)
    for preset in ["tiny"] if small else COMPACT_PRESETS:
        rows += run_compact(preset, shapes, reference_size, device, dtype, small)
        _free(device)
    columns = ["model", "shape", "batch", "tokens", "vision_tokens", "dtype", "device", "impl", "status",
               "videos_per_s", "ms_per_batch", "forward_ms", "speedup_vs_sdpa", "score_diff", "peak_mem_gib"]
    extra = {"frames_per_video": FRAMES, "references_per_video": REFERENCES,
             "reference_size": list(reference_size), "tokenizer": tokenizer_note,
             "weights": "random (no checkpoint); VLM without LoRA (merged LoRA costs the same)",
             "timed": "reward.score(frames, references, prompts): sampling, resize, patchify, template, "
                      "tokenize, positions, forward; forward_ms = model forward on an encoded batch",
             "tokens": "VLM: longest row of the batch (text + vision); vision_tokens per row. "
                       "compact: tokens per image"}
    if small:
        extra["caveat"] = "CPU run of the tiny presets: checks that the benchmark works, not performance"
    report("reward", rows, columns, extra)
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
