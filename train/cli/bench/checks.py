"""The benchmark's acceptance checks: framework overhead, cache speed-up, and each cycle mode's cost."""

from __future__ import annotations

from typing import Any

from cycletune.train.cli.bench.bench_modes import BASELINE, CYCLE_MODES, FLAGGED_MODES, MODES, measured
from cycletune.train.cli.bench.stats_ratios import speed_ratio_interval

CYCLE_COST_LIMIT = 1.6
FRAMEWORK_RATIO_FLOOR = 0.95
CACHE_SPEEDUP_TARGET = 1.25


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
    return checks


def _relative_cost(modes: dict[str, Any], mode: str, reference: str) -> float:
    """Step time of `mode` over `reference`, each first taken relative to its own interleaved baseline steps;
    on an architecture without a baseline (a family other than SD), their median step times' ratio."""
    if "time_vs_baseline" in modes[mode]:
        return modes[mode]["time_vs_baseline"] / modes[reference]["time_vs_baseline"]
    return modes[mode]["median_ms"] / modes[reference]["median_ms"]
