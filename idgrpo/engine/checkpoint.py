"""Crash-safe sharded checkpoints, resharding on load, and full / LoRA weight export.

Layout of one checkpoint (`<directory>/step_00000300/`):
    index.json                 step, world size, config, extra, optimizer hyper-parameters and
                               the per-group, per-parameter (name, shape, offset) tables
    rank_00000.safetensors     this rank's fp32 master shards and optimizer-state shards
    rank_00001.safetensors     (replicated groups and scalar optimizer state: rank 0's file only)
                               + each rank's RNG state

Note [crash safety]: every rank writes its file into `.tmp_step_XXXXXXXX/` (file written as
`.partial`, fsynced, renamed); after a barrier rank 0 writes the index the same way and only
then renames the directory to `step_XXXXXXXX` (an atomic rename on POSIX). A crash at any
point leaves at most a `.tmp_*` directory, which loading ignores and the next save removes,
so the newest `step_*` directory is always complete.

Note [resharding]: a checkpoint is read by parameter name, not by shard. Each saved group is
reassembled from its shards in the saved world size's layout, cut into parameters with the
index's table, and written into the current model's groups, whatever their world size or
grouping. Only this rank's slice is kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from idgrpo.engine.fsdp import FSDP, FlatGroup

FORMAT = "idgrpo-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RESTORED_HYPERPARAMETERS = {"lr", "initial_lr", "betas", "eps", "weight_decay", "step"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)


def _json_default(obj):
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"checkpoint config/extra must be JSON-serialisable; got {type(obj).__name__}: {obj!r}")


# ---------------------------------------------------------------------------------------------- reading
def check_safetensors_file(path: Path) -> None:
    """Raise a CheckpointError naming `path` unless it looks like a complete safetensors file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    # Note: a safetensors file is an 8-byte little-endian header length followed by a JSON header,
    # so byte 8 is "{". Decide on that first: a length whose low byte is 0x80 is a valid header
    # size, so the first byte alone cannot tell a safetensors file from a pickle.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: this is a pickle / torch.save file, not safetensors; it was not unpickled "
                              "(pickles can run code). Convert it with torch.load(weights_only=True) + save_file.")
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated file ({len(head)} bytes; a safetensors header needs 8)")
    if header_len > size - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header claims {header_len} bytes, "
                              f"file has {size})")
    if not looks_safetensors:
        raise CheckpointError(f"{path}: not a safetensors file (no JSON header after the 8-byte length)")


class _RankFile:
    """Lazy, validated reads from one rank's safetensors file."""

    def __init__(self, path: Path):
        check_safetensors_file(path)
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self.keys = set(self._f.keys())
            self.metadata = self._f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from e

    def get(self, key: str, *, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.keys:
            raise CheckpointError(f"{self.path}: missing key {key!r}")
        try:
            t = self._f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: key {key!r} cannot be read (truncated file?): {e}") from e
        if t.dtype != dtype:
            raise CheckpointError(f"{self.path}: key {key!r} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: key {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t


# ---------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Save / resume an FSDP model and its optimizer (see the module docstring).

    Args:
        directory: where `step_XXXXXXXX/` checkpoints live (shared by every rank).
        keep: how many of the newest checkpoints to keep (older ones are deleted after a save).
        config: any JSON-serialisable object (a config dataclass) recorded in each index.
        include_frozen: also save frozen groups (not needed to resume; they come from the base model).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, config=None, include_frozen: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.config = config
        self.include_frozen = include_frozen

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "index.json").is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: FSDP, optimizer: torch.optim.Optimizer | None = None,
             extra: dict | None = None) -> Path:
        """Write checkpoint `step` (a collective: every rank calls it). Returns its directory."""
        if not isinstance(model, FSDP):
            raise TypeError(f"Checkpointer.save expects an FSDP-wrapped model, got {type(model).__name__}")
        rank, world_size = _rank_world()
        name = f"step_{step:08d}"
        final, tmp = self.directory / name, self.directory / f".tmp_{name}"
        extra_json = json.dumps(extra or {}, default=_json_default)  # fail before writing anything
        config_json = json.dumps(self.config, default=_json_default)
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()

        tensors, opt_names = self._rank_tensors(model, optimizer, rank)
        metadata = {"format": FORMAT, "rank": str(rank), "world_size": str(world_size), "step": str(step),
                    "python_random": json.dumps(random.getstate())}
        _write_atomic_file(tmp / f"rank_{rank:05d}.safetensors",
                           lambda p: save_file(tensors, str(p), metadata=metadata))
        _barrier()  # every rank file is complete before the index makes the checkpoint real

        if rank == 0:
            index = {
                "format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "config": json.loads(config_json), "extra": json.loads(extra_json),
                "files": [f"rank_{r:05d}.safetensors" for r in range(world_size)],
                "groups": {g.key: {"trainable": g.trainable, "replicated": g.replicated, "numel": g.numel,
                                   "padded": g.padded, "shard_numel": g.shard_numel,
                                   "dtype": str(g.master.dtype).removeprefix("torch."),
                                   "optimizer_state": opt_names.get(g.key, {}), "params": g.table()}
                           for g in self._saved_groups(model)},
                "optimizer": None if optimizer is None else {
                    "class": type(optimizer).__name__,
                    "param_groups": [{k: v for k, v in pg.items() if k != "params"} for pg in optimizer.param_groups],
                },
            }
            _write_atomic_file(tmp / "index.json",
                               lambda p: p.write_text(json.dumps(index, indent=1, default=_json_default)))
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        _barrier()
        return final

    def _saved_groups(self, model: FSDP) -> list[FlatGroup]:
        return [g for g in model.groups if g.trainable or self.include_frozen]

    def _rank_tensors(self, model: FSDP, optimizer, rank: int):
        tensors: dict[str, torch.Tensor] = {}
        opt_names: dict[str, dict[str, str]] = {}  # group key -> state name -> "shard" | "scalar"
        for g in self._saved_groups(model):
            if g.replicated and rank != 0:
                continue
            tensors[f"{g.key}::master"] = g.master.detach().cpu()
            state = optimizer.state.get(g.master, {}) if optimizer is not None else {}
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if v.shape == g.master.shape:
                    kind = "shard"
                elif v.numel() == 1:
                    kind = "scalar"
                    if rank != 0 and not g.replicated:
                        continue
                else:
                    raise ValueError(f"optimizer state {k!r} of group {g.key} has unsupported shape {list(v.shape)}")
                opt_names.setdefault(g.key, {})[k] = kind
                tensors[f"{g.key}::opt::{k}"] = v.detach().cpu().float().reshape(v.shape if kind == "shard" else (1,))
        tensors["rng::torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng::cuda"] = torch.cuda.get_rng_state()
        return tensors, opt_names

    def _prune(self) -> None:
        for _, path in self.checkpoints()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for p in self.directory.glob(".tmp_step_*"):  # leftovers of crashed saves
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load_latest(self, model: FSDP, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, dict] | None:
        """Load the newest complete checkpoint; None when there is none. Returns (step, extra)."""
        path = self.latest()
        if path is None:
            return None
        return self.load(path, model, optimizer)

    def load(self, path: str | Path, model: FSDP, optimizer: torch.optim.Optimizer | None = None
             ) -> tuple[int, dict]:
        """Load checkpoint directory `path` into `model` (and `optimizer`) at any world size."""
        path = Path(path)
        rank, world_size = _rank_world()
        index_path = path / "index.json"
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: missing (not a complete checkpoint)")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path}: not valid JSON (truncated?): {e}") from e
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{index_path}: not an {FORMAT} index (format={index.get('format')!r})")

        # Every parameter the model needs, by name, against the index's tables.
        wanted = {n: (g, i) for g in self._saved_groups(model) for i, n in enumerate(g.names)}
        saved = {row["name"]: (key, row) for key, info in index["groups"].items() for row in info["params"]}
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise CheckpointError(f"{index_path}: missing key {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(n for n in set(saved) - set(wanted) if index["groups"][saved[n][0]]["trainable"])
        if unexpected:
            raise CheckpointError(f"{index_path}: unexpected key {unexpected[0]!r} (not a trainable parameter of "
                                  "the model)" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        for n, (g, i) in wanted.items():
            shape = list(saved[n][1]["shape"])
            if shape != list(g.shapes[i]):
                raise CheckpointError(f"{index_path}: key {n!r} has shape {shape}, the model expects "
                                      f"{list(g.shapes[i])}")

        files = [_RankFile(path / f) for f in index["files"]]
        full_params: dict[str, torch.Tensor] = {}
        full_states: dict[str, dict[str, torch.Tensor]] = {}
        scalar_states: dict[str, dict[str, torch.Tensor]] = {}
        for key, info in index["groups"].items():
            if not any(row["name"] in wanted for row in info["params"]):
                continue
            dtype = getattr(torch, info["dtype"])
            flat = self._read_flat(files, key, "master", info, dtype)
            states = {}
            for state_name, kind in info["optimizer_state"].items():
                k = f"{key}::opt::{state_name}"
                if kind == "shard":
                    states[state_name] = self._read_flat(files, key, f"opt::{state_name}", info, torch.float32)
                else:
                    scalar = files[0].get(k, dtype=torch.float32, shape=(1,))
                    for row in info["params"]:
                        scalar_states.setdefault(row["name"], {})[state_name] = scalar
            for row in info["params"]:
                o, shape = row["offset"], row["shape"]
                numel = int(torch.Size(shape).numel())
                full_params[row["name"]] = flat[o:o + numel].view(shape)
                full_states[row["name"]] = {s: t[o:o + numel].view(shape) for s, t in states.items()}

        opt_groups = index.get("optimizer") or {}
        with torch.no_grad():
            for g in self._saved_groups(model):
                g.master.copy_(self._assemble(g, full_params, g.master.dtype))
                if optimizer is None or not opt_groups:
                    continue
                state_names = set()
                for n in g.names:
                    state_names |= set(full_states.get(n, {}))
                state = optimizer.state[g.master]
                for s in sorted(state_names):
                    shard = self._assemble(g, {n: full_states[n][s] for n in g.names}, torch.float32)
                    if s in state and isinstance(state[s], torch.Tensor):
                        state[s].copy_(shard)
                    else:
                        state[s] = shard.to(g.master.device)
                scalars = scalar_states.get(g.names[0], {})
                for s, v in scalars.items():
                    if s in state and isinstance(state[s], torch.Tensor):
                        state[s].copy_(v.reshape(state[s].shape))
                    else:
                        pg = next(pg for pg in optimizer.param_groups if any(p is g.master for p in pg["params"]))
                        on_device = pg.get("fused") or pg.get("capturable")
                        state[s] = v.reshape(()).to(g.master.device if on_device else "cpu")
        if optimizer is not None and opt_groups:
            saved_pgs = opt_groups.get("param_groups", [])
            if len(saved_pgs) != len(optimizer.param_groups):
                raise CheckpointError(f"{index_path}: optimizer has {len(saved_pgs)} param groups saved, "
                                      f"{len(optimizer.param_groups)} now")
            for pg, saved_pg in zip(optimizer.param_groups, saved_pgs):
                for k, v in saved_pg.items():  # hyper-parameters a schedule may have changed; not impl. flags
                    if k in _RESTORED_HYPERPARAMETERS and k in pg and not isinstance(pg[k], torch.Tensor):
                        pg[k] = tuple(v) if isinstance(pg[k], tuple) else v

        if index["world_size"] == world_size:
            own = files[rank]
            rng = own.get("rng::torch_cpu", dtype=torch.uint8, shape=tuple(torch.get_rng_state().shape))
            torch.set_rng_state(rng)
            if torch.cuda.is_available() and "rng::cuda" in own.keys:
                torch.cuda.set_rng_state(own._f.get_tensor("rng::cuda"))
            state = json.loads(own.metadata.get("python_random", "null"))
            if state is not None:
                random.setstate((state[0], tuple(state[1]), state[2]))
        return index["step"], index.get("extra", {})

    def _read_flat(self, files: list[_RankFile], key: str, what: str, info: dict, dtype) -> torch.Tensor:
        """A saved group's whole flat tensor (padded layout of the saving world size)."""
        tensor_key = f"{key}::{what}"
        if info["replicated"]:
            return files[0].get(tensor_key, dtype=dtype, shape=(info["shard_numel"],))
        shards = [f.get(tensor_key, dtype=dtype, shape=(info["shard_numel"],)) for f in files]
        return torch.cat(shards)

    @staticmethod
    def _assemble(g: FlatGroup, by_name: dict[str, torch.Tensor], dtype) -> torch.Tensor:
        """This rank's shard of group `g`, cut from whole tensors by name."""
        lo, hi = g.shard_offset, g.shard_offset + g.shard_numel
        shard = torch.zeros(g.shard_numel, dtype=dtype)
        for n, o, k in zip(g.names, g.offsets, g.numels):
            a, b = max(o, lo), min(o + k, hi)
            if a < b:
                shard[a - lo:b - lo].copy_(by_name[n].reshape(-1)[a - o:b - o])
        return shard.to(g.master.device)


# ---------------------------------------------------------------------------------------------- export
def export_full_weights(model: FSDP, path: str | Path, *, dtype: torch.dtype | None = None,
                        key_map: Callable[[str], str] | None = None) -> Path | None:
    """Write every parameter, whole, as one safetensors file (name -> tensor, the layout
    diffusers' `save_pretrained` uses); `key_map` renames keys. A collective; rank 0 writes."""
    state = model.full_state_dict()
    rank, _ = _rank_world()
    if rank != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {(key_map(k) if key_map else k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    _write_atomic_file(path, lambda p: save_file(out, str(p), metadata={"format": "pt"}))
    return path


def _peft_key(name: str) -> str:
    # blocks.0.attn.q.lora_A.weight | blocks.0.attn.q.lora_A -> base_model.model.blocks.0.attn.q.lora_A.weight
    name = name.replace(".default", "")
    if not name.endswith(".weight") and not name.endswith(".bias"):
        name += ".weight"
    return "base_model.model." + name


def export_lora(model: FSDP, directory: str | Path, *, adapter_config: dict,
                name_filter: Callable[[str], bool] = lambda n: "lora_" in n,
                key_map: Callable[[str], str] = _peft_key, dtype: torch.dtype | None = None) -> Path | None:
    """Write the LoRA weights in PEFT's format: `adapter_model.safetensors` (keys
    `base_model.model.<module>.lora_A.weight` by default) + `adapter_config.json`
    (`adapter_config` must hold at least `r`, `lora_alpha` and `target_modules`). A collective."""
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in adapter_config:
            raise ValueError(f"adapter_config needs {field!r} (PEFT's LoraConfig field)")
    state = model.full_state_dict(trainable_only=True)
    rank, _ = _rank_world()
    if rank != 0:
        return None
    weights = {key_map(k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items() if name_filter(k)}
    if not weights:
        raise ValueError("export_lora: no trainable parameter matches name_filter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "fan_in_fan_out": False, "inference_mode": True, **adapter_config}
    _write_atomic_file(directory / "adapter_model.safetensors",
                       lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    _write_atomic_file(directory / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    return directory
