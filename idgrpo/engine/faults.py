"""Fault injection: stop a run at a named point, to prove that a kill or a full disk there loses nothing.

    IDGRPO_FAULT=<point>[@<rank>][:<count>][:<action>]

    IDGRPO_FAULT=checkpoint.publish:2 idgrpo train-reward ...        # killed before the 2nd checkpoint is published
    IDGRPO_FAULT='write/rank_*@1' torchrun --nproc-per-node 2 -m idgrpo train-reward ...   # rank 1 dies mid-write
    IDGRPO_FAULT=write/rank_00000.safetensors:3:enospc idgrpo train-reward ...              # the disk fills up

- point: a point name or a shell-style pattern of them (`write/*`);
- rank: only this rank of the process group faults (rank 0 before the group exists; default: every rank);
- count: fault on the count-th time this process reaches a matching point (default 1);
- action: `exit` (default): `os._exit(FAULT_EXIT_CODE)`, as abrupt as a kill (no cleanup, no `finally`, no buffered
  output); `raise`: `InjectedFault`, a BaseException, so that in-process tests can stop a run without ending the
  test process; `enospc`: `OSError(ENOSPC)`, a write failing on a full disk.

The points (docs/reliability.md): `step` (inside an optimizer step, `step_if_finite`), `write/<file name>` (an atomic
write, after its temporary file is written and before it is renamed), `checkpoint.publish` (every file of a
checkpoint written, before its directory is renamed into place), `checkpoint.prune` (a checkpoint published, before
older ones are pruned) and `metrics.flush` (while a metrics record is appended). A point that writes passes a `torn`
callback, which leaves the half-written state a kill at that moment would leave (half a line, half a file).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys
from collections.abc import Callable

from idgrpo.engine.dist import world

FAULT_ENV = "IDGRPO_FAULT"
FAULT_EXIT_CODE = 86
_ACTIONS = ("exit", "raise", "enospc")
_state: dict = {"spec": None, "parsed": None, "hits": 0}


class InjectedFault(BaseException):
    """Raised by a fault point with the `raise` action; a BaseException so that no `except Exception` swallows it."""


def _parse(spec: str) -> tuple[str, int | None, int, str]:
    head, *rest = spec.split(":")
    pattern, _, rank = head.partition("@")
    count, action = 1, "exit"
    for part in rest:
        if part.isdigit():
            count = int(part)
        elif part in _ACTIONS:
            action = part
        else:
            raise ValueError(f"{FAULT_ENV}={spec!r}: {part!r} is neither a count nor one of {', '.join(_ACTIONS)}")
    if not pattern or count < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <point>[@<rank>][:<count>][:<action>]")
    return pattern, int(rank) if rank else None, count, action


def fault_point(name: str, torn: Callable[[], None] | None = None) -> None:
    """Fault here when $IDGRPO_FAULT names this point (see the module docstring); otherwise do nothing."""
    spec = os.environ.get(FAULT_ENV) or None
    if spec != _state["spec"]:  # a new spec starts a new count
        _state.update(spec=spec, parsed=_parse(spec) if spec else None, hits=0)
    if spec is None:
        return
    pattern, rank, count, action = _state["parsed"]
    if not fnmatch.fnmatchcase(name, pattern) or (rank is not None and rank != world()[0]):
        return
    _state["hits"] += 1
    if _state["hits"] != count:
        return
    if torn is not None:
        torn()
    message = f"{FAULT_ENV}={spec}: {action} at {name}"
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device ({message})")
    if action == "raise":
        raise InjectedFault(message)
    print(f"idgrpo: {message}", file=sys.stderr, flush=True)
    os._exit(FAULT_EXIT_CODE)
