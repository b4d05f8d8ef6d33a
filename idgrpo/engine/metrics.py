"""Training metrics without host syncs in the step, strict JSON logs, and a rank-0 progress bar.

Usage:
    metrics = Metrics("runs/exp1", rank=info.rank)
    for step in progress(range(steps), rank=info.rank, desc="train"):
        ...
        metrics.add("loss", loss)               # a device op, no sync
        if step % 10 == 0:
            logged = metrics.flush(step)        # the one host read per interval
    path.write_text(strict_json(summary))       # any other JSON a user reads

    metrics = Metrics("runs/exp1", rank=info.rank, truncate_after=resumed_step)  # Note [one record per step]

Note [strict JSON]: JSON (RFC 8259) has no NaN or Infinity; Python's `json.dumps` writes them as bare `NaN` /
`Infinity`, which strict readers (JavaScript's `JSON.parse`, Go's `encoding/json`, Rust's `serde_json`) reject.
Every log and summary is written by `strict_json`: a non-finite float becomes `null` and its key is listed under
`"nonfinite"` in the record, so it is neither hidden nor a parse error (docs/reliability.md).

Note [one record per step]: a run stopped (killed, out of time) after its last checkpoint has logged steps that the
checkpoint does not hold, and the resumed run logs them again. So a resumed run opens its logs with
`truncate_after=<the checkpoint's step>`:
records of later steps, and a last line cut short by the stop, are dropped first (`truncate_jsonl`; TensorBoard's
`purge_step` does the same for its events), and every log holds each step once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from idgrpo.engine.checkpoint import write_atomic
from idgrpo.engine.faults import fault_point


class Metrics:
    """Accumulates named values on device; `flush` reads them once per logging interval.

    A value may be a float or a tensor of any shape (its mean is taken). A metric's logged
    value is the mean of everything added since the last flush. With `all_reduce=True` the
    means are averaged over ranks (a collective: every rank must flush with the same names).
    `truncate_after`: when resuming, the step of the checkpoint resumed from (Note [one record per step]).
    """

    def __init__(self, log_dir: str | Path | None = None, *, rank: int = 0, all_reduce: bool = False,
                 tensorboard: bool = True, truncate_after: int | None = None):
        self.rank = rank
        self.all_reduce = all_reduce
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._jsonl = None
        self._tb = None
        if self.log_dir is not None and rank == 0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if truncate_after is not None:
                truncate_jsonl(self.log_dir / "metrics.jsonl", truncate_after)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    purge = None if truncate_after is None else truncate_after + 1
                    self._tb = SummaryWriter(str(self.log_dir / "tb"), purge_step=purge)
                except ImportError:  # tensorboard not installed: JSON lines only
                    self._tb = None

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = value.float().mean() if value.numel() != 1 else value.float().reshape(())
        else:
            value = torch.tensor(float(value))
        if name in self._sums:
            self._sums[name].add_(value.to(self._sums[name].device))
        else:
            self._sums[name] = value.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def flush(self, step: int) -> dict[str, float]:
        """Means since the last flush as floats (one device-to-host copy); logs them on rank 0."""
        names = sorted(self._sums)
        out: dict[str, float] = {}
        if names:
            device = next(iter(self._sums.values())).device
            means = torch.stack([self._sums[n].to(device) / self._counts[n] for n in names])
            if self.all_reduce and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(means)
                means /= dist.get_world_size()
            out = dict(zip(names, means.tolist()))
        self._sums.clear()
        self._counts.clear()
        record = {"step": step, "time_s": round(time.perf_counter() - self._t0, 3), **out}
        line = strict_json(record) + "\n"
        fault_point("metrics.flush", torn=(lambda: self._write_torn(line)) if self._jsonl is not None else None)
        if self.rank == 0:
            if self._jsonl is not None:
                self._jsonl.write(line)
            if self._tb is not None:
                for k, v in out.items():
                    self._tb.add_scalar(k, v, step)
        return out

    def _write_torn(self, line: str) -> None:
        """What a stop in the middle of a record leaves (fault injection, idgrpo.engine.faults)."""
        self._jsonl.write(line[:len(line) // 2])
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def strict_json(record: dict, **dumps_kwargs) -> str:
    """`record` as strict JSON (Note [strict JSON]): each non-finite float, at any depth, becomes null and its path
    (`loss`, `history[3].reward_mean`) is listed under the top-level key "nonfinite" (absent when there is none)."""
    replaced: list[str] = []

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(path)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(record, "")
    if replaced:
        cleaned["nonfinite"] = replaced
    return json.dumps(cleaned, allow_nan=False, **dumps_kwargs)


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Drop the records of JSON-lines log `path` whose "step" is above `last_step`, and lines cut short (Note [one
    record per step]); the file is rewritten atomically, and left alone when there is nothing to drop. Returns the
    number of lines dropped (0 when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step", last_step) if isinstance(record, dict) else None
        if line.endswith("\n") and isinstance(step, (int, float)) and step <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def progress(iterable: Iterable | None = None, *, rank: int = 0, total: int | None = None, desc: str | None = None,
             **tqdm_kwargs):
    """tqdm on rank 0; on other ranks the iterable itself (or a do-nothing bar)."""
    if rank == 0:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **tqdm_kwargs)
    return iterable if iterable is not None else _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
