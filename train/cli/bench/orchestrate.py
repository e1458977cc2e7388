"""Running one architecture's modes: each mode's worker interleaved, step by step, with one baseline worker."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycletune.train.cli.bench.architectures import FAMILY_ARCHITECTURES, GPU_ARCHITECTURES, Architecture
from cycletune.train.cli.bench.bench_modes import (
    BASELINE,
    CYCLE_MODES,
    FAMILY_MODES,
    MODES,
    PROFILED_MODES,
    lever_rows,
    measured,
)
from cycletune.train.cli.bench.stats_ratios import median, step_summary, time_ratio
from cycletune.train.cli.bench.workers import Worker, WorkerDied, WorkerSpec, worker_context

# bf16 dense throughput measured on this workplace's H100 (the MFU denominator).
H100_BF16_FLOPS = 790e12
# Interleaved pairs per mode and untimed warm-up steps per worker, sized so `make bench` stays within
# 8 minutes on 2 CPU cores: 30 pairs where an acceptance check needs them, fewer for the slow modes. The
# other families' rows have no baseline, so their "pairs" are single steps.
DEFAULT_PAIRS = {
    "tiny": {"captioner": 10, "generator": 12, "generator_cached": 30, **dict.fromkeys(CYCLE_MODES, 8)},
    "small": {
        "captioner": 6,
        "generator": 30,
        "generator_cached": 6,
        **dict.fromkeys(CYCLE_MODES, 4),
        "i2t2i_reward": 3,
        "t2i2t_sample": 3,
        "t2i2t_reward": 3,
        "t2i2t_reward_cider_d": 3,
    },
    **{arch.name: dict.fromkeys(MODES, 8) for arch in FAMILY_ARCHITECTURES["tiny"].values()},
    **{arch.name: dict.fromkeys(MODES, 3) for arch in FAMILY_ARCHITECTURES["small"].values()},
    **{name: dict.fromkeys(MODES, 10) for name in GPU_ARCHITECTURES},
}
DEFAULT_WARMUP = {
    "tiny": 3,
    "small": 1,
    **{arch.name: 3 for arch in FAMILY_ARCHITECTURES["tiny"].values()},
    **{arch.name: 1 for arch in FAMILY_ARCHITECTURES["small"].values()},
    **dict.fromkeys(GPU_ARCHITECTURES, 3),
}


@dataclass(frozen=True)
class Plan:
    """Which modes of one architecture run, with how many pairs, warm-up steps and torch threads."""

    pairs: dict[str, int]
    warmup: int
    threads: int


def plan_for(
    arch: Architecture,
    modes: Sequence[str] | None,
    pairs: int | None,
    warmup: int | None,
    threads: int,
    levers: Sequence[str] = (),
    lever_mode: str = "generator",
) -> Plan:
    """The modes asked for, in the order given (by default: every mode on an SD architecture, FAMILY_MODES on
    another family's, in MODES order), with the given pairs and warm-up steps or the architecture's defaults.
    With `levers`, lever_mode's lever rows (bench_modes.lever_rows) follow lever_mode's own row, or lead
    the plan where lever_mode is not planned."""
    default_modes = MODES if arch.has_baseline else FAMILY_MODES
    rows = list(dict.fromkeys(modes)) if modes else [mode for mode in MODES if mode in default_modes]
    added = lever_rows(lever_mode, levers)
    at = rows.index(lever_mode) + 1 if lever_mode in rows else 0
    rows[at:at] = added
    return Plan(
        pairs={row: pairs or DEFAULT_PAIRS[arch.name][row.split("+")[0]] for row in rows},
        warmup=DEFAULT_WARMUP[arch.name] if warmup is None else warmup,
        threads=threads,
    )


def bench_architecture(
    arch: Architecture, models: tuple[Path, Path], plan: Plan, out_dir: Path, deadline: float | None = None
) -> dict[str, Any]:
    """All planned modes of one architecture, each interleaved pair by pair with one long-lived baseline (where
    the architecture has one: the SD family's). With a `deadline` (a time.perf_counter() value), a mode
    starts only if it would end by then at the median pace of the modes so far (a median, so one
    compiling mode does not stop all the rest); the others are marked skipped, so a bench on a short GPU
    loan ends in time with its report written. Each finished mode is also appended to logs/ARCH/rows.jsonl."""
    order = random.Random(0)
    logs = out_dir / "logs" / arch.name
    context = worker_context(cuda=arch.device.startswith("cuda"))

    def start(mode: str) -> Worker:
        spec = WorkerSpec(
            arch,
            mode,
            str(models[0]),
            str(models[1]),
            str(out_dir / "scratch"),
            plan.threads,
            plan.warmup,
            profile=mode in PROFILED_MODES,
        )
        return Worker(context, spec, logs / f"{mode}.log")

    baseline = start(BASELINE) if arch.has_baseline else None
    results: dict[str, Any] = {}
    all_baseline: list[float] = []
    walls: list[float] = []
    for mode, pairs in plan.pairs.items():
        started, load = time.perf_counter(), os.getloadavg()[0]
        pace = median(walls) if walls else 0.0
        if deadline is not None and started + pace > deadline:
            results[mode] = {"skipped": f"time budget spent (a mode took {pace:.0f} s, median)"}
            print(f"  {arch.name:<10} {mode:<21} skipped: time budget spent", flush=True)
            continue
        ours, base = [], []
        try:
            worker = start(mode)
            for _ in range(pairs):
                for current in _pair(worker, baseline, order):
                    (ours if current is worker else base).append(current.step())
            report = worker.finish()
        except WorkerDied as error:  # e.g. out of memory: keep the other modes' results
            results[mode] = {"error": str(error)}
            print(f"  {arch.name:<10} {mode:<21} failed, see {logs / f'{mode}.log'}", flush=True)
            continue
        all_baseline += base
        against_baseline = (
            {"time_vs_baseline": time_ratio(ours, base), "baseline_seconds": base} if base else {}
        )
        results[mode] = {
            **step_summary(ours, arch.batch_size),
            **against_baseline,
            "seconds": ours,
            "load_average": (load, os.getloadavg()[0]),
            "wall_s": time.perf_counter() - started,
            **report,
        }
        walls.append(results[mode]["wall_s"])
        with open(logs / "rows.jsonl", "a") as rows:  # kept if the bench is stopped before its report
            rows.write(json.dumps({"arch": arch.name, "mode": mode, **results[mode]}) + "\n")
        print(f"  {arch.name:<10} {mode:<21} {results[mode]['median_ms']:9.1f} ms/step", flush=True)
    if baseline is not None:
        results[BASELINE] = {
            **step_summary(all_baseline, arch.batch_size),
            "seconds": all_baseline,
            **baseline.finish(),
        }
    if arch.device.startswith("cuda"):
        for figures in measured(results).values():
            figures["mfu"] = figures["flops_per_step"] / (figures["median_ms"] / 1000) / H100_BF16_FLOPS
    return results


def _pair(worker: Worker, baseline: Worker | None, order: random.Random) -> tuple[Worker, ...]:
    """One pair's steps, the mode's and the baseline's in random order; the mode's alone without a baseline."""
    if baseline is None:
        return (worker,)
    return (worker, baseline) if order.random() < 0.5 else (baseline, worker)
