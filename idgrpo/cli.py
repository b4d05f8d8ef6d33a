"""The one entry point: `idgrpo <command> [flags]` or `python -m idgrpo <command> [flags]`.

Usage:
    idgrpo --help                      # list the commands
    idgrpo env                         # versions, devices, kernel backends
    idgrpo <command> --help            # every flag of one command
    torchrun --nproc_per_node=8 -m idgrpo <command> ...   # one node, 8 processes
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 -m idgrpo <command> ...

Commands are registered below as "module:function" and imported only when chosen, so a
heavy or broken optional dependency of one command never slows down or breaks another.
Each function's signature (usually one config dataclass) is turned into flags by tyro.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from idgrpo.errors import UsageError

# name -> (target "module:function", one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("idgrpo.demo:demo", "The whole pipeline on a tiny synthetic world, on a CPU (start here)."),
    "env": ("idgrpo.env:env", "Versions, devices, optional accelerators and the kernel backend per op."),
    "encode-prompts": ("idgrpo.models.prompt_cache:encode_prompts", "Cache umT5 prompt embeddings."),
    "train-grpo": ("idgrpo.rl.recipe:train_grpo", "GRPO or NFT training from a preset (tiny; Wan 1.3B, 14B)."),
    "plan": ("idgrpo.plan:plan", "Per-GPU memory, FLOPs and the torchrun command of a train-grpo preset on a layout."),
    "export-lora": ("idgrpo.rl.trainer:export_run_lora",
                    "Write a GRPO run's LoRA adapters in PEFT's or diffusers' format (docs/lora.md)."),
    "synth-pairs": ("idgrpo.reward.distortions:synth_pairs", "Make labelled identity preference pairs by distortions."),
    "train-reward": ("idgrpo.reward.train:train_reward", "Train the compact identity reward model (BT/BTT)."),
    "score": ("idgrpo.reward.train:score", "Score videos with a trained reward model into a CSV."),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: idgrpo <command> [flags]   (or: python -m idgrpo, torchrun -m idgrpo)",
        "",
        "Identity-GRPO: identity reward model + GRPO for multi-human video diffusion.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `idgrpo <command> --help` for the flags of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], split_key_value_pairs(argv[1:])
    if name not in COMMANDS:
        print(f"idgrpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module, function = COMMANDS[name][0].split(":")
    fn = getattr(importlib.import_module(module), function)
    prog = f"idgrpo {name}"
    # Note: a usage error (a bad flag value, a bad row of a data file) and a missing file are the user's to fix: one
    # line and exit status 2, as argparse does for bad flags; anything else is ours and keeps its traceback
    # (docs/reliability.md). The commands open no file of their own making that could be missing, so a
    # FileNotFoundError always names a path the user gave.
    try:
        with _nested_config_errors():
            result = tyro.cli(fn, args=rest, prog=prog, description=COMMANDS[name][1])
    except (UsageError, FileNotFoundError) as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{_rank_prefix()}{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)


KEY_VALUE_FLAGS = ("--extra",)
"""Dict-valued flags. tyro reads them as `KEY VALUE` pairs; `KEY=VALUE` is accepted too."""


def split_key_value_pairs(args: list[str]) -> list[str]:
    """`--extra reward_checkpoint=DIR k v` -> `--extra reward_checkpoint DIR k v`: both spellings work. Only the
    values of a dict-valued flag are split, at their first `=`, and only when the part before it is a plain key
    (a value such as a path with `=` in it, given after its key, stays whole)."""
    out, in_pairs, expect_value = [], False, False
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            in_pairs, expect_value = flag in KEY_VALUE_FLAGS, False
            if in_pairs and "=" in arg:  # --extra=k=v
                arg, first = arg.split("=", 1)
                out.append(arg)
                arg = first
            else:
                out.append(arg)
                continue
        if in_pairs and not expect_value:
            key, sep, value = arg.partition("=")
            if sep and key.isidentifier():
                out += [key, value]
                continue
            expect_value = True
        elif in_pairs:
            expect_value = False
        out.append(arg)
    return out


@contextlib.contextmanager
def _nested_config_errors():
    """tyro prints a ValueError raised while it builds a nested config (`train-reward --model.*`) in a box of its own
    and exits; its parse-error hook (private in tyro 1.x: `tyro._errors`) hands it to `main` as a UsageError
    instead, so that every rejected flag reads the same. Where the hook is missing, tyro's box (exit status 2)
    remains."""
    try:
        from tyro._errors import InstantiationFailure, on_parse_error
    except ImportError:
        yield
        return

    def reject(event) -> None:
        if isinstance(event, InstantiationFailure) and event.argument is None:
            raise UsageError(event.message)

    with on_parse_error(reject):
        yield


def _rank_prefix() -> str:
    """`[rank<N>]: ` when this is one of several processes (each prints its own error), else nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank{rank}]: " if size > 1 else ""


if __name__ == "__main__":
    main()
