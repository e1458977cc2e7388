"""The benchmark's acceptance checks: framework overhead, cache speed-up, each cycle mode's cost, and the
SD 1.5-scale GPU targets (our steps' and the speed levers' throughput against the baseline, MFU)."""

from __future__ import annotations

from typing import Any

from cycletune.train.cli.bench.bench_modes import BASELINE, CYCLE_MODES, FLAGGED_MODES, MODES, measured
from cycletune.train.cli.bench.stats_ratios import speed_ratio_interval

CYCLE_COST_LIMIT = 1.6
FRAMEWORK_RATIO_FLOOR = 0.95
CACHE_SPEEDUP_TARGET = 1.25
# The GPU targets, on the SD 1.5-scale architecture: speed ratios (baseline time / ours, median of pairs)
# of the uncached and cached supervised generator steps, and of the best lever row (the uncached step's
# work, so "equal work"), with the MFU the lever row must reach.
GPU_TARGET_ARCH = "sd15-blip-base"
GPU_UNCACHED_FLOOR = 0.98
GPU_CACHED_TARGET = 1.3
GPU_LEVERS_TARGET = 1.5
GPU_LEVERS_MFU_TARGET = 0.35


def acceptance(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's acceptance checks, from the measured figures of whichever architectures and modes ran."""
    results = {arch_name: measured(modes) for arch_name, modes in results.items()}
    checks: dict[str, Any] = {}
    small = results.get("small", {})
    if "generator" in small:
        interval = speed_ratio_interval(small["generator"]["seconds"], small["generator"]["baseline_seconds"])
        checks["framework_overhead"] = {
            **interval,
            "passes": interval["pairs"] >= 30 and interval["low"] >= FRAMEWORK_RATIO_FLOOR,
            "rule": f"small, generator (cache off) vs baseline, >= 30 pairs: 95% CI low >= {FRAMEWORK_RATIO_FLOOR}",
        }
    tiny = results.get("tiny", {})
    if "generator_cached" in tiny:
        cached, baseline = tiny["generator_cached"], tiny[BASELINE]
        interval = speed_ratio_interval(cached["seconds"], cached["baseline_seconds"])
        # Caching can at most remove the encoders' time from a step: the baseline's share bounds the gain.
        ceiling = baseline["median_ms"] / (baseline["median_ms"] - baseline["encoders_ms"])
        checks["cache_speedup"] = {
            **interval,
            "ceiling": ceiling,
            "passes": interval["ratio"] >= CACHE_SPEEDUP_TARGET,
            "rule": f"tiny, generator (cache on) vs baseline: median speed ratio >= {CACHE_SPEEDUP_TARGET}",
        }
        if "generator" in tiny:
            checks["cache_speedup"]["vs_uncached"] = _relative_cost(tiny, "generator", "generator_cached")
    costs: dict[str, Any] = {}
    for arch_name, modes in results.items():
        for mode in CYCLE_MODES:
            reference = MODES[mode].phase
            if mode in modes and reference in modes:
                relative = _relative_cost(modes, mode, reference)
                modes[mode]["relative_to_supervised"] = relative
                entry = {"relative_to_supervised": relative, "reference": reference}
                if mode in FLAGGED_MODES:
                    entry["within_limit"] = relative <= CYCLE_COST_LIMIT
                costs[f"{arch_name}/{mode}"] = entry
    checks["cycle_costs"] = costs
    if GPU_TARGET_ARCH in results:
        checks["gpu_targets"] = gpu_targets(results[GPU_TARGET_ARCH])
    return checks


def gpu_targets(modes: dict[str, Any]) -> dict[str, Any]:
    """The GPU targets from one architecture's measured rows: each supervised step's speed ratio and CI
    against the baseline, the fastest lever row's (with its MFU), and whether every row has an MFU."""
    targets: dict[str, Any] = {}
    for name, mode, floor in (
        ("uncached", "generator", GPU_UNCACHED_FLOOR),
        ("cached", "generator_cached", GPU_CACHED_TARGET),
    ):
        if _paired(modes.get(mode, {})):
            interval = speed_ratio_interval(modes[mode]["seconds"], modes[mode]["baseline_seconds"])
            targets[name] = {**interval, "target": floor, "passes": interval["ratio"] >= floor}
    levers = {
        row: speed_ratio_interval(figures["seconds"], figures["baseline_seconds"])
        for row, figures in modes.items()
        if row.startswith("generator+") and _paired(figures)
    }
    if levers:
        best = max(levers, key=lambda row: levers[row]["ratio"])
        mfu = modes[best].get("mfu")
        targets["levers"] = {
            "row": best,
            **levers[best],
            "mfu": mfu,
            "target": GPU_LEVERS_TARGET,
            "mfu_target": GPU_LEVERS_MFU_TARGET,
            "passes": levers[best]["ratio"] >= GPU_LEVERS_TARGET
            and mfu is not None
            and mfu >= GPU_LEVERS_MFU_TARGET,
        }
    targets["mfu_everywhere"] = all("mfu" in figures for figures in modes.values())
    return targets


def _paired(figures: dict[str, Any]) -> bool:
    """Whether a row has the two or more baseline pairs a speed ratio's interval needs."""
    return len(figures.get("baseline_seconds", ())) >= 2


def _relative_cost(modes: dict[str, Any], mode: str, reference: str) -> float:
    """Step time of `mode` over `reference`, each first taken relative to its own interleaved baseline steps;
    on an architecture without a baseline (a family other than SD), their median step times' ratio."""
    if "time_vs_baseline" in modes[mode]:
        return modes[mode]["time_vs_baseline"] / modes[reference]["time_vs_baseline"]
    return modes[mode]["median_ms"] / modes[reference]["median_ms"]
