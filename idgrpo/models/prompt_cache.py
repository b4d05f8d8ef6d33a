"""Prompt-embedding cache: `idgrpo encode-prompts` runs the umT5 encoder once over a prompt list and
writes a safetensors file; trainers read it with `PromptCache`, so the 5.7B text encoder never sits in
GPU memory during RL (the encoder is frozen, so cached embeddings are exact;
docs/models.md#umt5-text-encoder).

Usage:
    idgrpo encode-prompts --prompts data/train.csv --output cache/train.safetensors \\
        --model /ckpt/Wan2.1-T2V-1.3B            # umT5 weights (+ tokenizer.json) from a local directory
    idgrpo encode-prompts --prompts prompts.txt --output /tmp/c.safetensors --model tiny   # CPU demo / tests
    One process encodes (no torchrun needed); every rank of a training job reads the same file.

    cache = PromptCache("cache/train.safetensors", device="cuda")
    context = cache.lookup(["a man and a woman talk"])     # (B, 512, 4096), zero past each prompt's length
    negative = cache.negative(batch_size=4)                # the cached negative prompt, same layout

Inputs: a CSV with a `prompt` column (the reference data format is `ref_paths,prompt`, with `;`-separated
reference image paths relative to the CSV), or a plain text file with one prompt per line (blank lines
skipped); both read by `idgrpo.prompts.read_prompts`, the reader `train-grpo` uses too
(docs/data-and-checkpoints.md).

File layout (safetensors; rows are in input order, duplicates encoded once):
    embeddings (sum of lengths, dim)   the valid rows only, packed; padding is re-created as zeros on read
    lengths (N,) int64, hashes (N, 32) uint8 (sha256 of the prompt text), truncated (N,) uint8
    negative.embedding (n, dim), negative.length (1,), negative.hash (1, 32)
    metadata: format, model, text_len, dim, dtype, clean, prompts (JSON), negative_prompt, truncated count

Bad input and recovery:
- a CSV without a `prompt` column, an empty prompt, a missing reference image file: ValueError /
  FileNotFoundError naming the file, the line and what was expected; nothing is written.
- a prompt longer than text_len tokens: truncated (keeping </s>), warned about with its line, counted in
  the summary and in the file (`truncated`).
- writes are atomic (temporary file + rename): an interrupted run never leaves a half-written cache. Every
  `save_every` batches the rows done so far go to `<output>.partial.safetensors`; re-running the same
  command resumes from it (and from an existing output): rows whose hash is already there are reused.
- a cache made with different settings (model, text_len, clean, dtype) is refused unless --overwrite.
- reading: a cache whose stored hashes do not match its prompts (edited or corrupt) raises naming the
  row; `lookup` of a prompt that is not cached raises naming it; `verify(prompts)` checks row alignment.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from idgrpo.errors import UsageError, at_least, device_name, one_of, within
from idgrpo.prompts import PromptRow, read_prompts

FORMAT = "idgrpo-prompt-cache/1"
# Wan2.1's default negative prompt (`sample_neg_prompt` in its configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class EncodePromptsConfig:
    prompts: Path
    """Prompt list: .csv with a `prompt` column (optionally `ref_paths`), or text with one prompt per line."""
    output: Path
    """Cache file to write (.safetensors)."""
    model: str = "tiny"
    """umT5 weights: a local directory (HF text_encoder/ with config.json, or a Wan checkpoint directory
    with models_t5_*.pth), or "tiny" for the random-weight test/demo encoder."""
    tokenizer: Path | None = None
    """tokenizer.json (default: looked up next to the weights); ignored for "tiny" (byte tokenizer)."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Negative prompt cached alongside (Wan2.1's default)."""
    text_len: int = 512
    """Context rows: prompts are truncated to this many tokens and padded to it on read."""
    batch_size: int = 8
    """Prompts per encoder call."""
    dtype: str = "bfloat16"
    """Encoder and cache dtype: bfloat16 | float16 | float32."""
    device: str = "auto"
    """Encoder device: auto (cuda when available), cpu, cuda, cuda:N."""
    clean: bool = True
    """Apply Wan/diffusers prompt cleaning (HTML unescape, whitespace) before tokenizing."""
    check_references: bool = True
    """For CSVs with `ref_paths`: fail early when a reference image file does not exist."""
    save_every: int = 50
    """Batches between resumable partial saves."""
    overwrite: bool = False
    """Replace an existing cache written with different settings instead of refusing."""
    seed: int = 0
    """Weight seed of the "tiny" encoder."""

    def __post_init__(self):
        self.prompts, self.output = Path(self.prompts), Path(self.output)
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
        one_of(self, "dtype", sorted(_DTYPES))
        at_least(self, 2, "text_len")
        at_least(self, 1, "batch_size", "save_every")
        within(self, "seed", 0, 2**32 - 1)
        device_name(self)
        if self.output.suffix != ".safetensors":
            raise UsageError(f"--output {self.output}: expected a .safetensors path")
        if not self.negative_prompt.strip():
            raise UsageError("--negative-prompt must not be empty")


def prompt_hash(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()


# ---------------------------------------------------------------------------------------------
# writing


def _settings(cfg: EncodePromptsConfig, dim: int) -> dict[str, str]:
    return {"format": FORMAT, "model": cfg.model, "text_len": str(cfg.text_len), "dim": str(dim),
            "dtype": cfg.dtype, "clean": str(cfg.clean)}  # fmt: skip


def _load_existing(path: Path, settings: dict[str, str], overwrite: bool) -> dict[bytes, tuple[torch.Tensor, bool]]:
    """hash -> (valid rows, truncated) of an earlier cache or partial file written with the same settings."""
    if not path.exists():
        return {}
    try:
        cache = PromptCache(path)
    except ValueError:
        if overwrite:
            return {}
        raise
    differing = {k: (cache.metadata.get(k), v) for k, v in settings.items() if cache.metadata.get(k) != v}
    if differing:
        if overwrite:
            return {}
        raise ValueError(f"{path}: existing cache was written with other settings {differing} (have, want); "
                         "pass --overwrite to replace it")  # fmt: skip
    rows = {h: (cache.row(i), bool(cache.truncated[i])) for i, h in enumerate(cache.hashes)}
    rows[prompt_hash(cache.negative_prompt)] = (cache.negative_embedding, cache.negative_truncated)
    return rows


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pack(prompts: list[str], done: dict[bytes, tuple[torch.Tensor, bool]], negative: str,
          settings: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """Tensors + metadata of the cache file for the prompts whose hashes are in `done` (in order)."""
    hashes = [prompt_hash(p) for p in prompts]
    keep = [i for i, h in enumerate(hashes) if h in done]
    neg_hash = prompt_hash(negative)
    rows = [done[hashes[i]][0] for i in keep]
    truncated = [done[hashes[i]][1] for i in keep]
    dim = int(settings["dim"])
    tensors = {
        "embeddings": torch.cat(rows) if rows else done[neg_hash][0].new_zeros(0, dim),
        "lengths": torch.tensor([r.shape[0] for r in rows], dtype=torch.int64),
        "hashes": torch.tensor([list(hashes[i]) for i in keep], dtype=torch.uint8).reshape(-1, 32),
        "truncated": torch.tensor(truncated, dtype=torch.uint8),
        "negative.embedding": done[neg_hash][0],
        "negative.length": torch.tensor([done[neg_hash][0].shape[0]], dtype=torch.int64),
        "negative.hash": torch.tensor([list(neg_hash)], dtype=torch.uint8),
        "negative.truncated": torch.tensor([done[neg_hash][1]], dtype=torch.uint8),
    }
    metadata = {**settings, "prompts": json.dumps([prompts[i] for i in keep], ensure_ascii=False),
                "negative_prompt": negative, "truncated": str(sum(truncated))}  # fmt: skip
    return tensors, metadata


def _find_tokenizer(cfg: EncodePromptsConfig, weights: Path) -> Path:
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    directory = weights if weights.is_dir() else weights.parent
    candidates = [directory / "tokenizer.json", directory.parent / "tokenizer" / "tokenizer.json",
                  directory / "google" / "umt5-xxl" / "tokenizer.json"]  # fmt: skip
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no tokenizer.json found for {weights} (looked at {[str(c) for c in candidates]}); "
                            "pass --tokenizer")  # fmt: skip


def build_text_encoder(cfg: EncodePromptsConfig, device: torch.device):
    """(UMT5Encoder, UMT5Tokenizer) for `cfg.model`: "tiny" (seeded random weights, byte tokenizer) or a path."""
    from idgrpo.models.umt5 import UMT5Config, UMT5Encoder, UMT5Tokenizer, byte_tokenizer

    dtype = _DTYPES[cfg.dtype]
    if cfg.model == "tiny":
        torch.manual_seed(cfg.seed)
        encoder = UMT5Encoder(UMT5Config.from_name("tiny", text_len=cfg.text_len)).to(device=device, dtype=dtype)
        return encoder.eval(), UMT5Tokenizer(byte_tokenizer(), cfg.text_len, clean=cfg.clean)
    weights = Path(cfg.model)
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: umT5 model path not found (a local directory or file, or 'tiny')")
    if weights.is_dir() and not (weights / "config.json").exists():
        # A Wan checkpoint directory also holds the VAE and DiT: pick the T5 file by name.
        found = sorted(weights.glob("*t5*.pth")) + sorted(weights.glob("*t5*.safetensors"))
        if not found and (weights / "text_encoder").is_dir():
            found = [weights / "text_encoder"]
        if not found:
            raise FileNotFoundError(f"{weights}: no umT5 weights (config.json + *.safetensors, *t5*.pth, "
                                    "or text_encoder/)")  # fmt: skip
        weights = found[0]
    tokenizer = UMT5Tokenizer(_find_tokenizer(cfg, weights), cfg.text_len, clean=cfg.clean)
    encoder = UMT5Encoder.from_pretrained(weights, dtype=dtype, device=device)  # config: config.json or shapes
    encoder.config.text_len = cfg.text_len
    return encoder, tokenizer


def encode_prompts(cfg: Annotated[EncodePromptsConfig, tyro.conf.arg(name="")]) -> int:
    """Encode a prompt list (and the negative prompt) with umT5 into a safetensors cache; resumable."""
    from tqdm import tqdm

    rows = read_prompts(cfg.prompts, references="check" if cfg.check_references else "paths")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)  # fmt: skip
    encoder, tokenizer = build_text_encoder(cfg, device)
    settings = _settings(cfg, encoder.config.dim)
    partial = cfg.output.with_name(cfg.output.name.replace(".safetensors", ".partial.safetensors"))
    done = {**_load_existing(cfg.output, settings, cfg.overwrite), **_load_existing(partial, settings, cfg.overwrite)}
    reused = sum(prompt_hash(r.prompt) in done for r in rows)

    # The negative prompt goes first so that every partial save is a complete, readable cache.
    where: dict[bytes, str] = {}
    todo: list[str] = []
    for r in [PromptRow(cfg.negative_prompt, where="negative prompt"), *rows]:
        h = prompt_hash(r.prompt)
        if h not in done and h not in where:
            where[h] = r.where
            todo.append(r.prompt)
    prompts = [r.prompt for r in rows]
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    bar = tqdm(batches, desc="encode-prompts", unit="batch", disable=not batches, file=sys.stderr)
    for number, batch in enumerate(bar, start=1):
        tokens = tokenizer(batch)
        context, lengths = encoder.encode(tokens.ids.to(device), tokens.mask.to(device))
        for prompt, emb, n, cut in zip(batch, context.cpu(), lengths.tolist(), tokens.truncated):
            done[prompt_hash(prompt)] = (emb[:n].clone(), cut)
        if number % cfg.save_every == 0 and number < len(batches):
            _atomic_save(*_pack(prompts, done, cfg.negative_prompt, settings), partial)
    truncated_where = [r.where for r in [PromptRow(cfg.negative_prompt, where="negative prompt"), *rows]
                       if done[prompt_hash(r.prompt)][1]]  # fmt: skip
    if truncated_where:
        warnings.warn(f"{len(truncated_where)} prompt(s) longer than {cfg.text_len} tokens were truncated: "
                      f"{truncated_where[:5]}{' ...' if len(truncated_where) > 5 else ''}", stacklevel=1)  # fmt: skip
    tensors, metadata = _pack(prompts, done, cfg.negative_prompt, settings)
    _atomic_save(tensors, metadata, cfg.output)
    partial.unlink(missing_ok=True)
    print(f"encode-prompts: {len(prompts)} prompts -> {cfg.output} ({len(todo)} encoded, {reused} reused, "
          f"{len(truncated_where)} truncated, {cfg.output.stat().st_size / 2**20:.1f} MiB)")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# reading


class PromptCache:
    """Read side of the cache: zero-padded (B, text_len, dim) contexts by prompt text or row index."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.path = path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt cache not found; run `idgrpo encode-prompts`")
        try:
            with safe_open(str(path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{path}: not a readable safetensors prompt cache ({e})") from e
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.metadata.get('format')!r}, expected {FORMAT!r}")
        self.text_len, self.dim = int(self.metadata["text_len"]), int(self.metadata["dim"])
        self.prompts: list[str] = json.loads(self.metadata["prompts"])
        self.negative_prompt = self.metadata["negative_prompt"]
        self.lengths = tensors["lengths"]
        self.truncated = tensors["truncated"]
        self.hashes = [bytes(h.tolist()) for h in tensors["hashes"]]
        n = len(self.prompts)
        consistent = (
            self.lengths.shape == (n,)
            and len(self.hashes) == n
            and tensors["embeddings"].shape[0] == int(self.lengths.sum())
            and bool(((self.lengths >= 1) & (self.lengths <= self.text_len)).all())
        )
        if not consistent:
            raise ValueError(f"{path}: inconsistent cache ({n} prompts, lengths {tuple(self.lengths.shape)}, "
                             f"{tensors['embeddings'].shape[0]} embedding rows)")  # fmt: skip
        for i, (prompt, h) in enumerate(zip(self.prompts, self.hashes)):
            if prompt_hash(prompt) != h:
                raise ValueError(f"{path}: row {i}: stored hash does not match its prompt {prompt[:60]!r} "
                                 "(edited or corrupt cache); re-run `idgrpo encode-prompts`")  # fmt: skip
        if bytes(tensors["negative.hash"][0].tolist()) != prompt_hash(self.negative_prompt):
            raise ValueError(f"{path}: negative prompt hash mismatch (edited or corrupt cache)")
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])
        self.embeddings = tensors["embeddings"].to(device=device, dtype=dtype)
        self.negative_embedding = tensors["negative.embedding"].to(device=device, dtype=dtype)
        self.negative_truncated = bool(tensors["negative.truncated"][0])
        self._index = {h: i for i, h in enumerate(self.hashes)}

    def __len__(self) -> int:
        return len(self.prompts)

    def row(self, i: int) -> torch.Tensor:
        """The valid rows (length, dim) of entry i."""
        return self.embeddings[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def _padded(self, rows: list[torch.Tensor]) -> torch.Tensor:
        out = self.embeddings.new_zeros(len(rows), self.text_len, self.dim)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return out

    def rows(self, indices) -> torch.Tensor:
        """(B, text_len, dim) contexts of the given row indices (input-file order)."""
        return self._padded([self.row(int(i)) for i in indices])

    def lookup(self, prompts: list[str]) -> torch.Tensor:
        """(B, text_len, dim) contexts of the given prompt texts."""
        rows = []
        for b, p in enumerate(prompts):
            i = self._index.get(prompt_hash(p))
            if i is None:
                raise KeyError(f"{self.path}: prompt {b} of the request is not cached: {p[:80]!r}; "
                               "re-run `idgrpo encode-prompts` with it")  # fmt: skip
            rows.append(self.row(i))
        return self._padded(rows)

    def negative(self, batch_size: int = 1) -> torch.Tensor:
        """(batch_size, text_len, dim) negative-prompt context."""
        return self._padded([self.negative_embedding]).expand(batch_size, -1, -1)

    def verify(self, prompts: list[str]):
        """Raise unless this cache holds exactly `prompts`, row for row (for index-based readers)."""
        if len(prompts) != len(self.prompts):
            raise ValueError(f"{self.path}: cache has {len(self.prompts)} prompts, the dataset {len(prompts)}")
        for i, p in enumerate(prompts):
            if prompt_hash(p) != self.hashes[i]:
                raise ValueError(f"{self.path}: row {i}: cached prompt {self.prompts[i][:60]!r} != dataset "
                                 f"prompt {p[:60]!r}; re-run `idgrpo encode-prompts`")  # fmt: skip
