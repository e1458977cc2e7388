"""The bench's report: machine facts, the results table, the checks, the profiles, written as JSON and markdown."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import peft
import torch
import transformers

from cycletune.train.cli.bench.bench_modes import BASELINE
from cycletune.train.cli.bench.checks import (
    CACHE_SPEEDUP_TARGET,
    CYCLE_COST_LIMIT,
    FRAMEWORK_RATIO_FLOOR,
    GPU_TARGET_ARCH,
)


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {
            module.__name__: module.__version__
            for module in (torch, diffusers, transformers, peft, accelerate)
        },
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(
    results: dict[str, dict[str, Any]], architectures: dict[str, dict[str, Any]] | None = None
) -> str:
    """Markdown tables, one per architecture headed by its generator family and models (from `architectures`,
    the report's entries), one row per mode, every figure with its baseline ratio where there is a baseline."""
    tables = []
    for arch_name, modes in results.items():
        arch = (architectures or {}).get(arch_name)
        lines = [f"**{arch_name}** ({arch['family']} generator): {arch['description']}"] if arch else []
        lines += [
            "| arch | mode | ms/step median | min | samples/s | GFLOP/step | time vs baseline | vs supervised | "
            "peak memory MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mode, figures in modes.items():
            if "error" in figures:
                lines.append(f"| {arch_name} | {mode} | failed: {figures['error'].splitlines()[0]} |")
                continue
            if "skipped" in figures:
                lines.append(f"| {arch_name} | {mode} | not run: {figures['skipped']} |")
                continue
            relative = figures.get("relative_to_supervised")
            against_baseline = figures.get("time_vs_baseline", 1.0 if mode == BASELINE else None)
            mfu = f" (MFU {figures['mfu']:.1%})" if "mfu" in figures else ""
            lines.append(
                f"| {arch_name} | {mode} | {figures['median_ms']:.1f} | {figures['min_ms']:.1f} | "
                f"{figures['samples_per_s']:.2f}{mfu} | {figures['flops_per_step'] / 1e9:.2f} | "
                f"{'' if against_baseline is None else f'{against_baseline:.2f}x'} | "
                f"{'' if relative is None else f'{relative:.2f}x'} | {figures['peak_memory_mb']:.0f} |"
            )
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def format_checks(checks: dict[str, Any], reward: dict[str, Any] | None) -> str:
    lines = []
    overhead = checks.get("framework_overhead")
    if overhead:
        lines.append(
            f"framework overhead (small, {overhead['pairs']} pairs): speed ratio {overhead['ratio']:.3f}, 95% CI "
            f"[{overhead['low']:.3f}, {overhead['high']:.3f}] -> {'PASS' if overhead['passes'] else 'FAIL'} "
            f"(lower bound >= {FRAMEWORK_RATIO_FLOOR})"
        )
    cache = checks.get("cache_speedup")
    if cache:
        uncached = (
            f", {cache['vs_uncached']:.2f}x our uncached step's speed" if "vs_uncached" in cache else ""
        )
        lines.append(
            f"caching (tiny, {cache['pairs']} pairs): median speed ratio vs baseline {cache['ratio']:.2f} "
            f"[{cache['low']:.2f}, {cache['high']:.2f}]{uncached}; ceiling {cache['ceiling']:.2f} (the "
            f"encoders' share of the baseline step) -> {'PASS' if cache['passes'] else 'FAIL'} "
            f"(>= {CACHE_SPEEDUP_TARGET})"
        )
    lines += _format_gpu_targets(checks.get("gpu_targets"))
    for name, cost in checks.get("cycle_costs", {}).items():
        verdict = ""
        if "within_limit" in cost:
            verdict = f" -> {'within' if cost['within_limit'] else 'OVER'} {CYCLE_COST_LIMIT}x"
        lines.append(
            f"{name}: {cost['relative_to_supervised']:.2f}x the supervised {cost['reference']} step{verdict}"
        )
    if reward:
        lines.append(
            f"reward scoring ({reward['setup']['images']} images x {reward['setup']['candidates']} candidates): "
            f"likelihood {reward['likelihood']['median_ms']:.0f} ms, sampling + similarity "
            f"{reward['sampling']['median_ms']:.0f} ms ({reward['speed_ratio']:.1f}x slower), "
            f"Spearman {reward['spearman']:.2f}"
        )
    return "\n".join(lines)


def _format_gpu_targets(targets: dict[str, Any] | None) -> list[str]:
    """One line per GPU target that has its rows: speed ratio vs the baseline, CI, verdict."""
    if not targets:
        return []
    lines = []
    for name, label in (
        ("uncached", "generator"),
        ("cached", "generator_cached"),
        ("levers", "best lever row"),
    ):
        target = targets.get(name)
        if target is None:
            continue
        row = f" {target['row']}" if "row" in target else ""
        mfu = f", MFU {target['mfu']:.1%} (>= {target['mfu_target']:.0%})" if "mfu_target" in target else ""
        lines.append(
            f"{GPU_TARGET_ARCH} {label}{row}: speed {target['ratio']:.2f}x the baseline's "
            f"[{target['low']:.2f}, {target['high']:.2f}], {target['pairs']} pairs (>= {target['target']}x){mfu}"
            f" -> {'PASS' if target['passes'] else 'FAIL'}"
        )
    lines.append(f"{GPU_TARGET_ARCH}: MFU on every row: {'yes' if targets['mfu_everywhere'] else 'NO'}")
    return lines


def format_profiles(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for arch_name, modes in results.items():
        for mode, figures in modes.items():
            profile = figures.get("profile")
            if not profile:
                continue
            stages = profile["step"]
            parts = ", ".join(
                f"{name} {values['forward_ms']:.0f}+{values['backward_ms']:.0f}"
                for name, values in profile.items()
                if name != "step" and values["forward_ms"] + values["backward_ms"] >= 0.5
            )
            lines.append(
                f"{arch_name}/{mode}: forward {stages.get('forward', 0):.0f} ms, backward {stages.get('backward', 0):.0f}"
                f" ms, update {stages.get('update', 0):.0f} ms; by part (forward+backward ms): {parts}"
            )
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    table = format_table(report["results"], report["architectures"])
    checks = format_checks(report["checks"], report.get("reward_cost"))
    profiles = format_profiles(report["results"])
    machine = report["machine"]
    header = (
        f"{machine['date']} | {machine['cpu']} | {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"threads | torch {machine['versions']['torch']} | {report['wall_s']:.0f} s"
    )
    text = f"{header}\n\n{table}\n\n{checks}\n\n{profiles}\n"
    print("\n" + text)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = machine["date"].replace(":", "").replace("+0000", "Z")
    path = out_dir / f"bench-{stamp}.json"
    for target in (path, out_dir / "latest.json"):
        target.write_text(json.dumps(report, indent=1))
    (out_dir / "latest.md").write_text(text)
    print(f"written: {path}")
    return path
