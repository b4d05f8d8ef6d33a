"""A run directory holds one run: its settings are recorded when it starts and checked when it resumes.

    run = open_run("runs/reward", settings, mutable={"epochs", "max_minutes"}, resume=True, overwrite=False)
    if run.resuming:
        ...  # load the latest checkpoint, truncate the logs to it

- A new or empty directory starts a run; `run.json` records its settings (a flat or nested JSON-able dict).
- A used directory is resumed (`resume=True`): a setting outside `mutable` that differs from the record is refused
  with every difference listed (`RunSettingsError`, old -> new); the `mutable` ones that differ are applied, logged
  and recorded in run.json's `changes`. A used directory without run.json (a run started by an older idgrpo) is
  resumed with a warning that its settings cannot be checked.
- A used directory without `resume` is refused (`RunDirError`) unless `overwrite`, which first moves the old
  contents aside, to the sibling `<name>.replaced-<date>-<time>`, so two runs are never mixed (docs/reliability.md).

Call it before anything is written into the directory. A collective when several processes run: every rank
checks, rank 0 writes; every rank raises the same error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from idgrpo.engine.checkpoint import write_atomic
from idgrpo.engine.dist import barrier, world
from idgrpo.errors import UsageError

RUN_FILE = "run.json"
FORMAT = "idgrpo-run"


class RunDirError(UsageError):
    """A run directory that cannot be used as asked: used by another run, or not readable."""


class RunSettingsError(RunDirError):
    """Resuming with settings that cannot change in the middle of a run; the message lists each one, old -> new."""


@dataclass
class RunDir:
    path: Path
    resuming: bool
    """An earlier run of this directory continues (load its latest checkpoint, if any)."""
    changed: dict[str, tuple] = field(default_factory=dict)
    """Mutable settings that differ from the recorded run: flat key -> (old, new)."""
    moved_to: Path | None = None
    """Where `overwrite` moved the previous contents (rank 0; None elsewhere or when nothing was moved)."""


def _plain(value):
    """JSON-able and comparable: paths absolute, tuples as lists, dict keys as strings."""
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _flatten(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_diff(old: dict, new: dict) -> dict[str, tuple]:
    """Flat key (`model.dim`) -> (old, new) for every setting that differs; a key on one side only is
    (None, new) / (old, None)."""
    old, new = _flatten(_plain(old)), _flatten(_plain(new))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _read_record(file: Path) -> dict:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{file}: cannot be read ({e}); restore it, or start afresh with --overwrite") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        raise RunDirError(f"{file}: not an idgrpo run record (format {FORMAT!r} with 'settings')")
    return record


def _aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    path.rename(target)
    return target


def open_run(path: str | Path, settings: dict, *, mutable: Iterable[str] = (), resume: bool = True,
             overwrite: bool = False, label: Callable[[str], str] = str,
             log: Callable[[str], None] = lambda message: None) -> RunDir:
    """Start or resume the run in `path` (see the module docstring). `settings`: this invocation's settings (leave
    out the ones about the invocation itself, such as the resume flag); `mutable`: the flat keys that may change
    on resume; `label`: how a key is named in messages (a flag, `--model.dim`); `log`: where rank 0's notes go."""
    path = Path(path)
    mutable = set(mutable)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is not a directory")
    used = path.is_dir() and any(not p.name.endswith(".partial") for p in path.iterdir())  # not a stopped write
    record_file = path / RUN_FILE
    new = _plain(settings)
    record = {"format": FORMAT, "version": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": new}
    changed: dict[str, tuple] = {}
    resuming = used and not overwrite
    if resuming and not resume:
        raise RunDirError(f"{path} already holds a run; resuming it was switched off, and a new run there would mix "
                          "with the old one. Pass --overwrite to move the old run aside first, or choose another "
                          "directory")
    if resuming and record_file.is_file():
        record = _read_record(record_file)
        differences = settings_diff(record["settings"], new)
        fixed = {k: v for k, v in differences.items() if k not in mutable}
        if fixed:
            listed = "; ".join(f"{label(k)}: {old!r} -> {value!r}" for k, (old, value) in fixed.items())
            raise RunSettingsError(f"{path} holds a run with other settings, which cannot change when it resumes: "
                                   f"{listed} (recorded in {record_file}). Start a new run with another directory or "
                                   "--overwrite, or resume with the recorded values")
        changed = differences
        record["settings"] = new
        if changed:
            record.setdefault("changes", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "changed": {k: list(v) for k, v in changed.items()}})
    barrier()  # every rank has read the directory before rank 0 changes it
    moved_to = None
    if world()[0] == 0:
        if used and overwrite:
            moved_to = _aside(path)
            log(f"--overwrite: the previous contents of {path} were moved to {moved_to}")
        if resuming and not record_file.is_file():
            log(f"warning: {path} has no {RUN_FILE} (a run started by an older idgrpo): its settings cannot be "
                "checked; the current ones are recorded now")
        for key, (old, value) in changed.items():
            log(f"resuming with a changed setting: {label(key)} {old!r} -> {value!r}")
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(record_file, json.dumps(record, indent=1) + "\n")
    barrier()
    return RunDir(path, resuming, changed, moved_to)
