"""The rerank study's statistics on hand-made rankings: top-1 against a random pick (paired, with bootstrap
intervals) and Spearman's rho of a ranking's score with quality, pooled and within query."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from cycletune.evaluation.rank_report import Bootstrap, rank_quality, score_correlation, top_pick

# Three queries of three candidates; the ranking puts the best candidate first in two of them.
QUALITY = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.25, 0.75, 0.5]])
RANKS = np.array([[0, 1, 2], [1, 0, 2], [0, 2, 1]])


def test_top_pick_against_a_random_pick() -> None:
    pick = top_pick(QUALITY, RANKS, "m", Bootstrap(500, seed=3))
    assert pick.measure == "m" and pick.queries == 3
    assert pick.top1.value == pytest.approx((1.0 + 1.0 + 0.25) / 3)
    assert pick.random.value == pytest.approx(QUALITY.mean())  # the expected quality of a random candidate
    assert pick.gain.value == pytest.approx(pick.top1.value - pick.random.value)
    for estimate in (pick.top1, pick.random, pick.gain):
        assert estimate.ci_low <= estimate.value <= estimate.ci_high
    # Every query's candidates average 0.5, so the random pick has no spread across resamples.
    assert pick.random.ci_low == pick.random.ci_high == pytest.approx(0.5)
    # The same resamples as rank_quality's: top-1 is its rank 0, to the interval.
    first = rank_quality(QUALITY, RANKS, "m", Bootstrap(500, seed=3))[0]
    assert (first.mean, first.ci_low, first.ci_high) == pytest.approx(
        (pick.top1.value, pick.top1.ci_low, pick.top1.ci_high)
    )
    worst_first = np.argsort(np.argsort(QUALITY, axis=1), axis=1)
    assert top_pick(QUALITY, worst_first, "m", Bootstrap(500)).gain.value == pytest.approx(-0.5 + 0.25 / 3)
    with pytest.raises(ValueError, match="permutation"):
        top_pick(QUALITY, np.zeros_like(RANKS), "m")


def test_paired_gain_interval_excludes_zero_when_the_ranking_always_helps() -> None:
    rng = np.random.default_rng(0)
    quality = rng.random((40, 8))
    best_first = np.argsort(np.argsort(-quality, axis=1), axis=1)  # rank 0 = the best candidate
    pick = top_pick(quality, best_first, "oracle", Bootstrap(1000, seed=0))
    assert pick.gain.ci_low > 0
    # Paired: the gain's interval is narrower than the top-1 and random intervals side by side suggest.
    assert pick.gain.ci_high - pick.gain.ci_low < (pick.top1.ci_high - pick.top1.ci_low) + (
        pick.random.ci_high - pick.random.ci_low
    )


def test_spearman_within_query_and_pooled() -> None:
    # Within each query the score orders the candidates as quality does; across queries it does not: the
    # better query has the worse scores (a hard image: good captions, yet rebuilt poorly).
    quality = np.array([[0.8, 1.0, 0.9], [0.0, 0.2, 0.1]])
    scores = np.array([[0.0, 2.0, 1.0], [10.0, 12.0, 11.0]])
    correlation = score_correlation(scores, quality, "m", higher_is_better=True, bootstrap=Bootstrap(300))
    assert correlation.within_query.value == pytest.approx(1.0)
    assert correlation.within_query.ci_low == correlation.within_query.ci_high == pytest.approx(1.0)
    assert correlation.pooled.value == pytest.approx(spearmanr(scores.ravel(), quality.ravel()).statistic)
    assert correlation.pooled.value < 0
    assert (correlation.within_queries, correlation.queries) == (2, 2)
    # A loss (lower is better) is signed so that a positive rho still means "better score, better quality".
    as_loss = score_correlation(-scores, quality, "loss", higher_is_better=False, bootstrap=Bootstrap(300))
    assert as_loss.within_query.value == pytest.approx(1.0)
    assert as_loss.pooled.value == pytest.approx(correlation.pooled.value)
    anti = score_correlation(-scores, quality, "m", higher_is_better=True, bootstrap=Bootstrap(300))
    assert anti.within_query.value == pytest.approx(-1.0)


def test_spearman_leaves_out_queries_without_a_rho_and_brackets_its_estimates() -> None:
    rng = np.random.default_rng(1)
    quality = rng.integers(0, 2, size=(60, 8)).astype(float)
    quality[:10] = 1.0  # every candidate right: no within-query rho
    scores = quality + rng.normal(scale=0.8, size=quality.shape)
    correlation = score_correlation(scores, quality, "m", higher_is_better=True, bootstrap=Bootstrap(500))
    varying = slice(10, None)
    expected = np.mean(
        [spearmanr(s, q).statistic for s, q in zip(scores[varying], quality[varying], strict=True)]
    )
    assert correlation.within_queries == 50 and correlation.queries == 60
    assert correlation.within_query.value == pytest.approx(expected)
    for estimate in (correlation.within_query, correlation.pooled):
        assert 0 < estimate.ci_low <= estimate.value <= estimate.ci_high < 1
    assert (
        score_correlation(scores, quality, "m", higher_is_better=True, bootstrap=Bootstrap(500))
        == correlation
    )
    constant = score_correlation(scores, np.ones_like(quality), "m", higher_is_better=True)
    assert constant.within_queries == 0 and np.isnan(constant.within_query.value)
    with pytest.raises(ValueError, match="shaped as quality"):
        score_correlation(scores[:, :3], quality, "m", higher_is_better=True)
