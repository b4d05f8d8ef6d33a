"""Crash-safe sharded checkpoints, resharding on load, and full / LoRA weight export.

Layout of one checkpoint (`<directory>/step_00000300/`):
    index.json                 step, world size, config, extra, optimizer hyper-parameters and
                               the per-group, per-parameter (name, shape, offset) tables
    rank_00000.safetensors     this rank's fp32 master shards and optimizer-state shards
    rank_00001.safetensors     (replicated groups and scalar optimizer state: rank 0's file only)
                               + each rank's RNG state

Note [crash safety]: every rank writes its file into `.tmp_step_XXXXXXXX/` (file written as
`.partial`, fsynced, renamed: `write_atomic`, which every file the engine writes goes through);
once every rank's file is written, rank 0 writes the index the same way and only then renames the
directory to `step_XXXXXXXX` (an atomic rename on POSIX). A crash at any point leaves at most a
`.tmp_*` directory, which loading ignores and the next save removes, so the newest `step_*`
directory is always complete. A rank whose write fails (a full disk) makes every rank raise, and
the previous checkpoint stays as it was.

Note [damaged checkpoints]: storage can still lose or corrupt a published file (a copy cut short,
a disk fault). `load_latest` then says which checkpoint is damaged and resumes from the newest
one that loads; pruning keeps `keep` (>= 2) checkpoints whose files look complete, so an older
intact one is always there. No tensor with a NaN/Inf is written (the save is refused, naming it)
or loaded (the checkpoint counts as damaged).

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
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from idgrpo.engine.dist import barrier, world
from idgrpo.engine.faults import fault_point
from idgrpo.engine.fsdp import FSDP, FlatGroup
from idgrpo.engine.optim import NonFiniteError, nonfinite_summary
from idgrpo.errors import CheckpointError

FORMAT = "idgrpo-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RESTORED_HYPERPARAMETERS = {"lr", "initial_lr", "betas", "eps", "weight_decay", "step"}


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are unreadable, cut short, inconsistent with its index or hold NaN/Inf (rather
    than one that does not fit the model): `load_latest` falls back to an older one."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (a collective that is also a barrier)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `path` so that it is either its old content or the whole new one, never a mix or a stub: `data`
    (bytes, text, or a function that writes the file it is given) goes to `<path>.partial`, which is fsynced and
    renamed over `path`. On an error (a full disk) the partial file is removed and the error raised."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        if callable(data):
            data(partial)
        else:
            partial.write_bytes(data.encode() if isinstance(data, str) else data)
        fault_point(f"write/{path.name}", torn=lambda: _cut_in_half(partial))
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except Exception:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_write_atomic_file = write_atomic  # the name idgrpo.models.lora imports


def _cut_in_half(path: Path) -> None:
    with open(path, "rb+") as f:
        f.truncate(path.stat().st_size // 2)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                            ) -> Path:
    """`safetensors.torch.save_file` through `write_atomic`, refused (NonFiniteError naming the file and the
    tensor, nothing written) when a tensor holds a NaN/Inf."""
    path = Path(path)
    for name, tensor in tensors.items():
        problem = nonfinite_summary(tensor)
        if problem:
            raise NonFiniteError(f"{path}: not written: tensor {name!r} holds non-finite values ({problem})")
    return write_atomic(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def _json_default(obj):
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"checkpoint config/extra must be JSON-serialisable; got {type(obj).__name__}: {obj!r}")


def _attempt(fn: Callable[[], object]) -> Exception | None:
    """Run `fn`; its exception, or None. (A save agrees across ranks before raising, so no rank is left waiting.)"""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - handed back to be raised on every rank
        return e
    return None


def _params_at(g: FlatGroup, positions: torch.Tensor) -> list[str]:
    """The names of the parameters of group `g` that cover these flat positions."""
    ends = torch.tensor([o + k for o, k in zip(g.offsets, g.numels)])
    hit = torch.bucketize(positions.cpu(), ends, right=True).unique()
    return [g.names[i] for i in hit.tolist() if i < len(g.names)] or [f"{g.key} (padding)"]


def _looks_complete(path: Path) -> bool:
    """An index that parses and every rank file it lists present at its full size (no tensor is read)."""
    try:
        files = json.loads((path / "index.json").read_text())["files"]
        for name in files:
            check_safetensors_file(path / name)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _refuse_loaded(tensor: torch.Tensor, file: _RankFile, what: str) -> None:
    problem = nonfinite_summary(tensor)
    if problem:
        raise CheckpointDamaged(f"{file.path}: {what} holds non-finite values ({problem}); a checkpoint with a "
                                "NaN/Inf is never loaded")


# ---------------------------------------------------------------------------------------------- reading
def check_safetensors_file(path: Path) -> None:
    """Raise a CheckpointError naming `path` unless it looks like a complete safetensors file."""
    if not path.is_file():
        raise CheckpointDamaged(f"{path}: file is missing")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    # Note: a safetensors file is an 8-byte little-endian header length followed by a JSON header,
    # so byte 8 is "{". Decide on that first: a length whose low byte is 0x80 is a valid header
    # size, so the first byte alone cannot tell a safetensors file from a pickle.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointDamaged(f"{path}: this is a pickle / torch.save file, not safetensors; it was not unpickled "
                                "(pickles can run code). Convert it with torch.load(weights_only=True) + save_file.")
    if len(head) < 8:
        raise CheckpointDamaged(f"{path}: truncated file ({len(head)} bytes; a safetensors header needs 8)")
    if header_len > size - 8:
        raise CheckpointDamaged(f"{path}: truncated or not a safetensors file (header claims {header_len} bytes, "
                                f"file has {size})")
    if not looks_safetensors:
        raise CheckpointDamaged(f"{path}: not a safetensors file (no JSON header after the 8-byte length)")
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(header_len)
    try:
        entries = json.loads(header)
        data_end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointDamaged(f"{path}: not a safetensors file (its JSON header does not parse: {e})") from e
    if 8 + header_len + data_end > size:
        raise CheckpointDamaged(f"{path}: truncated file (its header describes {8 + header_len + data_end} bytes, "
                                f"the file has {size})")


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
            raise CheckpointDamaged(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from e

    def get(self, key: str, *, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.keys:
            raise CheckpointDamaged(f"{self.path}: missing key {key!r}")
        try:
            t = self._f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointDamaged(f"{self.path}: key {key!r} cannot be read (truncated file?): {e}") from e
        if t.dtype != dtype:
            raise CheckpointDamaged(f"{self.path}: key {key!r} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointDamaged(f"{self.path}: key {key!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t


# ---------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Save / resume an FSDP model and its optimizer (see the module docstring).

    Args:
        directory: where `step_XXXXXXXX/` checkpoints live (shared by every rank).
        keep: how many of the newest checkpoints that look complete to keep (older ones are deleted after a
            save); at least 2, so that a damaged newest one has an older one to fall back on.
        config: any JSON-serialisable object (a config dataclass) recorded in each index.
        include_frozen: also save frozen groups (not needed to resume; they come from the base model).
        log: where the warning about a damaged checkpoint goes (default: stderr, rank 0).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, config=None, include_frozen: bool = False,
                 log: Callable[[str], None] | None = None):
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (the previous checkpoint is the fallback when the newest is found "
                             f"damaged), got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.config = config
        self.include_frozen = include_frozen
        self.log = log or (lambda message: print(f"idgrpo: {message}", file=sys.stderr, flush=True)
                           if world()[0] == 0 else None)
        self.loaded: Path | None = None
        """The checkpoint the last `load_latest` / `load` read."""

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
        """Write checkpoint `step` (a collective: every rank calls it). Returns its directory.

        Raises NonFiniteError, on every rank and before anything is written, when a weight or an optimizer state
        holds a NaN/Inf; a failed write (a full disk) raises on every rank and leaves the previous checkpoints as
        they were (Note [crash safety])."""
        if not isinstance(model, FSDP):
            raise TypeError(f"Checkpointer.save expects an FSDP-wrapped model, got {type(model).__name__}")
        rank, world_size = world()
        device = model.groups[0].master.device
        name = f"step_{step:08d}"
        final, tmp = self.directory / name, self.directory / f".tmp_{name}"
        extra_json = json.dumps(extra or {}, default=_json_default)  # fail before writing anything
        config_json = json.dumps(self.config, default=_json_default)
        tensors, opt_names = self._rank_tensors(model, optimizer, rank)
        self._refuse_nonfinite(model, tensors, name, device)
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()

        metadata = {"format": FORMAT, "rank": str(rank), "world_size": str(world_size), "step": str(step),
                    "python_random": json.dumps(random.getstate())}
        rank_file = tmp / f"rank_{rank:05d}.safetensors"
        error = _attempt(lambda: write_atomic(rank_file, lambda p: save_file(tensors, str(p), metadata=metadata)))
        # Every rank file is complete (or every rank raises) before the index makes the checkpoint real.
        if _any_rank(error is not None, device):
            raise error or CheckpointError(f"{tmp}: checkpoint {name} not written: another rank failed to write "
                                           "its file (its own error says why)")

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
            error = _attempt(lambda: self._publish(tmp, final, json.dumps(index, indent=1, default=_json_default)))
        if _any_rank(error is not None, device):
            raise error or CheckpointError(f"{tmp}: checkpoint {name} not published: rank 0 failed (its error says "
                                           "why)")
        return final

    def _publish(self, tmp: Path, final: Path, index_json: str) -> None:
        """Rank 0: the index, the rename that makes the checkpoint real, then the pruning."""
        write_atomic(tmp / "index.json", index_json)
        _fsync_dir(tmp)
        fault_point("checkpoint.publish")
        if final.exists():  # re-saving the same step (or replacing a damaged one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        fault_point("checkpoint.prune")
        self._prune()

    def _refuse_nonfinite(self, model: FSDP, tensors: dict[str, torch.Tensor], name: str, device) -> None:
        """NonFiniteError on every rank when any rank's tensors hold a NaN/Inf, naming the parameters."""
        groups = {g.key: g for g in model.groups}
        problems = []
        for key, tensor in tensors.items():
            group_key, _, what = key.partition("::")
            problem = nonfinite_summary(tensor) if group_key in groups else None
            if problem:
                g = groups[group_key]
                state = "master weights" if what == "master" else f"optimizer state {what.removeprefix('opt::')!r}"
                if tensor.numel() == g.shard_numel:
                    params = _params_at(g, (~torch.isfinite(tensor.reshape(-1))).nonzero().flatten() + g.shard_offset)
                else:  # a scalar optimizer state belongs to the whole group
                    params = g.names
                problems.append(f"{state} of {', '.join(params[:3])}{' ...' if len(params) > 3 else ''} "
                                f"({problem})")
        if not _any_rank(bool(problems), device):
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, problems)
            problems = [f"rank {r}: {p}" for r, found in enumerate(everyone) for p in found]
        raise NonFiniteError(f"{self.directory / name}: checkpoint not written: {'; '.join(problems[:5])}"
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                             + ". The previous checkpoints are kept as they were")

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
        """Keep the newest `keep` checkpoints whose files look complete (and anything newer); delete the rest."""
        intact = 0
        for _, path in reversed(self.checkpoints()):
            if intact >= self.keep:
                shutil.rmtree(path, ignore_errors=True)
            elif _looks_complete(path):
                intact += 1
        for p in self.directory.glob(".tmp_step_*"):  # leftovers of crashed saves
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load_latest(self, model: FSDP, optimizer: torch.optim.Optimizer | None = None) -> tuple[int, dict] | None:
        """Load the newest checkpoint that loads; None when there is none. Returns (step, extra); `self.loaded`
        is its directory. A damaged newer one is reported (Note [damaged checkpoints]); CheckpointDamaged when
        none loads. A collective: every rank falls back together."""
        found = self.checkpoints()
        if not found:
            return None
        device = model.groups[0].master.device
        damaged: list[tuple[Path, CheckpointDamaged | None]] = []
        for _, path in reversed(found):
            error = None
            try:
                result = self.load(path, model, optimizer)
            except CheckpointDamaged as e:
                error = e
            if _any_rank(error is not None, device):
                damaged.append((path, error))
                continue
            for bad, reason in damaged:
                self.log(f"warning: checkpoint {bad} is damaged "
                         f"({reason or 'on another rank'}); resumed from {path} instead")
            return result
        newest, reason = damaged[0]
        older = f" (nor do the {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""
        raise CheckpointDamaged(f"{reason or f'{newest}: damaged on another rank'}; no checkpoint in "
                                f"{self.directory} loads{older}") from reason

    def load(self, path: str | Path, model: FSDP, optimizer: torch.optim.Optimizer | None = None
             ) -> tuple[int, dict]:
        """Load checkpoint directory `path` into `model` (and `optimizer`) at any world size. CheckpointDamaged when
        its files are unreadable, cut short, disagree with its index or hold a NaN/Inf; CheckpointError when it does
        not fit the model."""
        path = Path(path)
        rank, world_size = world()
        index_path = path / "index.json"
        if not index_path.is_file():
            raise CheckpointError(f"{index_path}: missing (not a complete checkpoint)")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointDamaged(f"{index_path}: not valid JSON (truncated?): {e}") from e
        if index.get("format") != FORMAT:
            raise CheckpointDamaged(f"{index_path}: not an {FORMAT} index (format={index.get('format')!r})")

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
                    _refuse_loaded(scalar, files[0], f"optimizer state {state_name!r} of group {key}")
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
        self.loaded = path
        return index["step"], index.get("extra", {})

    def _read_flat(self, files: list[_RankFile], key: str, what: str, info: dict, dtype) -> torch.Tensor:
        """A saved group's whole flat tensor (padded layout of the saving world size); CheckpointDamaged naming
        the file and the parameter when it holds a NaN/Inf."""
        tensor_key = f"{key}::{what}"
        if info["replicated"]:
            parts = [files[0].get(tensor_key, dtype=dtype, shape=(info["shard_numel"],))]
        else:
            parts = [f.get(tensor_key, dtype=dtype, shape=(info["shard_numel"],)) for f in files]
        label = "master weights" if what == "master" else f"optimizer state {what.removeprefix('opt::')!r}"
        for r, part in enumerate(parts):
            problem = nonfinite_summary(part)
            if problem:
                first = int((~torch.isfinite(part)).nonzero()[0]) + r * info["shard_numel"]
                owner = next((row["name"] for row in info["params"] if row["offset"] <= first < row["offset"] + int(
                    torch.Size(row["shape"]).numel())), key)
                raise CheckpointDamaged(f"{files[r].path}: {label} of {owner!r} hold non-finite values ({problem}); "
                                        "a checkpoint with a NaN/Inf is never loaded")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

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
    diffusers' `save_pretrained` uses); `key_map` renames keys. A collective; rank 0 writes (NonFiniteError and
    nothing written when a weight holds a NaN/Inf)."""
    state = model.full_state_dict()
    rank, _ = world()
    if rank != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {(key_map(k) if key_map else k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    save_safetensors_atomic(out, path, metadata={"format": "pt"})
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
    rank, _ = world()
    if rank != 0:
        return None
    weights = {key_map(k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items() if name_filter(k)}
    if not weights:
        raise ValueError("export_lora: no trainable parameter matches name_filter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "fan_in_fan_out": False, "inference_mode": True, **adapter_config}
    save_safetensors_atomic(weights, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    write_atomic(directory / "adapter_config.json", json.dumps(config, indent=2))
    return directory
