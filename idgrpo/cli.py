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

import importlib
import sys

# name -> (target "module:function", one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("idgrpo.demo:demo", "The whole pipeline on a tiny synthetic world, on a CPU (start here)."),
    "env": ("idgrpo.env:env", "Versions, devices, optional accelerators and the kernel backend per op."),
    "encode-prompts": ("idgrpo.models.prompt_cache:encode_prompts", "Cache umT5 prompt embeddings."),
    "train-grpo": ("idgrpo.rl.recipe:train_grpo", "Identity-GRPO training (presets tiny, vace-1.3b, phantom-1.3b)."),
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
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"idgrpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module, function = COMMANDS[name][0].split(":")
    fn = getattr(importlib.import_module(module), function)
    result = tyro.cli(fn, args=rest, prog=f"idgrpo {name}", description=COMMANDS[name][1])
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)


if __name__ == "__main__":
    main()
