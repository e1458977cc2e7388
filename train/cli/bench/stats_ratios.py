"""Statistics of timed steps: summaries, paired speed ratios with a bootstrap interval, rank agreement."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def step_summary(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median and min ms per step and samples per second at the median."""
    middle = median(seconds)
    return {"median_ms": 1000 * middle, "min_ms": 1000 * min(seconds), "samples_per_s": batch_size / middle}


def speed_ratio_interval(
    ours: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Median speed ratio of paired steps (baseline time / our time; > 1 is faster), bootstrap percentile CI.

    The pairs ran back to back, so each ratio cancels the machine's state at that moment; the median (not the
    mean) keeps the few pairs that caught another process's burst from deciding the answer.
    """
    if len(ours) != len(baseline) or len(ours) < 2:
        raise ValueError(f"need >= 2 pairs of equal length, got {len(ours)} and {len(baseline)}")
    ratios = np.asarray(baseline, dtype=float) / np.asarray(ours, dtype=float)
    draws = np.random.default_rng(seed).choice(ratios, size=(resamples, len(ratios)), replace=True)
    low, high = np.quantile(np.median(draws, axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"pairs": len(ratios), "ratio": float(np.median(ratios)), "low": float(low), "high": float(high)}


def time_ratio(ours: Sequence[float], baseline: Sequence[float]) -> float:
    """Our step time in baseline steps: the median of the per-pair ratios."""
    return median([mine / theirs for mine, theirs in zip(ours, baseline, strict=True)])


def mean_spearman(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]]) -> float:
    """Mean over groups (images) of the Spearman rank correlation of two scorings of the same candidates."""
    values = [stats.spearmanr(a, b).statistic for a, b in zip(first, second, strict=True)]
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else float("nan")
