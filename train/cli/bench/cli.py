"""`make bench`: time every phase and cycle mode through the trainer's own code, beside a bare baseline.

    python -m train.cli.bench                      # CPU: tiny + small architectures, ~7 minutes on 2 cores
    python -m train.cli.bench --archs tiny --modes generator --pairs 5   # a quick look
    python -m train.cli.bench --archs small --modes generator --levers fused channels_last compile

The speed levers (the config keys of train/config.py: optimizer.fused, train.allow_tf32, generator.attention,
generator.channels_last, generator.compile) are timed as rows of one mode, each row stacking one more.

The tiny and small SD architectures run every mode; tiny-sdxl, tiny-sd3, tiny-flux, small-sdxl, ... run each
other generator family at about the same size, in its supervised step and the cycle modes that run its
denoiser with gradient (any mode with --modes), without a baseline.

Each mode runs in its own worker process (a process's peak RSS never goes down), which builds the models and
a fixed, seeded batch, warms up, and then times one optimizer update per request: the phase function run as
the trained model's forward, accelerator.backward and optimizer_update, as train/cycle.py does. A second
worker runs the baseline, a supervised generator step written with bare torch + peft on the same model,
batch, LoRA targets, optimizer and real gradient clipping (the compute floor). The orchestrator alternates
single steps of the two in random order, so every figure comes with its ratio to a baseline measured at the
same moment on the same (possibly shared) machine.

Also measured: the frozen-encoder cache on vs off, where the time of each cycle mode goes (per-component
forward and backward), the cost of likelihood reward scoring vs sampling + image similarity and how well
their rankings agree, and, with CUDA, bf16 SD 1.5- and SDXL-architecture generators with a BLIP-base-
architecture captioner, with MFU. Results are printed as a table and written as JSON to runs/bench/.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cycletune.train.cli.bench.architectures import (
    ARCHITECTURES,
    CPU_ARCHITECTURES,
    GPU_ARCHITECTURES,
    save_models,
)
from cycletune.train.cli.bench.bench_modes import FAMILY_MODES, LEVERS, MODES
from cycletune.train.cli.bench.bench_report import machine_info, write_report
from cycletune.train.cli.bench.checks import acceptance
from cycletune.train.cli.bench.orchestrate import bench_architecture, plan_for
from cycletune.train.cli.bench.reward_cost import reward_cost
from cycletune.train.cli.help_format import HelpFormatter

REPO = Path(__file__).resolve().parents[3]
# The shapes demo's committed base generator (make base), scored by the reward-cost comparison.
SHAPES_BASE_GENERATOR = REPO / "pretrained" / "shapes-base" / "generator"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, bench every planned architecture, compare reward scorers, check, write the report."""
    started = time.perf_counter()
    out_dir = Path(args.out)
    torch.set_num_threads(args.threads)
    architectures = [ARCHITECTURES[name] for name in args.archs]
    gpu_asked = [arch.name for arch in architectures if arch.name in GPU_ARCHITECTURES]
    if gpu_asked and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --archs {' '.join(gpu_asked)} needs CUDA (torch.cuda.is_available() is False)"
        )
    if not gpu_asked:
        if torch.cuda.is_available() and not args.skip_gpu:
            architectures += GPU_ARCHITECTURES.values()
        else:
            print(
                "GPU part skipped: "
                + ("--skip-gpu" if args.skip_gpu else "torch.cuda.is_available() is False")
            )
    report: dict[str, Any] = {"machine": machine_info(args.threads), "architectures": {}, "results": {}}
    models = {arch.name: save_models(arch, out_dir / "models" / arch.name) for arch in architectures}
    deadline = None if args.time_budget is None else started + args.time_budget
    for arch in architectures:
        print(f"{arch.name}: {arch.description}", flush=True)
        plan = plan_for(arch, args.modes, args.pairs, args.warmup, args.threads, args.levers, args.lever_mode)
        report["architectures"][arch.name] = {**asdict(arch), **asdict(plan)}
        report["results"][arch.name] = bench_architecture(arch, models[arch.name], plan, out_dir, deadline)
    if not args.skip_reward:
        if args.reward_generator:
            generator_dir = Path(args.reward_generator)
        elif (SHAPES_BASE_GENERATOR / "model_index.json").is_file():
            generator_dir = SHAPES_BASE_GENERATOR  # trained: its rankings mean something
        else:
            tiny = CPU_ARCHITECTURES["tiny"]
            generator_dir = (models.get("tiny") or save_models(tiny, out_dir / "models" / "tiny"))[1]
        report["reward_cost"] = reward_cost(generator_dir, args.reward_resolution)
    report["checks"] = acceptance(report["results"])
    report["machine"]["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    write_report(report, out_dir)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.cli.bench",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", default="runs/bench", help="results, models and logs folder")
    parser.add_argument(
        "--archs",
        nargs="+",
        default=list(CPU_ARCHITECTURES),
        choices=list(ARCHITECTURES),
        help=f"default: the CPU ones, plus {' and '.join(GPU_ARCHITECTURES)} where CUDA works",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=list(MODES),
        help=f"default: all on SD architectures, {' '.join(FAMILY_MODES)} on the other families'",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="interleaved pairs per mode, steps where there is no baseline (default: a plan)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per worker (default: a plan)")
    parser.add_argument(
        "--levers",
        nargs="+",
        default=[],
        choices=list(LEVERS),
        help="speed levers to time as rows of --lever-mode beside the baseline, stacked in the order given: "
        "each row adds one lever to those of the row before",
    )
    parser.add_argument(
        "--lever-mode", default="generator", choices=list(MODES), help="the mode the lever rows run"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds from the start: a mode starts only if it would end in time at the median pace of the "
        "modes so far; the others are reported as skipped",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    parser.add_argument("--skip-reward", action="store_true", help="skip the reward-cost comparison")
    parser.add_argument(
        "--reward-generator",
        default=None,
        help="generator folder for the reward comparison (default: pretrained/shapes-base, else the tiny one)",
    )
    parser.add_argument("--reward-resolution", type=int, default=32)
    parser.add_argument("--skip-gpu", action="store_true", help="skip the CUDA part even where CUDA works")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0
