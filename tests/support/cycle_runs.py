"""Run the real training entry point (`train/cycle.py`) in a subprocess, the way users launch it."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cycletune.train.cli.drill import differing_tensors as differing_tensors  # re-exported for the tests
from cycletune.train.config import Config, load_config
from cycletune.train.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
RECIPE = REPO / "train" / "cycle.py"
EXPORTED = ("captioner/adapter_model.safetensors", "generator/pytorch_lora_weights.safetensors")


def tiny_overrides(tiny_models: Any, output_dir: Path) -> list[str]:
    return [f"output_dir={output_dir}", *tiny_model_overrides(tiny_models)]


def tiny_model_overrides(tiny_models: Any) -> list[str]:
    return [
        f"captioner.pretrained_model_name_or_path={tiny_models.captioner}",
        f"generator.pretrained_model_name_or_path={tiny_models.generator}",
    ]


def tiny_config(tiny_models: Any, *overrides: str) -> Config:
    """configs/tiny.yaml on the session's tiny models, for tests that build components in-process."""
    return load_config(TINY_CONFIG, [*tiny_model_overrides(tiny_models), *overrides])


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}, **extra)
    return env


def launch_command(script: list[str], processes: int = 1, engine: Path | None = None) -> list[str]:
    """`python SCRIPT ...`, or `accelerate launch` of it: DDP on `processes` CPU processes (gloo), or the
    engine an accelerate config file names (configs/accelerate/), on any process count."""
    if processes == 1 and engine is None:
        return [sys.executable, *script]
    distributed = ["--multi_gpu"] if engine is None else ["--config_file", str(engine)]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *distributed,
        "--num_processes",
        str(processes),
    ]
    port = ["--main_process_port", str(free_port())]  # parallel test workers may launch at the same time
    return [
        *launch,
        *port,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *script,
    ]


def free_port() -> int:
    """A TCP port nothing listens on now, for a launch's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cycle_command(overrides: list[str], processes: int = 1, engine: Path | None = None) -> list[str]:
    return launch_command(["train/cycle.py", "--config", str(TINY_CONFIG), *overrides], processes, engine)


def run_cycle(
    overrides: list[str], processes: int = 1, check: bool = True, engine: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    """Run the trainer to completion; on failure show the run's output in the assertion."""
    extra = {"ACCELERATE_USE_CPU": "1"} if processes > 1 else {}
    return run_launched(cycle_command(overrides, processes, engine), check, **extra, **env)


def run_launched(command: list[str], check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a launch_command in the repository; on failure show its output in the assertion."""
    result = subprocess.run(
        command,
        cwd=REPO,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, (
            f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}"
        )
    return result


def sample_log(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in RunDir(output_dir).samples_log.read_text().splitlines()]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's exported adapters, keyed by file and tensor name."""
    weights = {}
    for relative in EXPORTED:
        for key, value in load_file(str(RunDir(output_dir).export_dir / relative)).items():
            weights[f"{relative}:{key}"] = value
    return weights


def run_recipe_in_process(argv: list[str]) -> int:
    """`python train/cycle.py ARGV`, run as a script in this process (no interpreter start-up): the exit
    code it returns. The recipe is executed as users run it, never imported."""
    saved, sys.argv = sys.argv, [str(RECIPE), *argv]
    try:
        runpy.run_path(str(RECIPE), run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    return 0
