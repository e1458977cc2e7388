"""The `cycletune` command of an installed CycleTune: one subcommand per tool.

    cycletune tiny --out runs/tiny-models        # tiny random-init models for a first run
    cycletune train --config tiny                # a packaged config by name, or a YAML file
    cycletune generate images --checkpoint runs/tiny/export --prompts prompts.txt --output_dir images/

`cycletune train ARGS` is `accelerate launch -m cycletune.train.cycle ARGS`, so the machine's `accelerate
config` (GPUs, mixed precision) applies as it does to `accelerate launch train/cycle.py` in a checkout; for
launcher flags, run that accelerate command yourself. The other subcommands run in this process and take
the flags of their `python -m train.cli.X` form (`cycletune X --help`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence

from cycletune.models import tiny
from cycletune.train.cli import evaluate, export, generate, memory, rerank
from cycletune.train.cli.bench import cli as bench

RECIPE_MODULE = "cycletune.train.cycle"


def train(argv: Sequence[str]) -> int:
    """The training recipe under Accelerate's launcher, in a child process as `accelerate launch` runs it."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "-m", RECIPE_MODULE]
    return subprocess.run([*launcher, *argv], check=False).returncode


def write_tiny(argv: Sequence[str]) -> int:
    tiny.main(list(argv))
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int | None], str]] = {
    "train": (
        train,
        "train with a YAML config or a packaged one by name (tiny, shapes, blip_sd15_coco, ...)",
    ),
    "generate": (generate.main, "caption images, or draw images for prompts, with trained models"),
    "rerank": (rerank.main, "best of N captions by reconstruction, best of N images by re-captioning"),
    "evaluate": (evaluate.main, "caption and image metrics of a checkpoint or export"),
    "export": (export.main, "write a checkpoint's adapters (PEFT, diffusers, kohya) or merged models"),
    "bench": (bench.main, "timed steps of every phase and cycle mode against a bare baseline"),
    "memory": (memory.main, "peak GPU memory of every phase and cycle mode, estimated on a CPU"),
    "tiny": (write_tiny, "write tiny random-init models (--out DIR) to try everything in seconds"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: cycletune COMMAND [ARGS]  (cycletune COMMAND --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[name]
    sys.argv = [f"cycletune {name}", *rest]  # so each tool's usage line names the command users typed
    return command(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
