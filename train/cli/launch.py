"""Run the trainer as users do, `accelerate launch train/cycle.py`, from the demo and base-model scripts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def launch_command(config: Path, overrides: Sequence[str], num_processes: int = 1) -> list[str]:
    """The accelerate launch command line of one training run (printed, so it can be rerun by hand)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, "train/cycle.py", "--config", str(config), *overrides]


def run_timed(command: Sequence[str]) -> float:
    """Print and run a command to completion (its progress bars show); returns its wall time in seconds.

    A failing command raises CalledProcessError with its exit status; its own output says why.
    """
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started
