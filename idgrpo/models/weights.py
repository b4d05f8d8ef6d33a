"""Wan DiT checkpoints: read the diffusers and the original Wan2.1 layouts, write the diffusers one.

Layouts read (docs/models.md#dit-checkpoint-layouts, covering VACE and Phantom too):
- diffusers: `config.json` (`_class_name` WanTransformer3DModel / WanVACETransformer3DModel) and
  `diffusion_pytorch_model.safetensors`, or shards + `diffusion_pytorch_model.safetensors.index.json`;
  a pipeline root (`model_index.json` beside a `transformer/` folder) works too;
- original Wan2.1 / VACE: `config.json` (`_class_name` WanModel / VaceWanModel) and one or several
  safetensors files (with or without an index), or a single `.pth` state dict (Phantom-Wan-1.3B.pth),
  read with `torch.load(weights_only=True)`.
The key format is detected from the keys themselves, so an original checkpoint in diffusers-style
file names loads too. Tensors are read lazily, one at a time.

    model = load_wan_dit("Wan2.1-VACE-1.3B-diffusers/transformer", dtype=torch.bfloat16, device="cuda")
    model = load_wan_dit("Phantom-Wan-1.3B.pth", config="phantom-1.3b")
    save_diffusers(model, "out/transformer")

The model is built on the meta device and each parameter is materialised once, straight in the
target dtype and device. Missing, unexpected or mis-shaped keys raise one `CheckpointError` that
lists all of them.

The file handling here serves every loader (this DiT, `WanVAE.from_pretrained`,
`UMT5Encoder.from_pretrained`; docs/data-and-checkpoints.md): `locate` accepts a weights file, the
model's own folder or a diffusers pipeline root; `WeightFiles` reads safetensors (sharded or not) and
weights-only pickles lazily; `default_dtype` is the one rule for `dtype=None`; and every unreadable file
(empty or truncated safetensors, invalid config.json or index, a pickle that is not plain tensors)
raises `CheckpointError` naming it, as does a tensor holding a NaN/Inf (`refuse_nonfinite`, which
loaders that read files themselves call too).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

from idgrpo.engine.optim import NonFiniteError, nonfinite_summary
from idgrpo.errors import CheckpointError
from idgrpo.models.wan_dit import WanConfig, WanDiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_VERSION = "0.35.0"  # the version Identity-GRPO pins; written into saved configs
T = TypeVar("T")


# ------------------------------------------- key renames (docs/models.md#dit-checkpoint-layouts)

# Top-level prefixes: original -> diffusers.
_TOP_LEVEL = {
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
}
# Inside `blocks.{i}.` / `vace_blocks.{j}.`: original -> diffusers. norm2 <-> norm3 swap
# (docs/models.md#pitfall-norm2-and-norm3-swap-names);
# the original `norm2` is non-affine and has no tensor, listed for the inverse map.
_IN_BLOCK = {
    "self_attn.q.": "attn1.to_q.", "self_attn.k.": "attn1.to_k.", "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.", "self_attn.norm_q.": "attn1.norm_q.", "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.", "cross_attn.k.": "attn2.to_k.", "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.", "cross_attn.norm_q.": "attn2.norm_q.", "cross_attn.norm_k.": "attn2.norm_k.",
    "norm3.": "norm2.", "norm2.": "norm3.",
    "ffn.0.": "ffn.net.0.proj.", "ffn.2.": "ffn.net.2.",
    "before_proj.": "proj_in.", "after_proj.": "proj_out.",
}
_BLOCK_KEY = re.compile(r"^((?:vace_)?blocks\.\d+\.)(.*)$")


def _rename(key: str, top: dict[str, str], in_block: dict[str, str]) -> str:
    match = _BLOCK_KEY.match(key)
    if match:
        prefix, rest = match.groups()
        for old, new in in_block.items():
            if rest.startswith(old):
                return prefix + new + rest[len(old):]
        return key
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def original_to_diffusers_key(key: str) -> str:
    """`blocks.3.self_attn.q.weight` -> `blocks.3.attn1.to_q.weight`; unknown keys pass unchanged."""
    if key == "head.modulation":
        return "scale_shift_table"
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) == "modulation":
        return match.group(1) + "scale_shift_table"
    return _rename(key, _TOP_LEVEL, _IN_BLOCK)


_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_INV = {v: k for k, v in _IN_BLOCK.items()}


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key`."""
    if key == "scale_shift_table":
        return "head.modulation"
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) == "scale_shift_table":
        return match.group(1) + "modulation"
    return _rename(key, _TOP_LEVEL_INV, _IN_BLOCK_INV)


def detect_key_format(keys) -> str:
    """"diffusers" or "original", from the keys of a Wan DiT state dict."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("time_embedding.", "head.")) or ".self_attn." in k for k in keys):
        return "original"
    raise CheckpointError(f"not a Wan DiT state dict: none of its {len(keys)} keys look like one "
                          f"(first keys: {keys[:5]})")


# ----------------------------------------------------------------------------- configs


def config_from_dict(raw: dict) -> WanConfig:
    """WanConfig from a diffusers or an original Wan `config.json` (I2V models are refused)."""
    name = raw.get("_class_name", "")
    if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("model_type", "t2v") not in ("t2v", "t2v-A14B"):
        raise CheckpointError(f"config {name or raw}: image-to-video Wan models (image_dim / added_kv_proj_dim / "
                              "model_type i2v) are not supported")
    if "num_attention_heads" in raw:  # diffusers
        heads = raw["num_attention_heads"]
        fields = dict(dim=heads * raw["attention_head_dim"], num_heads=heads, ffn_dim=raw["ffn_dim"],
                      num_layers=raw["num_layers"], in_dim=raw.get("in_channels", 16),
                      out_dim=raw.get("out_channels") or raw.get("in_channels", 16),
                      text_dim=raw.get("text_dim", 4096), freq_dim=raw.get("freq_dim", 256),
                      patch_size=tuple(raw.get("patch_size", (1, 2, 2))), eps=raw.get("eps", 1e-6),
                      vace_layers=tuple(raw.get("vace_layers") or ()), vace_in_dim=raw.get("vace_in_channels", 96))
    elif "dim" in raw:  # original WanModel / VaceWanModel
        fields = dict(dim=raw["dim"], num_heads=raw["num_heads"], ffn_dim=raw["ffn_dim"], num_layers=raw["num_layers"],
                      in_dim=raw.get("in_dim", 16), out_dim=raw.get("out_dim", 16), text_dim=raw.get("text_dim", 4096),
                      text_len=raw.get("text_len", 512), freq_dim=raw.get("freq_dim", 256),
                      patch_size=tuple(raw.get("patch_size", (1, 2, 2))), eps=raw.get("eps", 1e-6),
                      vace_layers=tuple(raw.get("vace_layers") or ()), vace_in_dim=raw.get("vace_in_dim", 96))
    else:
        raise CheckpointError(f"config.json of class {name!r} is not a Wan DiT config (no dim / num_attention_heads)")
    fields["reference_mode"] = "vace" if fields["vace_layers"] else "none"
    return WanConfig(**fields)


def diffusers_config(config: WanConfig) -> dict:
    """The diffusers `config.json` content for a config."""
    out = {
        "_class_name": "WanVACETransformer3DModel" if config.vace_layers else "WanTransformer3DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "added_kv_proj_dim": None, "attention_head_dim": config.head_dim, "cross_attn_norm": True,
        "eps": config.eps, "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim, "image_dim": None,
        "in_channels": config.in_dim, "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
        "out_channels": config.out_dim, "patch_size": list(config.patch_size), "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": config.text_dim,
    }
    if config.vace_layers:
        out.update(vace_layers=list(config.vace_layers), vace_in_channels=config.vace_in_dim)
    return out


def original_config(config: WanConfig) -> dict:
    """The original Wan2.1 `config.json` content for a config."""
    out = {"_class_name": "VaceWanModel" if config.vace_layers else "WanModel", "dim": config.dim,
           "eps": config.eps, "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim, "in_dim": config.in_dim,
           "model_type": "t2v", "num_heads": config.num_heads, "num_layers": config.num_layers,
           "out_dim": config.out_dim, "text_len": config.text_len, "text_dim": config.text_dim,
           "patch_size": list(config.patch_size)}
    if config.vace_layers:
        out.update(vace_layers=list(config.vace_layers), vace_in_dim=config.vace_in_dim)
    return out


# ----------------------------------------------------------------------------- files (every loader)

PIPELINE_INDEX = "model_index.json"
_STANDARD_STEMS = ("diffusion_pytorch_model", "model")  # diffusers', transformers' weight file names
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DEFAULT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def read_config(file: Path) -> dict:
    """A `config.json` (or index) as a dict; CheckpointError naming the file when it is not a JSON object."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model folder: the diffusers or transformers file (or its shards, via the index)
    first, then any one index, any *.safetensors, or a single .pth / .pt / .bin; [] when there is none."""
    for stem in _STANDARD_STEMS:
        if (directory / f"{stem}.safetensors.index.json").is_file():
            return _indexed_files(directory / f"{stem}.safetensors.index.json")
        if (directory / f"{stem}.safetensors").is_file():
            return [directory / f"{stem}.safetensors"]
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        return _indexed_files(index[0])
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted([*directory.glob("*.pth"), *directory.glob("*.pt"), *directory.glob("*.bin")])
    return pickles[:1] if len(pickles) == 1 else []


def _indexed_files(index: Path) -> list[Path]:
    weight_map = read_config(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' (tensor name -> shard file) in this index")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} shard(s) it lists are not in {index.parent}: {missing[:5]}")
    return files


@dataclass
class WeightSource:
    """Where one model's weights are: `path` (the folder or file used), its weight `files`, and `config`, the
    parsed `config.json` (None when there is none, or when a single file's neighbour belongs to another model)."""

    path: Path
    files: list[Path]
    config: dict | None
    config_file: Path

    def parse_config(self, parse: Callable[[dict], T]) -> T:
        """`parse(self.config)`, with any error in it reported against the config file."""
        try:
            return parse(self.config)
        except KeyError as e:
            raise CheckpointError(f"{self.config_file}: missing field {e}") from e
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.config_file}: {e}") from e


def locate(path: str | Path, subfolder: str, *, what: str, is_config: Callable[[dict], bool],
           own_file: str | None = None) -> WeightSource:
    """Resolve a loader's `path`: a weights file, the model's own folder, a diffusers pipeline root (a
    `model_index.json`, or no weights of its own beside a `subfolder`/ folder), which means its `subfolder`, or
    an original Wan2.1 folder, which means the one file matching the glob `own_file` (`Wan2.1_VAE.pth` beside
    the DiT). `is_config` tells this model's config.json from another model's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} weights not found")
    pipeline_root = path.is_dir() and (
        (path / PIPELINE_INDEX).is_file() or (not weight_files(path) and (path / subfolder).is_dir()))
    if pipeline_root:
        if not (path / subfolder).is_dir():
            raise CheckpointError(f"{path}: a diffusers pipeline root ({PIPELINE_INDEX}) without a {subfolder}/ folder")
        path = path / subfolder
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    config = read_config(config_file) if config_file.is_file() else None
    foreign = config is not None and not is_config(config)
    if path.is_dir() and (config is None or foreign) and own_file:
        own = sorted(path.glob(own_file))
        if len(own) == 1:
            path = own[0]
    if foreign:
        if path.is_dir():
            kind = config.get("_class_name") or config.get("model_type") or sorted(config)[:6]
            raise CheckpointError(f"{config_file}: not a {what} config ({kind}); pass the {what} weights file or "
                                  f"its own folder")
        config = None
    files = weight_files(path) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"{path}: no {what} weights found (expected {{diffusion_pytorch_model,model}}"
                              ".safetensors, shards with a *.safetensors.index.json, or one .pth)")
    return WeightSource(path, files, config, config_file)


def default_dtype(dtypes) -> torch.dtype:
    """The dtype a loader uses when none is asked for: the checkpoint's own floating dtype when all its floating
    tensors share one of float32 / bfloat16 / float16, otherwise float32 (docs/data-and-checkpoints.md)."""
    floats = {d for d in dtypes if d.is_floating_point}
    return floats.pop() if len(floats) == 1 and next(iter(floats)) in _DEFAULT_DTYPES else torch.float32


def refuse_nonfinite(file: str | Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as it is, or a CheckpointError naming `file` and `key` when it holds a NaN/Inf: a model whose
    weights diverged is refused where it is loaded, not found out by the NaN outputs it gives later."""
    problem = nonfinite_summary(tensor)
    if problem:
        raise CheckpointError(f"{file}: tensor {key!r} holds non-finite values ({problem}); weights with NaN/Inf are "
                              "not loaded")
    return tensor


@contextlib.contextmanager
def _open_safetensors(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as e:  # empty, truncated or corrupt: safetensors' message names no file
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is damaged or incomplete, "
                              "download or save it again") from e


def _list_tensors(file: Path, pth_cache: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    if file.suffix == ".safetensors":
        with _open_safetensors(file) as f:
            out = []
            for key in f.keys():
                info = f.get_slice(key)
                if info.get_dtype() not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {key!r} has dtype {info.get_dtype()}, which idgrpo does "
                                          "not load")
                out.append((key, tuple(info.get_shape()), _SAFETENSORS_DTYPES[info.get_dtype()]))
            return out
    if file.suffix in (".pth", ".pt", ".bin"):
        # Pickles are never executed: tensors and containers only. mmap needs the zip format (torch >= 1.6).
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise CheckpointError(f"{file}: cannot read as a weights-only torch state dict ({e})") from e
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{file}: cannot read as a weights-only torch state dict ({e})") from e
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, dict) and set(state) == {wrapper}:
                state = state[wrapper]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a flat state dict of tensors")
        pth_cache[file] = state
        return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    raise CheckpointError(f"{file}: unknown weight file type {file.suffix!r} (use .safetensors or .pth)")


class WeightFiles(Mapping):
    """Lazy read-only mapping name -> tensor over the weight files of one model: a tensor is read from disk
    when indexed (so `fsdp.load_full_state_dict(...)` streams), `.shape(key)` and `.dtype(key)` read none.
    `rename(fn)` exposes the tensors under other names (a key format's renames)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, str]] = {}  # name -> (file, key in the file)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._pth: dict[Path, dict] = {}
        for file in files:
            for key, shape, dtype in _list_tensors(file, self._pth):
                self._add(key, (file, key), shape, dtype)

    def _add(self, name, where, shape, dtype):
        if name in self._where:
            raise CheckpointError(f"tensor {name!r} appears twice ({self._where[name][0]}, {where[0]})")
        self._where[name], self._shapes[name], self._dtypes[name] = where, shape, dtype

    def rename(self, fn: Callable[[str], str]) -> None:
        old = [(fn(name), self._where[name], self._shapes[name], self._dtypes[name]) for name in self._where]
        self._where, self._shapes, self._dtypes = {}, {}, {}
        for entry in old:
            self._add(*entry)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def default_dtype(self) -> torch.dtype:
        return default_dtype(self._dtypes.values())

    def get(self, key: str, default=None) -> torch.Tensor:
        if key not in self._where:
            return default
        file, raw = self._where[key]
        if file in self._pth:
            return refuse_nonfinite(file, raw, self._pth[file][raw])
        with _open_safetensors(file) as f:
            return refuse_nonfinite(file, raw, f.get_tensor(raw))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name, (file, _) in self._where.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if file in self._pth:
                for name in names:
                    raw = self._where[name][1]
                    yield name, refuse_nonfinite(file, raw, self._pth[file][raw])
                continue
            with _open_safetensors(file) as f:
                for name in names:
                    raw = self._where[name][1]
                    yield name, refuse_nonfinite(file, raw, f.get_tensor(raw))


# ----------------------------------------------------------------------------- the DiT checkpoint

_DIT_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanModel", "VaceWanModel")


def is_dit_config(raw: dict) -> bool:
    name = raw.get("_class_name")
    return name in _DIT_CLASSES if name else "num_attention_heads" in raw or "dim" in raw


class Checkpoint(WeightFiles):
    """Lazy read-only mapping diffusers key -> tensor over a Wan DiT checkpoint (`WeightFiles`).

    `path`: a directory (diffusers or original layout, or a pipeline root with `transformer/`), or a
    single `.safetensors` / `.pth` / `.pt` / `.bin` file. `.config` is the parsed `config.json`
    (None when there is none); `.key_format` is "diffusers" or "original".
    """

    def __init__(self, path: str | Path):
        self.source = locate(path, "transformer", what="Wan DiT", is_config=is_dit_config)
        self.path, self.config = self.source.path, self.source.config
        super().__init__(self.source.files)
        try:
            self.key_format = detect_key_format(self)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from e
        if self.key_format == "original":
            self.rename(original_to_diffusers_key)

    def wan_config(self) -> WanConfig:
        if self.config is None:
            raise CheckpointError(f"{self.path}: no config.json beside the weights; pass config= (a WanConfig or a "
                                  f"preset name such as 'phantom-1.3b')")
        return self.source.parse_config(config_from_dict)


# ----------------------------------------------------------------------------- checking and loading


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], *, source: str,
               target: str, hint: str = "") -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return

    def listing(title, keys, detail=lambda k: "", limit=60):
        if not keys:
            return []
        grouped = _group_block_keys(keys, detail)
        shown = [f"    {g}" for g in grouped[:limit]]
        more = [f"    ... and {len(grouped) - limit} more"] if len(grouped) > limit else []
        return [f"  {len(keys)} {title}:", *shown, *more]

    lines = [f"{source} does not fit {target}:"]
    lines += listing("missing keys (in the model, not in the checkpoint)", missing)
    lines += listing("unexpected keys (in the checkpoint, not in the model)", unexpected)
    lines += listing("mis-shaped keys", misshaped,
                     lambda k: f": checkpoint {tuple(found[k])} vs model {tuple(expected[k])}")
    if hint:
        lines.append(f"  hint: {hint}")
    raise CheckpointError("\n".join(lines))


def _group_block_keys(keys: list[str], detail) -> list[str]:
    """`blocks.2.attn1.to_q.weight`, `blocks.3.attn1.to_q.weight` -> `blocks.{2,3}.attn1.to_q.weight`,
    so that a whole-block mismatch reads in a few lines."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for key in keys:
        match = re.match(r"^((?:vace_)?blocks)\.(\d+)\.(.*)$", key)
        if match:
            groups.setdefault((match.group(1), match.group(3), detail(key)), []).append(int(match.group(2)))
        else:
            groups.setdefault((key, "", detail(key)), [])
    lines = []
    for (head, rest, info), indices in groups.items():
        if not indices:
            lines.append(head + info)
            continue
        ids = _ranges(sorted(indices))
        lines.append(f"{head}.{ids if len(indices) == 1 else '{' + ids + '}'}.{rest}{info}")
    return sorted(lines)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _mismatch_hint(config: WanConfig, found: dict[str, tuple[int, ...]]) -> str:
    has_vace = any(k.startswith("vace_") for k in found)
    if has_vace and not config.vace_layers:
        return "the checkpoint has VACE blocks but the config has no vace_layers (use a vace-* config)"
    if config.vace_layers and not has_vace:
        return "the config has vace_layers but the checkpoint is a plain T2V model (use a t2v-* config)"
    dim = found.get("patch_embedding.weight", (None,))[0]
    if dim is not None and dim != config.dim:
        return f"the checkpoint's width is {dim}, the config's {config.dim} (1.3B = 1536, 14B = 5120)"
    return ""


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Persistent tensors of a model (meta or real) and their shapes; LoRA tensors are not part of
    a base checkpoint."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" not in k}


def materialize_(model: nn.Module, tensors, *, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
    """Replace the model's parameters (possibly on the meta device) by `tensors` (an iterable of
    (name, tensor)), each copied once into `dtype` (None: keep its own) on `device`. Parameters not
    given stay as they are."""
    params = dict(model.named_parameters())
    for name, tensor in tensors:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = params[name]
        value = tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None,
                          copy=True)
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    return model


def load_wan_dit(path: str | Path, config: WanConfig | str | None = None, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", ignore_unexpected: bool = False) -> WanDiT:
    """Build a WanDiT on the meta device and fill it from a checkpoint, each tensor materialised once in
    `dtype` (None: the checkpoint's own, see `default_dtype`) on `device`. `config`: a WanConfig, a preset
    name, or None to read `config.json`. `ignore_unexpected`: skip checkpoint tensors the model does not have
    (the reference Phantom loader uses strict=False); missing or mis-shaped tensors are always an error."""
    checkpoint = Checkpoint(path)
    if dtype is None:
        dtype = checkpoint.default_dtype()
    if config is None:
        config = checkpoint.wan_config()
    elif isinstance(config, str):
        config = WanConfig.from_name(config)
    with torch.device("meta"):
        model = WanDiT(config)
    found = {k: checkpoint.shape(k) for k in checkpoint.keys()}
    # Note: diffusers ignores a stray `norm_added_q` in some Wan checkpoints; so do we.
    found = {k: s for k, s in found.items() if "norm_added_q" not in k}
    expected = expected_shapes(model)
    if ignore_unexpected:
        found = {k: s for k, s in found.items() if k in expected}
    target = (f"WanDiT(dim={config.dim}, num_layers={config.num_layers}, vace_layers={len(config.vace_layers)} "
              f"blocks)")
    check_keys(expected, found, source=f"checkpoint {checkpoint.path} ({checkpoint.key_format} "
               f"keys, {len(found)} tensors)", target=target, hint=_mismatch_hint(config, found))
    materialize_(model, ((k, t) for k, t in checkpoint.items() if k in found), dtype=dtype, device=device)
    return model


def load_state_dict_into(model: WanDiT, path: str | Path) -> None:
    """Copy a checkpoint into an existing (real, possibly LoRA-wrapped) model, with the same checks."""
    checkpoint = Checkpoint(path)
    found = {k: checkpoint.shape(k) for k in checkpoint.keys() if "norm_added_q" not in k}
    check_keys(expected_shapes(model), found, source=f"checkpoint {checkpoint.path}", target="the model",
               hint=_mismatch_hint(model.config, found))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint.items():
            if name in params:
                params[name].copy_(tensor)


# ----------------------------------------------------------------------------- writing


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under diffusers names, without LoRA adapters (merge them first to keep them)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


def save_diffusers(model: WanDiT, directory: str | Path, *, max_shard_bytes: int = 5 * 1024**3,
                   dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` (or shards + index) in the diffusers
    layout, loadable by diffusers' `from_pretrained` and by `load_wan_dit`; each file whole or not at all, and
    none when a weight holds a NaN/Inf (NonFiniteError)."""
    from idgrpo.engine.checkpoint import save_safetensors_atomic, write_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in base_state_dict(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for key, tensor in state.items():  # before any file is written
        problem = nonfinite_summary(tensor)
        if problem:
            raise NonFiniteError(f"{directory}: not written: tensor {key!r} holds non-finite values ({problem})")
    write_atomic(directory / "config.json", json.dumps(diffusers_config(model.config), indent=2) + "\n")
    if len(shards) == 1:
        save_safetensors_atomic(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors_atomic(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_atomic(directory / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    return directory


def to_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors -> original Wan2.1 names."""
    return {diffusers_to_original_key(k): v for k, v in state.items()}


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.1-named tensors -> diffusers names."""
    return {original_to_diffusers_key(k): v for k, v in state.items()}


__all__ = [
    "Checkpoint", "CheckpointError", "WeightFiles", "WeightSource", "base_state_dict", "check_keys",
    "config_from_dict", "default_dtype", "detect_key_format", "diffusers_config", "diffusers_to_original_key",
    "expected_shapes", "is_dit_config", "load_state_dict_into", "load_wan_dit", "locate", "materialize_",
    "original_config", "original_to_diffusers_key", "read_config", "refuse_nonfinite", "save_diffusers",
    "to_diffusers_state_dict",
    "to_original_state_dict", "weight_files",
]
