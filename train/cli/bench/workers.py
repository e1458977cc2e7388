"""Worker processes: each builds one mode (or the baseline) in a process of its own and times steps on request."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import torch

from cycletune.train.cli.bench.architectures import Architecture
from cycletune.train.cli.bench.bench_modes import BASELINE, MODES, bench_config, mode_named
from cycletune.train.cli.bench.measure import peak_memory_mb, step_flops, timed
from cycletune.train.cli.bench.profiler import profile_step
from cycletune.train.cli.bench.steps import BareGeneratorStep, TrainerStep


@dataclass
class WorkerSpec:
    """What a worker process builds: one mode (or the baseline) of one architecture."""

    arch: Architecture
    mode: str
    captioner: str
    generator: str
    output_dir: str
    threads: int
    warmup: int
    profile: bool = False


def worker_main(spec: WorkerSpec, connection: Connection, log_path: str) -> None:
    """Build, warm up, then answer "step" and "finish" requests until finished (runs in a worker process)."""
    with open(log_path, "w") as log:  # the libraries' progress bars and warnings, out of the bench's output
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(spec.threads)
    arch = spec.arch
    mode = MODES["generator"] if spec.mode == BASELINE else mode_named(spec.mode)
    config = bench_config(arch, Path(spec.captioner), Path(spec.generator), mode, Path(spec.output_dir))
    runner = (
        BareGeneratorStep(config, arch.device)
        if spec.mode == BASELINE
        else TrainerStep(config, mode.phase, arch.device)
    )
    for _ in range(spec.warmup):
        runner.step()
    connection.send({"ready": True})
    while (command := connection.recv()) == "step":
        connection.send({"seconds": timed(runner.step, arch.device)})
    if command != "finish":
        raise ValueError(f"bench worker: unknown command {command!r}")
    report: dict[str, Any] = {"peak_memory_mb": peak_memory_mb(arch.device), **runner.extra()}
    if spec.profile and isinstance(runner, TrainerStep):
        report["profile"] = profile_step(runner, arch.device)
    report["flops_per_step"] = step_flops(runner.step)
    connection.send(report)


class WorkerDied(RuntimeError):
    """A worker process exited before answering (its log holds the traceback)."""


class Worker:
    """The orchestrator's handle on one worker process.

    Workers are forked from a server that has imported this module once (multiprocessing's forkserver with a
    preload), so each starts in a fraction of a second instead of re-importing torch, diffusers and
    transformers, yet in a fresh process of its own for peak memory.
    """

    def __init__(self, context: BaseContext, spec: WorkerSpec, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_path = spec.mode, log_path
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(spec, child_end, str(log_path)), name=f"bench-{spec.mode}", daemon=True
        )
        self.process.start()
        child_end.close()
        self._receive()

    def step(self) -> float:
        self._connection.send("step")
        return self._receive()["seconds"]

    def finish(self) -> dict[str, Any]:
        self._connection.send("finish")
        report = self._receive()
        self.process.join(timeout=120)
        return report

    def _receive(self) -> dict[str, Any]:
        try:
            return self._connection.recv()
        except EOFError:
            self.process.join(timeout=60)
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise WorkerDied(f"bench worker {self.name!r} died ({self.process.exitcode}):\n{tail}") from None


def worker_context(cuda: bool) -> BaseContext:
    """A forkserver that has imported the bench (and so torch, diffusers, transformers) once; spawn for CUDA,
    which cannot be used in a process forked from one where a library already initialised it."""
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(name, value)
    if cuda:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
